"""The CUDA kernels on the CPU, before any GPU has run them. cuda/*.cu compile unchanged as C++ against a
warp-synchronous emulator (tests/cuda_emulation/cuda_emulator.h: a fiber a thread, warps scheduled at
random so they drift apart between barriers; collectives wait for the whole warp, __syncthreads for the
block), with AddressSanitizer, into a library whose C entry
points are the .cu files' own host functions. tests/cuda_emulation/checks.py compares them with the CPU
kernels, in a process of its own with the sanitizer loaded first:
- decoders: the szpe transcode and direct decode (a warp a stream) and the szp decoder (a warp a row),
  byte for byte, every dtype, ragged shapes, several warps and blocks, exceptions in many streams;
- corrupt: 30 corrupted szpe buffers, where the emulated and CPU decoders agree on each (the same bytes,
  or corrupt) and nothing is read or written out of bounds;
- fused: szp_linear, expert_mlp and moe_experts (grouped launches, row maps, the gated staging, biases,
  exceptions, tiles of 1 and 4) against the CPU kernels, moe_experts bit for bit against the eager loop
  of the emulated expert_mlp, and a NaN token;
- arrival: the runtime's cuda path onto a device (pinned pool, expert store, the copy engine's staging,
  its failure flag a copy and events, 8 or 2 copies issued ahead of the one completing, the arrival
  step's one transcode launch per expert), built with the emulator's asynchronous streams (a worker
  thread a stream, random delays; a destroyed stream's handle goes to the next one): szpe experts land
  as szp byte for byte, a corrupt stream fails its own transfer and no other; a compute stream ordered
  after queued copies reads what they bring; a slot released with the stream of a kernel still reading
  it is not overwritten under that kernel by the fetch that evicts it (and is, without the stream), nor
  when that stream is destroyed and the next stream, with its handle, releases the slot again;
- faults: each CUDA call the copy path makes (allocations, copies, memsets, launches, events, stream
  waits and synchronizations) fails in turn, once: the one fetch or release that met it raises
  CudaError and nothing else does, no queued read sees its slot overwritten, and with the fault gone
  every expert lands again byte for byte.
On a GPU, tests/test_szpe.py and tests/test_ops.py check the compiled kernels the same way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["szp_decode.cu", "szpe_decode.cu", "szp_linear.cu", "expert_mlp.cu", "moe_experts.cu"]



def _compiler_file(cxx: str, name: str) -> str:
    return subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> tuple[Path, dict]:
    """The library, and the environment that loads AddressSanitizer (and the C++ runtime it intercepts) first."""
    cxx = shutil.which("g++")
    if cxx is None or not (ROOT / "cuda").is_dir():
        pytest.skip("needs g++ and the source tree")
    asan = _compiler_file(cxx, "libasan.so")
    if not os.path.isabs(asan):
        pytest.skip("g++ has no AddressSanitizer runtime")
    lib = tmp_path_factory.mktemp("emulation") / "libemulated_kernels.so"
    sources = [*(str(ROOT / "cuda" / k) for k in KERNELS), "-x", "none",
               *(str(ROOT / "tests/cuda_emulation" / f) for f in ("emulated_kernels.cpp", "emulated_arrival.cpp")),
               *(str(p) for p in sorted((ROOT / "cpp/codec").glob("*.cpp"))),
               *(str(p) for p in sorted((ROOT / "cpp/kernels").glob("*.cpp"))),
               *(str(p) for p in sorted((ROOT / "cpp/runtime").glob("*.cpp")))]  # the runtime, its cuda paths
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-ffp-contract=off", "-pthread",
                            "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                            "-DMOEOFFLOAD_CHECK_ALIGNMENT",  # a load or store a GPU would fault on traps here too
                            "-DMOEOFFLOAD_WITH_CUDA=1", "-Wl,--no-undefined",
                            "-I", str(ROOT / "tests/cuda_emulation"), "-I", str(ROOT / "cpp/include"),
                            "-x", "c++", *sources, "-o", str(lib)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, LD_PRELOAD=f"{asan} {_compiler_file(cxx, 'libstdc++.so.6')}",
               ASAN_OPTIONS="detect_leaks=0")
    return lib, env


@pytest.mark.parametrize("check", ["decoders", "misaligned", "corrupt", "fused", "arrival", "faults"])
def test_the_emulated_cuda_kernels_give_the_cpu_kernels_results(emulated, check):
    lib, env = emulated
    r = subprocess.run([sys.executable, str(ROOT / "tests/cuda_emulation/checks.py"), str(lib), check],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout + r.stderr)[-6000:]
