#!/usr/bin/env bash
# Everything this project still owes a GPU, on a lent GPU machine (H100/H200; the device tool's `run`),
# in two calls that each end well inside one 10-minute command, the second made while the machine is
# still warm (30 s) so it finds the first one's build:
#   first:
#     1. build this checkout with its CUDA kernels (sm_90a only, no stubs) into build/device-site
#        (git-ignored: it stays on the warm machine for the second call);
#     2. the tests marked cuda (the szp/szpe decoders bit for bit, the fused ops against the CPU);
#     3. bench/codec.py --cuda-only: szp and szpe decode GB/s on a 1 GiB expert-like tensor, the
#        pinned H2D copy of each codec's bytes (issue 12's 300 GB/s), and the arrival latency of one
#        Qwen3-shaped szpe expert at three stream lengths;
#     4. bench/cached_experts.py: the fused kernels on one resident Qwen3-shaped layer (one expert, and
#        8 in one moe_experts call) against the dense bf16 experts, µs and weight GB/s;
#   second (builds first if the first call's build is not there, or is of other sources):
#     5. bench/transfer_overlap.py: copies against compute, and 1.7 MB expert copies with each copy
#        stream issuing 8 ahead (the engine's default) against one at a time;
#     6. bench/e2e.py on a Qwen3-30B-A3B-shaped stack (E2E_LAYERS layers, 25% budget, trace and model
#        routing, every system including accelerate, szpe and the torch.compile'd path): issue 11's table
#        (E2E_SHAPE=mixtral and E2E_BUDGETS="25 50" for the rest of it, in a later session);
#     7. the rest of the test files that touch the runtime, whose caches ("auto") are on the cuda
#        backend there, with the time left.
# `all` (the default) runs both in one call. Each stage has its own time limit and the script goes on
# past a failed one, so a call returns all it could measure: logs, JSON and tables under $OUT, a
# summary printed last. Split, a failed first call (a build error, say) costs its minutes, not ten,
# and leaves time to fix it and run again inside the session's 15 minutes.
#
# Before the calls, on the development machine (the image there lacks pysz and has an older
# transformers, 5.17 when last read; it has torch, nanobind, scikit-build-core, accelerate and pytest):
#   tools/device_check.sh --prepare          # pysz's cp312 wheel and this venv's transformers into .whl/
#                                            # (git-ignored; 22 MB of the 64 MB a call carries)
# then (a machine's start takes a minute or two of the session's 15; the first call about four):
#   run(command="bash tools/device_check.sh first", carry=[".whl"], timeout_s=600)
# and at once after it, with what is left (LIMIT: the seconds its stages may take):
#   run(command="LIMIT=450 bash tools/device_check.sh second", carry=[".whl"], timeout_s=500)
# Here, without a GPU, `OUT=/tmp/dc E2E_LAYERS=1 tools/device_check.sh` checks the plumbing (the GPU
# stages then report that there is no GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "pysz==1.1.0"
  tf=$(.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo 5.24.0)
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "transformers==$tf"
  ls -la .whl
  exit
fi

part=${1:-all}
case $part in all|first|second) ;; *) echo "usage: $0 [all|first|second|--prepare]" >&2; exit 2 ;; esac
command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"  # a missing nvcc fails the build
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
E2E_LAYERS=${E2E_LAYERS:-4}
E2E_SHAPE=${E2E_SHAPE:-qwen3}    # a later session's second call: E2E_SHAPE=mixtral E2E_LAYERS=2 E2E_BUDGETS="25 50"
E2E_BUDGETS=${E2E_BUDGETS:-25}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-570}  # this call's seconds: stages end inside it
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
summary=()

stage() {  # stage NAME LIMIT_S COMMAND...: runs it with a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  summary+=("$(printf '%-8s rc %-3s %4ss' "$name" "$rc" $((SECONDS - t0)))")
  return $rc
}

site=$PWD/build/device-site
# what the build is of: a `second` after a code change builds again rather than test the old build
sources=$(find cpp cuda python CMakeLists.txt pyproject.toml -type f -print0 | sort -z | xargs -0 sha1sum | sha1sum)
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
tests=(tests/test_backend.py tests/test_codec.py tests/test_szp.py tests/test_szpe.py tests/test_ops.py
       tests/test_device_cache.py tests/test_transfer_engine.py tests/test_runtime.py tests/test_cache.py
       tests/test_hf.py)

build() {
  stage env 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'; nvcc --version | tail -1; nproc; free -g"
  rm -rf "$site" && mkdir -p "$site"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  fi
  stage build 300 env MOEOFFLOAD_CUDA=${MOEOFFLOAD_CUDA:-ON} \
      SKBUILD_CMAKE_DEFINE="MOEOFFLOAD_CUDA_ARCHS=${CUDA_ARCHS:-90a};MOEOFFLOAD_STUBS=OFF" \
      $PY -m pip install -q --no-build-isolation --no-deps --no-compile --target "$site" . || return 1
  (cd /tmp && $PY -c "import moeoffload, json; print(moeoffload.__file__); print(json.dumps(moeoffload.backend_info()))") \
    | tee "$OUT/backend_info.txt"
  echo "$sources" >"$site/.built"
}

first() {
  stage tests-cuda 100 $PY -m pytest -q -p no:cacheprovider -m cuda --junitxml="$OUT/tests-cuda.xml" "${tests[@]}"
  stage codec 120 $PY bench/codec.py --cuda-only --out "$OUT"
  # the fused kernels on resident Qwen3-shaped experts against dense bf16: are they near streaming their bytes?
  stage experts 60 $PY bench/cached_experts.py --out "$OUT"
}

second() {
  # the copy engine: copies overlapping compute, and expert-sized copies issued ahead against one at a time
  stage transfer 45 $PY bench/transfer_overlap.py --mib 64 --copies 16 --expert-copies 192 --out "$OUT"

  # trace routing first (the 80 tokens/s target), the compiled path before the variants: rows are
  # written as they come, so a stage cut short keeps the ones that matter most
  e2e_args=(--shape "$E2E_SHAPE" --layers "$E2E_LAYERS" --budgets $E2E_BUDGETS --routing trace model --prompts 2
            --prompt-tokens 16 --new-tokens 24 --out "$OUT/e2e-${E2E_SHAPE}-${E2E_LAYERS}l"
            --systems resident accelerate naive lru-bf16 moeoffload moeoffload-compiled moeoffload-noprefetch
            moeoffload-szpe)
  # the 4-layer stack writes about 12 GB (checkpoint and tables): /dev/shm only where it has the room
  shm=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  [ "${shm:-0}" -ge 24 ] && e2e_args+=(--workdir /dev/shm)
  left=$((LIMIT - 90 - SECONDS))
  [ $left -gt 30 ] && stage e2e $left $PY bench/e2e.py "${e2e_args[@]}"
  left=$((LIMIT - SECONDS))
  [ $left -gt 20 ] && stage tests $left $PY -m pytest -q -p no:cacheprovider -m "not cuda" \
    --junitxml="$OUT/tests.xml" "${tests[@]}"
}

built=1
if [ "$part" != second ] || [ "$(cat "$site/.built" 2>/dev/null)" != "$sources" ]; then build || built=0; fi
if [ $built = 1 ]; then
  [ "$part" != second ] && first
  [ "$part" != first ] && second
fi

echo
echo "== summary ($part, total ${SECONDS}s); results in $OUT"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
for md in "$OUT"/codec-cuda-*.md "$OUT"/cached_experts-*.md "$OUT"/transfer_overlap-*.md "$OUT"/e2e-*.md; do [ -f "$md" ] && sed -n '/```/,/```/p;/^|/p' "$md" | head -40; done
# The device tool brings back at most 8 files: the tables and JSON stay apart, the rest goes in one archive.
(cd "$OUT" && tar czf logs.tar.gz --remove-files *.log *.xml *.png backend_info.txt transfer_overlap-* 2>/dev/null
 ls -la)
exit 0
