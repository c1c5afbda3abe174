"""The decode kernels of cuda/szp_decode.cuh and cuda/szpe_decode.cuh on the CPU, before any GPU has run them: a warp-synchronous
emulator (tests/cuda_emulation/cuda_emulator.h, a thread a lane, built here with g++ and
AddressSanitizer) runs them as the .cu files launch them, and their output must be the CPU
decoders', byte for byte, on every buffer: valid ones of any shape, dtype and stream length, and
corrupted ones, where both must either decode to the same bytes or both call the buffer corrupt, never
reading or writing out of bounds. On a GPU, tests/test_szpe.py checks the compiled kernels the same way."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moeoffload import CorruptDataError, _native, codec

from conftest import DTYPES, fix_crc
from test_szpe import _exceptions_in_many_streams, adversarial

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["tests/cuda_emulation/decoders_emulated.cpp", "cpp/codec/szpe_format.cpp", "cpp/codec/szp_format.cpp",
           "cpp/codec/szp_layout.cpp", "cpp/runtime/parallel.cpp"]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not (ROOT / "cuda").is_dir():
        pytest.skip("needs a C++ compiler and the source tree")
    exe = tmp_path_factory.mktemp("emulation") / "decoders_emulated"
    subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-ffp-contract=off", "-pthread", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-I", str(ROOT / "cpp/include"), "-o", str(exe),
                    *(str(ROOT / s) for s in SOURCES)], check=True, capture_output=True)
    return exe


def run(exe: Path, jobs: list[tuple[str, np.ndarray]], tmp: Path) -> list[bytes | None]:
    """The emulated kernel's output of each (mode, buffer) job, None where it flagged a corrupt stream;
    all jobs in one process (its threads are started once)."""
    args = []
    for i, (mode, buf) in enumerate(jobs):
        np.asarray(buf, np.uint8).tofile(tmp / f"{i}.in")
        args += [mode, str(tmp / f"{i}.in"), str(tmp / f"{i}.{mode}")]
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the emulated decoders crashed (rc {r.returncode}):\n{r.stderr[-3000:]}"
    status = r.stdout.split()
    assert len(status) == len(jobs)
    return [(tmp / f"{i}.{mode}").read_bytes() if st == "ok" else None
            for i, ((mode, _), st) in enumerate(zip(jobs, status))]


def cpu_values(buf: np.ndarray, shape, dtype) -> bytes | None:
    """The CPU value decoder's bytes, or None when it calls the buffer corrupt."""
    out = torch.empty(shape, dtype=dtype)
    try:
        _native.szpe_decode(buf, out, True)
    except CorruptDataError:
        return None
    return out.view(torch.uint8).numpy().tobytes()


def cpu_transcode(buf: np.ndarray) -> bytes | None:
    try:
        return bytes(np.asarray(_native.szpe_to_szp(buf, True)))
    except CorruptDataError:
        return None


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_warp_decoders_give_the_cpu_decoders_bytes(emulated, tmp_path, dtype):
    # A warp a stream: the transcode writes the szp buffer the szpe came from, byte for byte (every
    # byte of a poisoned output), and the value decoder its values; the default stream length (one
    # stream here) and 1 and 3 rows a stream (several warps and blocks, a ragged last stream). And the
    # szp decoder, a warp a row, the szp buffer's values.
    jobs, want = [], []
    for name, x in adversarial(dtype):
        if x.numel() > 20000:  # each emulated collective wakes 32 threads: the 100003-value row takes minutes
            continue
        fixed = codec.compress(x.to(dtype), 2e-3)
        values = fixed.decompress().contiguous().view(torch.uint8).numpy().tobytes()
        for rows in (0, 1, 3):
            buf = np.asarray(_native.szpe_from_szp(fixed.buffer, rows))
            jobs += [("szpe-to-szp", buf), ("szpe-values", buf)]
            want += [(name, rows, fixed.buffer.tobytes()), (name, rows, values)]
        jobs.append(("szp-values", fixed.buffer))  # cuda/szp_decode.cu: a warp a row
        want.append((name, "szp", values))
    for got, (name, rows, expected) in zip(run(emulated, jobs, tmp_path), want):
        assert got == expected, (name, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_warp_decoders_write_exceptions_of_many_streams(emulated, tmp_path, dtype):
    fixed, bufs = _exceptions_in_many_streams(dtype)
    got = run(emulated, [(mode, buf) for buf in bufs for mode in ("szpe-to-szp", "szpe-values")], tmp_path)
    assert got == [fixed.buffer.tobytes(), fixed.decompress().view(torch.uint8).numpy().tobytes()] * len(bufs)


def test_a_corrupted_buffer_gives_what_the_cpu_gives(emulated, tmp_path):
    # Bytes flipped in the streams (states and words) and the escapes, the CRC fixed so the change gets
    # past parse: the emulated value decoder and the CPU's agree on each one, the same bytes (a change
    # that still decodes) or corrupt; the emulated transcode gives the CPU's szp buffer where that
    # passes its CRC check, else nothing or a buffer of the same values; AddressSanitizer sees no
    # access out of bounds.
    x = torch.distributions.StudentT(2.0).sample((24, 160)) * 0.01  # heavy tails: escapes
    fixed = codec.compress(x.to(torch.bfloat16), 1e-3)
    buf = np.asarray(_native.szpe_from_szp(fixed.buffer, 5))
    info = _native.szpe_inspect(buf)
    assert info["n_escapes"] > 0 and info["n_streams"] > 1
    payload_at = buf.size - 4 - info["payload_bytes"]
    rng = np.random.default_rng(0)
    cases = []
    for at in [*rng.integers(payload_at, buf.size - 4, 24), *rng.integers(payload_at - 64, payload_at, 6)]:
        broken = buf.copy()
        broken[at] ^= 1 << int(rng.integers(0, 8))
        broken = fix_crc(broken)
        try:
            _native.szpe_inspect(broken, True)
        except CorruptDataError:
            continue  # parse refuses it: no decoder runs
        cases.append((at, broken))
    got = run(emulated, [(mode, b) for _, b in cases for mode in ("szpe-values", "szpe-to-szp")], tmp_path)
    corrupt = 0
    for (at, broken), values, szp in zip(cases, got[0::2], got[1::2]):
        assert values == cpu_values(broken, x.shape, torch.bfloat16), at
        corrupt += values is None
        want = cpu_transcode(broken)
        if want is not None or szp is None:
            assert szp == want, at
        else:  # decodes, to values other than those the szp CRC was made with
            out = torch.empty(x.shape, dtype=torch.bfloat16)
            _native.szp_decode(np.frombuffer(szp, np.uint8), out, False)
            assert out.view(torch.uint8).numpy().tobytes() == values, at
    assert corrupt >= 10
