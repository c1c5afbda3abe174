"""The szp codec (cpp/codec/szp_encode.cpp, szp_decode.cpp): bound, layout, decoders."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DTYPES, max_error
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload import BoundTooSmallError, _native, codec


def _roundtrip(x: torch.Tensor, eb: float) -> tuple[codec.CompressedTensor, torch.Tensor]:
    ct = codec.compress(x, eb)
    return ct, ct.decompress()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [0.02, 0.05, 0.1, 0.2, 1.0])
def test_bound_holds_on_weight_like_tensors(dtype, factor):
    # 2^18 values per case, 15 cases: ~4M values checked per run.
    torch.manual_seed(int(factor * 1000) + DTYPES.index(dtype))
    x = (torch.randn(256, 1024) * 0.02).to(dtype)
    eb = factor * float(x.float().std())
    ct, y = _roundtrip(x, eb)
    assert y.dtype == dtype and y.shape == x.shape
    assert max_error(x, y) <= eb
    assert max_error(x, ct.decompress(torch.float32)) <= eb  # widening keeps the bound
    assert ct.n_exceptions <= x.numel() // 500  # exceptions stay rare


@settings(max_examples=120, deadline=None)
@given(
    rows=st.integers(0, 40),
    cols=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    log_eb=st.floats(-6, 1),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=st.integers(0, 2**31),
)
def test_bound_holds_for_random_shapes_dtypes_bounds(rows, cols, dtype, log_eb, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    eb = 10.0**log_eb * scale
    ct, y = _roundtrip(x, eb)
    assert y.shape == x.shape
    assert max_error(x, y) <= eb


def _adversarial(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    fi = torch.finfo(dtype)
    n = 4096
    return {
        "subnormals": torch.full((n,), fi.smallest_normal, dtype=dtype) * torch.rand(n).to(dtype),
        "largest": torch.tensor([fi.max, -fi.max, fi.max / 2, 0.0] * 8, dtype=dtype),
        "huge_range": torch.cat([torch.randn(n) * 1e-6, torch.tensor([1e4, -1e4])]).to(dtype),
        "constant": torch.full((33, 65), 0.3, dtype=dtype),
        "zeros": torch.zeros(7, 31, dtype=dtype),
        "alternating": (torch.arange(n) % 2 * 2 - 1).to(dtype) * 0.5,
        "ramp": torch.linspace(-3, 3, n).to(dtype),
        "scalar": torch.tensor(1.25, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rel_eb", [1e-3, 0.01, 0.1])
def test_bound_holds_on_adversarial_values(dtype, rel_eb):
    for name, x in _adversarial(dtype).items():
        eb = codec.absolute_bound(x, rel_eb, "rel")
        if 2 * eb < torch.finfo(torch.float32).smallest_normal:
            # the step must be a normal float: a named error, not a silent precision loss
            with pytest.raises(BoundTooSmallError, match="too small"):
                codec.compress(x, eb)
            eb = codec.absolute_bound(x, rel_eb, "abs")
        ct, y = _roundtrip(x, eb)
        assert y.shape == x.shape, name
        assert torch.isfinite(y).all(), name
        assert max_error(x, y) <= eb, name


def test_layout_blocks_run_along_rows_with_per_row_offsets():
    x = torch.randn(12, 100)
    ct = codec.compress(x, 0.01)
    info = _native.szp_inspect(ct.buffer)
    assert info["segment_len"] == 100 and info["n_segments"] == 12
    # a row of zeros costs only its widths (4 bytes for 4 blocks, padded): rows are independent
    x[3] = 0
    zero_row = codec.compress(x, 0.01)
    assert zero_row.nbytes < ct.nbytes
    assert torch.equal(zero_row.decompress()[3], torch.zeros(100))


def test_one_dimensional_tensors_are_cut_into_segments():
    x = torch.randn(20000)
    ct, y = _roundtrip(x, 0.01)
    assert _native.szp_inspect(ct.buffer)["n_segments"] == 3
    assert max_error(x, y) <= 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("peak", [1000.0, 3.0, 65504.0, 1e-3])
def test_bound_too_small_suggests_a_bound_that_works(dtype, peak):
    # The bound the message prints (6 significant digits) must itself be accepted.
    import re

    x = torch.tensor([peak, -peak / 3, 0.0]).to(dtype)
    with pytest.raises(BoundTooSmallError, match="use eb >= ") as info:
        codec.compress(x, float(x.abs().max()) * 1e-9)
    assert "float32" not in str(info.value)
    suggested = float(re.search(r"use eb >= (\S+)$", str(info.value))[1])
    ct, y = _roundtrip(x, suggested)
    assert max_error(x, y) <= ct.eb
    with pytest.raises(BoundTooSmallError):
        codec.compress(x, suggested * 0.999)


def test_a_bound_whose_step_would_be_subnormal_says_so():
    # it said the quantised values would overflow, for values of about one step
    import re

    x = torch.full((2, 64), 2.9e-39)
    with pytest.raises(BoundTooSmallError, match="smallest normal") as info:
        codec.compress(x, 1.47e-39)
    suggested = float(re.search(r"use eb >= (\S+)$", str(info.value))[1])
    ct, y = _roundtrip(x, suggested)
    assert max_error(x, y) <= ct.eb


def test_exceptions_are_decoded_exactly():
    # bf16 values lined up with a round bound force some values to be kept exactly
    torch.manual_seed(3)
    x = (torch.randn(512, 512) * 0.02).to(torch.bfloat16)
    eb = 0.02 * 0.02
    ct, y = _roundtrip(x, eb)
    assert ct.n_exceptions > 0
    assert max_error(x, y) <= eb


def test_decoding_is_deterministic_across_thread_counts():
    x = torch.randn(300, 333).to(torch.bfloat16)
    ct = codec.compress(x, 0.003)
    outs = []
    for threads in (1, 2, 5):
        _native.set_num_threads(threads)
        outs.append(ct.decompress())
        assert torch.equal(codec.compress(x, 0.003).decompress(), outs[0])
    _native.set_num_threads(0)
    assert all(torch.equal(o, outs[0]) for o in outs)


_DECODE_DIGEST = """
import hashlib, sys, torch
import moeoffload
from moeoffload import codec
out, widths = [], set()
for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):
    for eb in (2.5e-6, 3e-5, 1e-4, 1e-2, 0.3):
        g = torch.Generator().manual_seed(i)
        x = (torch.randn(97, 1000, generator=g) * torch.logspace(-3, 1, 1000)).to(dtype)
        ct = codec.compress(x, eb)
        widths.update(int(w) for w in codec.width_histogram(ct).nonzero()[0])
        out.append(ct.decompress().view(torch.uint8).numpy().tobytes())
x = torch.randn(97, 1000, generator=g)
ct = codec.compress(x, float(x.abs().max()) / (2**25 - 8) * 1.01)  # |q| near 2^24: width 25
widths.update(int(w) for w in codec.width_histogram(ct).nonzero()[0])
out.append(ct.decompress().view(torch.uint8).numpy().tobytes())
assert widths >= set(range(26)), sorted(set(range(26)) - widths)
print(moeoffload.backend_info()["cpu_isa"], hashlib.sha256(b''.join(out)).hexdigest())
"""


def test_simd_decoders_equal_portable_reference_bit_for_bit():
    # Every SIMD path this CPU has (AVX-512, AVX2) and the portable path must
    # give identical bits over every block width 1..25 (the eb range covers them).
    runs = {}
    for isa in ("avx512", "avx2", "portable"):
        env = {**os.environ, "MOEOFFLOAD_ISA": isa}
        out = subprocess.run([sys.executable, "-c", _DECODE_DIGEST], capture_output=True, text=True, env=env, check=True)
        used, digest = out.stdout.split()
        runs[used] = digest
    assert "portable" in runs
    assert len(set(runs.values())) == 1, runs


def test_decoded_value_is_quantised_step_multiple():
    # The decoder computes float(q) * step, rounded to the dtype: check against numpy.
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    ct = codec.compress(x, 0.05)
    step = np.float32(_native.szp_inspect(ct.buffer)["step"])
    y = ct.decompress().numpy()
    q = np.round(y / step)
    assert np.array_equal((q.astype(np.float32) * step).astype(np.float32), y)
    assert step <= 0.1


def test_checksum_matches_zlib():
    import zlib

    data = np.frombuffer(os.urandom(1000), dtype=np.uint8)
    assert _native.crc32(data) == zlib.crc32(data.tobytes())
