"""Check a built moeoffload wheel before it is installed: what it needs from the system, what it holds.

    python tools/check_wheel.py wheelhouse/moeoffload-*.whl [--cuda]

Fails (exit 1, one line per problem) when the native module needs libtorch, libc10 or libcudart (the
core is torch-free and links cudart statically; libcuda, the driver, is loaded at run time), or when
the wheel lacks the compiled module, its type stubs, py.typed or the embedded default model. Prints
the wheel's size and the libraries it needs."""

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FORBIDDEN = re.compile(r"^lib(torch|c10|cudart)")
REQUIRED = ("moeoffload/_native.pyi", "moeoffload/py.typed", "moeoffload/models/tiny-moe/config.json",
            "moeoffload/models/tiny-moe/model.safetensors", "moeoffload/models/tiny-moe/policy.json")


def needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel")
    args = ap.parse_args()
    wheel = Path(args.wheel)
    problems = []
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        names = z.namelist()
        modules = [n for n in names if re.fullmatch(r"moeoffload/_native\..*\.so", n)]
        if len(modules) != 1:
            problems.append(f"expected one compiled moeoffload/_native*.so, found {modules}")
        problems += [f"missing {n}" for n in REQUIRED if n not in names]
        libs = []
        for n in modules + [n for n in names if n.startswith("moeoffload.libs/")]:
            z.extract(n, tmp)
            libs += needed(Path(tmp) / n)
        problems += [f"the native code needs {lib}" for lib in libs if FORBIDDEN.match(lib)]
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, {len(names)} files; "
          f"the native module needs {', '.join(sorted(set(libs))) or 'nothing'}")
    for p in problems:
        print(f"check_wheel: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
