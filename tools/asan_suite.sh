#!/usr/bin/env bash
# Runs the test suite against an AddressSanitizer + LeakSanitizer build of the
# native module (CPU backend). Leaks inside Python, torch and OpenSSL's
# allocations at interpreter exit are suppressed; an impossible allocation returns NULL as glibc
# would (SZ3 asks for one on a corrupt stream, and moeoffload turns it into CorruptDataError);
# anything else is reported
# under $LOG. Usage: tools/asan_suite.sh [test files]   (default: every tests/test_*.py)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
BUILD=$ROOT/build/asan
LOG=${LOG:-/tmp/moeoffload-asan}
# The build's own tools in the venv (pip builds the package in an isolated environment, so a fresh
# venv has no nanobind; cmake and ninja may be missing from PATH on a bare machine).
"$PY" -c "import nanobind" 2>/dev/null || "$PY" -m pip install -q nanobind
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  "$PY" -m pip install -q cmake ninja
  export PATH="$(dirname "$PY"):$PATH"
fi
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEOFFLOAD_CUDA=OFF -DMOEOFFLOAD_PYTHON=ON -DMOEOFFLOAD_STUBS=OFF \
  -DPython_EXECUTABLE="$PY" "-DCMAKE_CXX_FLAGS=-fsanitize=address -fno-omit-frame-pointer" \
  "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address" > /dev/null
cmake --build "$BUILD"
if [ $# -eq 0 ]; then set -- "$ROOT"/tests/test_*.py; fi
FILES=()
for t in "$@"; do FILES+=("$(cd "$(dirname "$t")" && pwd)/$(basename "$t")"); done
set -- "${FILES[@]}"
PKG=$(mktemp -d)
cp -r "$ROOT/python/moeoffload" "$PKG/"
rm -f "$PKG"/moeoffload/_native*.so
cp "$BUILD"/_native*.so "$PKG/moeoffload/"
printf 'leak:libpython\nleak:python3\nleak:libtorch\nleak:libc10\nleak:_PyObject\nleak:PyObject_Malloc\nleak:_multiarray_umath\nleak:libcrypto\n' > "$PKG/lsan.supp"
rm -rf "$LOG" && mkdir -p "$LOG"
cd "$PKG"
status=0
for t in "$@"; do
  OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:log_path=$LOG/$(basename "$t" .py) \
  LSAN_OPTIONS=suppressions=$PKG/lsan.supp:print_suppressions=0 \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  PYTHONPATH=$PKG "$PY" -m pytest -q -p no:cacheprovider "$t" || status=1
done
echo "sanitizer reports (none is good):"
if grep -l -E "ERROR: (AddressSanitizer|LeakSanitizer)|SUMMARY: AddressSanitizer" "$LOG"/* 2>/dev/null; then status=1; fi
exit $status
