"""Parsing and validation of szp buffers (cpp/codec/szp_format.cpp): the corruption fuzz.

A decoder that trusts its input reads out of bounds. Every buffer here is
mutated and, in half the cases, its CRC recomputed, so the structural checks
behind the checksum are exercised too: decoding must raise CorruptDataError or
succeed, never crash.
"""

import numpy as np
import pytest
import torch

from conftest import fix_crc, fuzz_bit_flips, word_mutations
from moeoffload import CorruptDataError, _native, codec


def _valid_buffers():
    g = torch.Generator().manual_seed(0)
    yield codec.compress(torch.randn(7, 70, generator=g), 0.01).buffer
    yield codec.compress(torch.randn(300, generator=g).to(torch.bfloat16), 1e-3).buffer
    x = torch.randn(16, 64, generator=g).half()
    x[0, 5], x[9, 60] = 65504, -65504  # no q*step within eb rounds to a finite half: kept exactly
    yield codec.compress(x, 20000.0).buffer
    yield codec.compress(torch.randn(3, 4, 5, generator=g).half(), 0.1).buffer
    yield codec.compress(torch.zeros(0, 5), 0.1).buffer


def _decode(buf: np.ndarray):
    try:
        info = _native.szp_inspect(buf, True)
    except CorruptDataError:
        return
    dtype = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}[info["dtype"]]
    if info["numel"] > 10**7:
        pytest.fail("validation accepted an absurd element count")
    out = torch.empty(info["numel"], dtype=dtype)
    _native.szp_decode(buf, out, True)


def test_valid_buffers_have_exceptions_where_expected():
    infos = [_native.szp_inspect(b) for b in _valid_buffers()]
    assert infos[2]["n_exceptions"] > 0
    assert infos[4]["numel"] == 0


def test_bit_flips_never_crash():
    assert fuzz_bit_flips(_valid_buffers(), _native.szp_inspect, _decode, 800) >= 4000


def test_header_field_mutations_never_crash():
    # Targeted: overwrite each 8-byte header/offset word with edge values.
    rng = np.random.default_rng(11)
    edge = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
    for buf in _valid_buffers():
        for mutated in word_mutations(buf, rng, 4, 256, edge):
            _decode(mutated)


def test_random_bytes_and_truncations_raise_corrupt_data():
    rng = np.random.default_rng(3)
    for _ in range(1500):
        junk = rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8)
        with pytest.raises(CorruptDataError):
            _native.szp_inspect(junk, True)
        with pytest.raises(CorruptDataError):
            codec.CompressedTensor.from_bytes(junk.tobytes())
    for buf in _valid_buffers():
        for cut in range(0, buf.size, max(1, buf.size // 200)):
            with pytest.raises(CorruptDataError):
                codec.CompressedTensor.from_bytes(buf[:cut].tobytes())
            _decode(fix_crc(buf[:cut]))


def test_future_version_is_named():
    buf = next(_valid_buffers()).copy()
    buf[4] = 9
    with pytest.raises(CorruptDataError, match="version"):
        _native.szp_inspect(fix_crc(buf), True)


def test_decode_rejects_wrong_output_size():
    from moeoffload import ShapeError

    ct = codec.compress(torch.randn(10, 10), 0.1)
    with pytest.raises(ShapeError):
        _native.szp_decode(ct.buffer, torch.empty(99), True)


@pytest.mark.parametrize("codec_name", ["szp", "szpe"])
def test_a_header_whose_step_breaks_its_bound_is_corrupt(codec_name):
    # step <= 2 eb is what makes a decoded value keep the bound; a checksummed header claiming
    # eb = 1e-4 with a step of 1e30 decoded with errors of 3e32, and a subnormal step was taken too.
    buf = codec.compress(torch.randn(5, 70) * 0.02, 1e-4, codec=codec_name).buffer
    step = float(buf[24:28].view(np.float32)[0])
    for field, value in ((slice(24, 28), np.float32(1e30)), (slice(24, 28), np.float32(1e-45)),
                         (slice(16, 24), np.float64(step / 2.01)), (slice(16, 24), np.float64(1e-300))):
        bad = buf.copy()
        bad[field] = np.frombuffer(value.tobytes(), np.uint8)
        with pytest.raises(CorruptDataError, match="step"):
            codec.CompressedTensor.from_bytes(fix_crc(bad).tobytes())
    ok = buf.copy()
    ok[16:24] = np.frombuffer(np.float64(step / 2).tobytes(), np.uint8)  # eb = step / 2 exactly: still the rule
    codec.CompressedTensor.from_bytes(fix_crc(ok).tobytes()).decompress()


def test_the_smallest_bounds_encode_a_step_the_reader_takes():
    # The encoder's step search scales the step down by up to 15 %; near FLT_MIN that made a subnormal
    # step, which the reader refuses: the search skips such steps.
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(4096, generator=g) * 1e-36).to(dtype)
        tiny = torch.finfo(torch.float32).tiny  # FLT_MIN
        for eb in (tiny / 2, tiny / 1.9, 1e-37):
            ct = codec.CompressedTensor.from_bytes(codec.compress(x, eb).to_bytes())
            assert (ct.decompress().double() - x.double()).abs().max() <= eb
