"""The sz3 container (docs/format.md) against hostile input: every corrupt buffer gives CorruptDataError.

The CRC32 is recomputed after each mutation so that the structural checks behind it,
and SZ3's own parsing of its stream, are what is exercised.
"""

import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import max_error

from moeoffload import CorruptDataError, InvalidBoundError, ShapeError, codec

HEADER = struct.Struct("<4sHBBdQQQ")  # magic, version, dtype, ndim, eb, numel, n_exceptions, stream bytes


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def fields(buf: bytes) -> dict:
    """The container's parts, to be changed and packed again with pack()."""
    magic, version, code, ndim, eb, numel, n_exc, n_stream = HEADER.unpack_from(buf)
    at = HEADER.size
    shape = list(struct.unpack_from(f"<{ndim}Q", buf, at))
    at += 8 * ndim
    idx = list(struct.unpack_from(f"<{n_exc}Q", buf, at))
    at += 8 * n_exc
    raw = list(struct.unpack_from(f"<{n_exc}I", buf, at))
    at += 4 * n_exc
    stream = buf[at : at + n_stream]
    assert at + n_stream + 4 == len(buf)
    return dict(magic=magic, version=version, code=code, ndim=ndim, eb=eb, numel=numel, n_exc=n_exc,
                n_stream=n_stream, shape=shape, idx=idx, raw=raw, stream=stream)


def pack(f: dict) -> bytes:
    body = HEADER.pack(f["magic"], f["version"], f["code"], f["ndim"], f["eb"], f["numel"], f["n_exc"], f["n_stream"])
    body += struct.pack(f"<{len(f['shape'])}Q", *f["shape"])
    body += struct.pack(f"<{len(f['idx'])}Q", *f["idx"])
    body += struct.pack(f"<{len(f['raw'])}I", *f["raw"])
    return with_crc(body + f["stream"])


def decode(buf: bytes) -> torch.Tensor:
    return codec.CompressedTensor.from_bytes(buf).decompress()


def must_be_corrupt_or_valid(buf: bytes, shape) -> None:
    """A mutated buffer either raises CorruptDataError or decodes to finite values of the header's shape."""
    try:
        ct = codec.CompressedTensor.from_bytes(buf)
        y = ct.decompress()
    except CorruptDataError:
        return
    assert y.shape == ct.shape and bool(torch.isfinite(y).all())


@pytest.fixture(scope="module")
def bf16_with_exceptions() -> tuple[torch.Tensor, bytes]:
    torch.manual_seed(2)
    x = torch.randn(64, 96).to(torch.bfloat16)
    ct = codec.compress(x, 0.05, codec="sz3")  # on the bf16 grid: some values need exceptions
    assert ct.n_exceptions >= 3
    return x, ct.to_bytes()


@pytest.fixture(scope="module")
def f32_buffer() -> tuple[torch.Tensor, bytes]:
    torch.manual_seed(3)
    x = torch.randn(40, 50) * 0.02
    return x, codec.compress(x, 1e-3, codec="sz3").to_bytes()


def test_the_helpers_reproduce_a_valid_buffer(bf16_with_exceptions):
    x, buf = bf16_with_exceptions
    assert pack(fields(buf)) == buf
    assert max_error(x, decode(buf)) <= 0.05


# ---- exceptions ----

@pytest.mark.parametrize("index", [2**64 - 1, 2**64 - 2, 2**63, 2**63 - 1, 2**32, 64 * 96])
def test_exception_index_out_of_range_never_wraps(bf16_with_exceptions, index):
    x, buf = bf16_with_exceptions
    f = fields(buf)
    f["idx"][-1] = index
    with pytest.raises(CorruptDataError, match="exception index"):
        decode(pack(f))


def test_exception_indices_duplicate_or_unsorted_are_corrupt(bf16_with_exceptions):
    _, buf = bf16_with_exceptions
    f = fields(buf)
    f["idx"][1] = f["idx"][0]
    with pytest.raises(CorruptDataError):
        decode(pack(f))
    f = fields(buf)
    f["idx"][0], f["idx"][1] = f["idx"][1], f["idx"][0]
    with pytest.raises(CorruptDataError):
        decode(pack(f))


@pytest.mark.parametrize("raw", [0x10000, 0xFFFFFFFF, 0x7FC0, 0x7F80, 0xFF80])  # too wide for bf16; NaN, +-Inf
def test_exception_values_that_do_not_fit_or_are_not_finite(bf16_with_exceptions, raw):
    _, buf = bf16_with_exceptions
    f = fields(buf)
    f["raw"][0] = raw
    with pytest.raises(CorruptDataError):
        decode(pack(f))


@pytest.mark.parametrize("raw", [0x7FC00000, 0x7F800000, 0xFF800000])
def test_float32_exception_values_that_are_not_finite(raw):
    torch.manual_seed(4)
    x = torch.randn(3000)
    f = fields(codec.compress(x, 1e-3, codec="sz3").to_bytes())
    assert f["n_exc"] == 0
    f.update(n_exc=1, idx=[7], raw=[raw])
    with pytest.raises(CorruptDataError, match="NaN or Inf"):
        decode(pack(f))


@pytest.mark.parametrize("n_exc", [2**64 - 1, 2**63, 2**32 + 3, 64 * 96 + 1])
def test_huge_exception_counts(bf16_with_exceptions, n_exc):
    _, buf = bf16_with_exceptions
    f = fields(buf)
    f["n_exc"] = n_exc  # the lists stay as they are: the length cannot match
    with pytest.raises(CorruptDataError):
        decode(pack(f))


# ---- header ----

@pytest.mark.parametrize("change", [
    {"eb": float("nan")}, {"eb": float("inf")}, {"eb": 0.0}, {"eb": -1e-3}, {"eb": -0.0},
    {"code": 0}, {"code": 4}, {"code": 255},
    {"numel": 0}, {"numel": 1}, {"numel": 2**64 - 1},
    {"n_stream": 0}, {"n_stream": 2**64 - 1},
    {"version": 2}, {"version": 0},
    {"magic": b"MSZ4"},
])
def test_header_fields(f32_buffer, change):
    _, buf = f32_buffer
    f = fields(buf)
    f.update(change)
    with pytest.raises(CorruptDataError):
        decode(pack(f))


@pytest.mark.parametrize("ndim", [9, 16, 255])
def test_too_many_dimensions_in_the_header(f32_buffer, ndim):
    _, buf = f32_buffer
    f = fields(buf)
    f.update(ndim=ndim, shape=[40, 50] + [1] * (ndim - 2))
    with pytest.raises(CorruptDataError):
        decode(pack(f))


@pytest.mark.parametrize("shape", [[50, 40 + 1], [1999], [2**32, 2**32], [2**63, 2], [0, 2000], [40, 50, 0]])
def test_shape_against_numel(f32_buffer, shape):
    _, buf = f32_buffer
    f = fields(buf)
    f.update(ndim=len(shape), shape=shape)
    with pytest.raises(CorruptDataError):
        decode(pack(f))


def test_the_same_count_in_another_shape_is_still_that_tensor(f32_buffer):
    x, buf = f32_buffer
    f = fields(buf)
    f.update(ndim=1, shape=[2000])
    assert torch.equal(decode(pack(f)), decode(buf).reshape(-1))


def test_a_stream_of_another_tensor_is_corrupt(f32_buffer):
    _, buf = f32_buffer
    other = fields(codec.compress(torch.randn(1234), 1e-3, codec="sz3").to_bytes())["stream"]
    f = fields(buf)
    f.update(stream=other, n_stream=len(other))
    with pytest.raises(CorruptDataError):
        decode(pack(f))


# ---- fuzz ----

def test_truncation_at_every_length(f32_buffer):
    _, buf = f32_buffer
    for n in range(len(buf)):
        with pytest.raises(CorruptDataError):
            decode(buf[:n])
        with pytest.raises(CorruptDataError):
            decode(with_crc(buf[: max(n - 4, 0)]))  # the CRC agrees: the lengths must not


def test_bit_flips_in_the_stream_with_the_crc_recomputed(f32_buffer):
    # SZ3's own parsing raises IndexError, ValueError or RuntimeError on these, or decodes garbage
    x, buf = f32_buffer
    f = fields(buf)
    start = len(buf) - 4 - f["n_stream"]
    rng = np.random.default_rng(0)
    for _ in range(600):
        body = bytearray(buf[:-4])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(start, len(body)))
            body[pos] ^= 1 << int(rng.integers(0, 8))
        must_be_corrupt_or_valid(with_crc(bytes(body)), x.shape)


def test_random_bytes_in_the_stream_with_the_crc_recomputed(f32_buffer):
    x, buf = f32_buffer
    f = fields(buf)
    rng = np.random.default_rng(1)
    for _ in range(300):
        stream = bytearray(f["stream"])
        pos = int(rng.integers(0, len(stream)))
        n = int(rng.integers(1, 17))
        stream[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if rng.random() < 0.3:  # and shortened or lengthened, the header agreeing
            stream = stream[: int(rng.integers(0, len(stream)))] if rng.random() < 0.5 else stream + stream[:37]
        g = dict(f, stream=bytes(stream), n_stream=len(stream))
        must_be_corrupt_or_valid(pack(g), x.shape)


def test_bit_flips_anywhere_with_the_crc_recomputed(bf16_with_exceptions):
    x, buf = bf16_with_exceptions
    rng = np.random.default_rng(2)
    for _ in range(600):
        body = bytearray(buf[:-4])
        pos = int(rng.integers(0, len(body)))
        body[pos] ^= 1 << int(rng.integers(0, 8))
        must_be_corrupt_or_valid(with_crc(bytes(body)), x.shape)


def test_every_header_byte_set_to_extremes(f32_buffer):
    x, buf = f32_buffer
    for pos in range(HEADER.size + 16):
        for value in (0x00, 0x01, 0x7F, 0x80, 0xFF):
            body = bytearray(buf[:-4])
            body[pos] = value
            must_be_corrupt_or_valid(with_crc(bytes(body)), x.shape)


# ---- what compress refuses, rather than write a buffer that cannot be decompressed ----

@pytest.mark.parametrize("name", codec.CODECS)
def test_rel_bound_that_overflows_is_refused_at_compress(name):
    x = torch.tensor([-3e38, 3e38, 1.0])
    with pytest.raises(InvalidBoundError, match="rel"):
        codec.compress(x, 1e300, mode="rel", codec=name)
    with pytest.raises(InvalidBoundError, match="meanabs"):
        codec.compress(x, 1e300, mode="meanabs", codec=name)


@pytest.mark.parametrize("name", codec.CODECS)
def test_rel_bound_that_underflows_is_refused_at_compress(name):
    x = torch.tensor([1e-30, 2e-30, 1.5e-30])
    with pytest.raises(InvalidBoundError, match="rel"):
        codec.compress(x, 1e-300, mode="rel", codec=name)


def test_tiny_and_huge_absolute_bounds_round_trip():
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(300).to(dtype)
        for eb in (5e-324, 1e-310, 1e-45, 1e38, 1e300, 1.7e308):
            ct = codec.compress(x, eb, codec="sz3")
            y = codec.CompressedTensor.from_bytes(ct.to_bytes()).decompress()
            assert max_error(x, y) <= eb, (dtype, eb)


def test_more_dimensions_than_the_container_takes_is_refused_at_compress():
    with pytest.raises(ShapeError, match="at most 8"):
        codec.compress(torch.randn([1] * 9), 0.1, codec="sz3")
    with pytest.raises(ShapeError):
        codec.compress(torch.randn([2] * 10), 0.1, codec="sz3")
    x = torch.randn([2] * 8)
    ct = codec.compress(x, 0.01, codec="sz3")
    assert max_error(x, codec.CompressedTensor.from_bytes(ct.to_bytes()).decompress()) <= 0.01


def test_a_scalar_tensor_round_trips():
    x = torch.tensor(0.75)
    ct = codec.compress(x, 0.01, codec="sz3")
    y = codec.CompressedTensor.from_bytes(ct.to_bytes()).decompress()
    assert y.shape == () and abs(float(y) - 0.75) <= 0.01
