"""The Python codec API (python/moeoffload/codec.py): both codecs, errors, serialisation."""

import numpy as np
import pytest
import torch
from conftest import DTYPES, cuda_available, max_error

from moeoffload import (
    CodecError,
    CorruptDataError,
    CudaError,
    InvalidArgumentError,
    InvalidBoundError,
    NonFiniteError,
    UnsupportedDtypeError,
    codec,
)


@pytest.mark.parametrize("name", codec.CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bound_and_bytes(name, dtype):
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * 0.05).to(dtype)
    ct = codec.compress(x, 1e-3, codec=name)
    y = ct.decompress()
    assert y.dtype == dtype and y.shape == x.shape
    assert max_error(x, y) <= 1e-3
    assert ct.ratio == pytest.approx(x.numel() * x.element_size() / ct.nbytes)
    assert ct.nbytes == len(ct.to_bytes())
    back = codec.CompressedTensor.from_bytes(ct.to_bytes())
    assert back.codec == name and back.eb == ct.eb and back.shape == x.shape
    assert torch.equal(back.decompress(), y)


@pytest.mark.parametrize("name", codec.CODECS)
def test_bf16_rounding_never_breaks_the_bound(name):
    # bf16 keeps 8 significant bits: a naive round trip at eb breaks the bound
    torch.manual_seed(1)
    x = torch.randn(256, 512).to(torch.bfloat16)
    for eb in (0.05, 0.013, 0.1):
        ct = codec.compress(x, eb, codec=name)
        assert max_error(x, ct.decompress()) <= eb
        assert max_error(x, ct.decompress(torch.float32)) <= eb


def test_rel_mode_uses_the_range():
    x = torch.linspace(-2, 6, 1000)
    ct = codec.compress(x, 0.01, mode="rel")
    assert ct.eb == pytest.approx(0.08)
    assert max_error(x, ct.decompress()) <= ct.eb
    const = torch.full((10,), 3.0)
    assert codec.compress(const, 0.01, mode="rel").eb == pytest.approx(0.03)


def test_numpy_input_and_output_dtype_device():
    x = np.random.default_rng(0).standard_normal((33, 17)).astype(np.float16)
    ct = codec.compress(x, 0.01, codec="szp")
    y = ct.decompress(dtype=torch.float32, device="cpu")
    assert y.dtype == torch.float32
    assert max_error(torch.from_numpy(x), y) <= 0.01


def test_decompress_into_a_reusable_buffer():
    from moeoffload import ShapeError

    x = torch.randn(30, 40).to(torch.bfloat16)
    ct = codec.compress(x, 0.01)
    out = torch.empty_like(x)
    assert ct.decompress(out=out) is out
    assert torch.equal(out, ct.decompress())
    with pytest.raises(ShapeError):
        ct.decompress(out=torch.empty(30, 40))
    with pytest.raises(UnsupportedDtypeError):
        codec.compress(x, 0.01, codec="sz3").decompress(out=out)


def test_non_contiguous_and_empty_tensors_work():
    x = torch.randn(40, 30).t()
    assert not x.is_contiguous()
    for name in codec.CODECS:
        assert max_error(x, codec.compress(x, 0.01, codec=name).decompress()) <= 0.01
        empty = torch.zeros(0, 7)
        y = codec.compress(empty, 0.1, codec=name).decompress()
        assert y.shape == (0, 7)


@pytest.mark.parametrize("name", codec.CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_named(name, bad):
    x = torch.randn(10, 10)
    x[3, 4] = bad
    with pytest.raises(NonFiniteError, match="flat index 34"):
        codec.compress(x, 0.1, codec=name)


@pytest.mark.parametrize("eb", [0, -1.0, float("nan"), float("inf"), "0.1", None])
def test_bad_bounds_are_named(eb):
    with pytest.raises(InvalidBoundError):
        codec.compress(torch.randn(4, 4), eb)


def test_bad_mode_codec_dtype_are_named():
    with pytest.raises(InvalidBoundError, match="mode"):
        codec.compress(torch.randn(4), 0.1, mode="relative")
    with pytest.raises(UnsupportedDtypeError, match="codec"):
        codec.compress(torch.randn(4), 0.1, codec="zstd")
    for x in (torch.randn(4).double(), torch.arange(4), np.arange(4), [1.0, 2.0]):
        with pytest.raises(UnsupportedDtypeError):
            codec.compress(x, 0.1)
    assert issubclass(UnsupportedDtypeError, CodecError)
    from moeoffload.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="meta device"):
        codec.compress(torch.randn(4, device="meta"), 0.1)
    with pytest.raises(InvalidArgumentError, match="to_dense"):
        codec.compress(torch.randn(4, 4).to_sparse(), 0.1)


def test_sz3_buffer_corruption_is_named():
    ct = codec.compress(torch.randn(50, 50), 0.01, codec="sz3")
    raw = bytearray(ct.to_bytes())
    raw[len(raw) // 2] ^= 0x10
    with pytest.raises(CorruptDataError, match="CRC32"):
        codec.CompressedTensor.from_bytes(bytes(raw))
    with pytest.raises(CorruptDataError):
        codec.CompressedTensor.from_bytes(ct.to_bytes()[:-9])


def test_sz3_shape_beyond_int64_is_corrupt():
    # an empty tensor's other dimension set to 2^63 + 4 (CRC recomputed) parsed, then repr and decompress
    # met numpy's ValueError and torch's TypeError; szp names it CorruptDataError
    import struct
    import zlib

    buf = bytearray(codec.compress(torch.zeros(0, 4), 1e-3, codec="sz3").to_bytes())
    buf[48:56] = (2**63 + 4).to_bytes(8, "little")  # the second shape entry
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    with pytest.raises(CorruptDataError, match="2\\^63"):
        codec.CompressedTensor.from_bytes(bytes(buf))


def test_from_bytes_takes_any_bytes_like_and_names_the_rest():
    b = codec.compress(torch.randn(4, 40), 1e-3).to_bytes()
    doubled = np.frombuffer(bytes(x for pair in zip(b, b) for x in pair), np.uint8)
    for strided in (doubled[::2], memoryview(bytearray(doubled.tobytes()))[::2]):  # (BufferError before)
        assert codec.CompressedTensor.from_bytes(strided).to_bytes() == b
    for bad in ("MSZP....", None, 5, [1, 2], torch.zeros(4, dtype=torch.uint8)):
        with pytest.raises(TypeError, match="bytes-like"):
            codec.CompressedTensor.from_bytes(bad)


def test_decoding_into_a_tensor_that_requires_grad_is_refused():
    ct = codec.compress(torch.randn(4, 40), 1e-3)
    out = torch.zeros(4, 40, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match="requires grad"):
        ct.decompress(out=out)
    with torch.no_grad():  # as torch allows an in-place write there
        assert ct.decompress(out=out) is out
    with pytest.raises(Exception, match="out must be a torch.Tensor"):
        ct.decompress(out=np.zeros((4, 40), np.float32))


def test_sz3_keeps_exceptions_exactly_for_bf16():
    torch.manual_seed(2)
    x = torch.randn(128, 256).to(torch.bfloat16)
    ct = codec.compress(x, 0.05, codec="sz3")  # a round bound on the bf16 grid: some values need exceptions
    assert ct.n_exceptions > 0
    assert max_error(x, ct.decompress()) <= 0.05


def test_cuda_decode_without_gpu_is_named():
    if cuda_available() or torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for name in ("szp", "szpe", "sz3"):  # sz3 met torch's AssertionError ("Torch not compiled with CUDA")
        ct = codec.compress(torch.randn(4, 4), 0.1, codec=name)
        with pytest.raises(CudaError):
            ct.decompress(device="cuda")
        with pytest.raises(InvalidArgumentError, match="not a device"):
            ct.decompress(device="bogus")


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_decode_equals_cpu_bit_for_bit(dtype):
    for seed, (shape, eb) in enumerate([((513, 1000), 1e-3), ((64, 4096), 0.05), ((20000,), 1e-4), ((0, 5), 0.1)]):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3).to(dtype)
        if dtype == torch.float16 and x.numel():
            x.view(-1)[0] = 65504
            eb = max(eb, 1e-2)
        ct = codec.compress(x, eb)
        cpu = ct.decompress()
        gpu = ct.decompress(device="cuda")
        assert gpu.is_cuda
        assert torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))


def test_from_bytes_takes_a_fortran_ordered_array():
    # memoryview calls it contiguous (in Fortran order), and numpy's frombuffer met a BufferError
    b = codec.compress(torch.randn(4, 40), 1e-3).to_bytes()
    assert len(b) % 4 == 0  # (szp buffers are padded to 4 bytes)
    f = np.asfortranarray(np.frombuffer(b, np.uint8).reshape(4, -1))
    assert not f.flags.c_contiguous
    assert codec.CompressedTensor.from_bytes(f).to_bytes() == b  # read in logical order, as bytes(f) is
