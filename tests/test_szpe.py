"""szpe (cpp/codec/szpe_encode.cpp, cpp/kernels/szpe_decode.cpp): szp's quantised values entropy coded.
It must decode to szp's values bit for bit, give back the szp buffer byte for byte, keep the bound, and
come near the order-0 entropy of the quantised values."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import moeoffload
from moeoffload import CorruptDataError, ShapeError, _native, codec
from moeoffload.codec_eval import order0_bits

from conftest import DTYPES, cuda_available, fix_crc, max_error


def adversarial(dtype):
    g = torch.Generator().manual_seed(5)
    yield "gaussian", torch.randn(33, 257, generator=g) * 0.02
    yield "constant", torch.full((9, 64), 0.37)
    yield "zeros", torch.zeros(4, 96)
    t = torch.distributions.StudentT(2.0).sample((40, 128)) * 0.01
    yield "heavy-tailed", t
    x = torch.randn(16, 200, generator=g) * 0.01
    x[3, 17] = 40.0
    yield "single outlier", x
    yield "tiny", torch.tensor([0.5])
    yield "ragged", torch.randn(3, 5, 7, generator=g)
    yield "one row", torch.randn(1, 100003, generator=g) * 0.05
    yield "empty", torch.zeros(0, 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eb", [1e-3, 0.02])
def test_decodes_to_szp_bit_for_bit(dtype, eb):
    for name, x in adversarial(dtype):
        x = x.to(dtype)
        fixed = codec.compress(x, eb)
        coded = codec.compress(x, eb, codec="szpe")
        assert coded.n_exceptions == fixed.n_exceptions, name
        a, b = fixed.decompress(), coded.decompress()
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
        assert np.array_equal(coded.to_szp().buffer, fixed.buffer), name
        # the size of what it transcodes to is known from the header alone (a cache slot's size)
        assert _native.szpe_inspect(coded.buffer)["szp_total_bytes"] == fixed.buffer.size, name
        if x.numel():
            assert max_error(x, b) <= coded.eb, name


def test_exceptions_survive_both_ways():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).half()
    x[0, 5], x[9, 60] = 65504, -65504  # no q*step within eb rounds to a finite half: kept exactly
    fixed = codec.compress(x, 20000.0)
    coded = codec.compress(x, 20000.0, codec="szpe")
    assert fixed.n_exceptions > 0 and coded.n_exceptions == fixed.n_exceptions
    assert np.array_equal(coded.to_szp().buffer, fixed.buffer)
    assert torch.equal(coded.decompress(), fixed.decompress())


def _exceptions_in_many_streams(dtype):
    """(szp tensor, szpe buffers of it at 1, 3 and 40 rows a stream) with exceptions in several rows,
    two in one row: szpe keeps them per stream (position, bits at the dtype's width)."""
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(9)).to(dtype)
    big = 65504.0 if dtype == torch.float16 else 3.4e38  # q * step rounds past the largest finite value
    for r in (0, 3, 4, 17, 39):
        x[r, r % 64], x[r, 63 - r % 64] = big, -big
    fixed = codec.compress(x, 0.3 * big)
    assert fixed.n_exceptions >= 5
    return fixed, [np.asarray(_native.szpe_from_szp(fixed.buffer, g)) for g in (1, 3, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exceptions_in_many_streams_land_in_szps_table(dtype):
    """Each stream's transcode writes its segments' part of szp's per-segment exception table, byte
    for byte the encoder's; the value decoder puts them back."""
    fixed, bufs = _exceptions_in_many_streams(dtype)
    for buf in bufs:
        assert _native.szpe_inspect(buf)["n_exceptions"] == fixed.n_exceptions
        assert np.array_equal(_native.szpe_to_szp(buf), fixed.buffer)
        out = torch.empty(fixed.shape, dtype=dtype)
        _native.szpe_decode(buf, out, True)
        assert torch.equal(out, fixed.decompress())


@pytest.mark.parametrize("stream_segments", [1, 2, 7, 300])
def test_any_stream_length_gives_the_same_values(stream_segments):
    x = (torch.randn(301, 96, generator=torch.Generator().manual_seed(2)) * 0.05).to(torch.bfloat16)
    fixed = codec.compress(x, 2e-3)
    buf = _native.szpe_from_szp(fixed.buffer, stream_segments)
    info = _native.szpe_inspect(buf)
    assert info["n_streams"] == -(-301 // stream_segments)
    assert np.array_equal(_native.szpe_to_szp(buf), fixed.buffer)
    with pytest.raises(ShapeError, match="2\\^24"):
        _native.szpe_from_szp(fixed.buffer, 2**24)


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_size_is_near_the_order0_entropy_and_below_szp(k):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(512, 1024, generator=g) * 0.02).to(torch.bfloat16)
    eb = k * 0.02
    fixed, coded = codec.compress(x, eb), codec.compress(x, eb, codec="szpe")
    h0 = order0_bits(fixed)
    assert coded.nbytes * 8 <= 1.08 * h0
    assert coded.nbytes < 0.8 * fixed.nbytes


def test_escapes_code_rare_large_values():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(4)) * 0.01
    x.view(-1)[::997] = 5.0  # a few values far outside the alphabet
    coded = codec.compress(x, 1e-3, codec="szpe")
    info = _native.szpe_inspect(coded.buffer)
    assert info["n_escapes"] >= x.numel() // 997 and info["alphabet"] < 256
    assert info["escape_bytes"] == 2  # every escaped value within 2^16 of the alphabet: u16
    assert torch.equal(coded.decompress(), codec.compress(x, 1e-3).decompress())
    x.view(-1)[5] = 500.0  # q = 250000: past what a u16 holds, so every escape takes a u32
    coded = codec.compress(x, 1e-3, codec="szpe")
    assert _native.szpe_inspect(coded.buffer)["escape_bytes"] == 4
    assert np.array_equal(coded.to_szp().buffer, codec.compress(x, 1e-3).buffer)



_EVERY_WIDTH = """
import numpy as np, torch, moeoffload
from moeoffload import codec
widths = set()
def check(x, eb):
    fixed, coded = codec.compress(x, eb), codec.compress(x, eb, codec="szpe")
    widths.update(int(w) for w in codec.width_histogram(fixed).nonzero()[0])
    assert np.array_equal(coded.to_szp().buffer, fixed.buffer), (x.dtype, eb)
    assert torch.equal(coded.decompress().view(torch.uint8), fixed.decompress().view(torch.uint8)), (x.dtype, eb)
for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):
    g = torch.Generator().manual_seed(i)
    x = (torch.randn(97, 1000, generator=g) * torch.logspace(-3, 1, 1000)).to(dtype)
    for eb in (2.5e-6, 3e-5, 1e-3, 0.05):
        check(x, eb)
x = torch.randn(97, 1000, generator=g)
check(x, float(x.abs().max()) / (2**25 - 8) * 1.01)  # |q| near 2^24: width 25
assert widths >= set(range(26)), sorted(set(range(26)) - widths)
print(moeoffload.backend_info()["cpu_isa"])
"""


def test_every_simd_path_gives_szps_bytes_at_every_width():
    """The CPU decoders step the 32 rANS states and pack szp blocks with the SIMD path cpu_isa() picked
    (rans_block.h, block_pack.h): each path this CPU has must give szp's buffer and values bit for
    bit, at every block width 0..25, with escapes, short blocks and stream ends."""
    ran = set()
    for isa in ("avx512", "avx2", "portable"):
        env = {**os.environ, "MOEOFFLOAD_ISA": isa}
        out = subprocess.run([sys.executable, "-c", _EVERY_WIDTH], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        ran.add(out.stdout.split()[-1])
    assert "portable" in ran
    assert ran >= {moeoffload.backend_info()["cpu_isa_supported"]}, ran


def test_from_bytes_and_decompress_into():
    x = torch.randn(20, 40, generator=torch.Generator().manual_seed(6)).to(torch.float16)
    coded = codec.compress(x, 0.01, codec="szpe")
    again = codec.CompressedTensor.from_bytes(coded.to_bytes())
    assert again.codec == "szpe" and again.shape == x.shape
    out = torch.empty_like(x)
    assert torch.equal(again.decompress(out=out), codec.compress(x, 0.01).decompress())


def _cuda_decodes(host: np.ndarray, shape, dtype) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """cuda/szpe_decode.cu on a device copy of `host`: (the transcoded szp buffer, the values decoded
    from it, the values decoded directly), each checked for a clean flag."""
    stream = torch.cuda.current_stream().cuda_stream
    dev = torch.from_numpy(host).cuda()
    szp = torch.empty(_native.szpe_inspect(host)["szp_total_bytes"], dtype=torch.uint8, device="cuda")
    failed = torch.zeros(1, dtype=torch.int32, device="cuda")
    via_szp = torch.full(shape, float("nan"), dtype=dtype, device="cuda")  # poisoned: all must be written
    _native.szpe_decode_cuda(host, dev, szp, failed, via_szp, stream)
    assert failed.item() == 0
    direct = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    _native.szpe_decode_values_cuda(host, dev, failed, direct, stream)
    assert failed.item() == 0
    return szp.cpu().numpy(), via_szp.cpu(), direct.cpu()


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_transcode_gives_the_szp_buffer_and_its_values(dtype):
    # cuda/szpe_decode.cu, a warp a stream: the transcode (the runtime's arrival step on a GPU) byte for
    # byte the szp buffer, whose values the szp CUDA decoder gives bit for bit as the CPU does, and the
    # direct decode the same values; at the default stream length and at 1 and 3 rows a stream (many
    # warps, ragged last streams); a corrupt stream sets the flag.
    for name, x in adversarial(dtype):
        x = x.to(dtype)
        fixed = codec.compress(x, 2e-3)
        coded = codec.compress(x, 2e-3, codec="szpe")
        want = fixed.decompress().view(torch.uint8)
        for host in (coded.buffer, *(np.asarray(_native.szpe_from_szp(fixed.buffer, g)) for g in (1, 3))):
            szp, via_szp, direct = _cuda_decodes(host, x.shape, dtype)
            assert np.array_equal(szp, fixed.buffer), name
            assert torch.equal(via_szp.view(torch.uint8), want), name
            assert torch.equal(direct.view(torch.uint8), want), name
        assert torch.equal(coded.decompress(device="cuda").cpu().view(torch.uint8), want), name
    host = codec.compress(next(adversarial(dtype))[1].to(dtype), 2e-3, codec="szpe").buffer  # gaussian, one stream
    at = host.size - 4 - _native.szpe_inspect(host)["payload_bytes"] + 128 + 17  # the first stream's words, past its states
    for flip in range(1, 256):  # a change the stream check catches (a few decode to other values)
        broken = host.copy()
        broken[at] ^= flip
        broken = fix_crc(broken)
        with pytest.raises(CorruptDataError) as e:
            _native.szpe_to_szp(broken)
        if "stream" in str(e.value):
            break
    with pytest.raises(CorruptDataError, match="on the device"):
        codec.CompressedTensor.from_bytes(broken).decompress(device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_transcode_writes_exceptions_of_many_streams(dtype):
    # The device warps write their streams' exception entries and offsets, block 0 the last offset;
    # the direct decode patches each stream's exceptions after its values.
    fixed, bufs = _exceptions_in_many_streams(dtype)
    for buf in bufs:
        szp, via_szp, direct = _cuda_decodes(buf, fixed.shape, dtype)
        assert np.array_equal(szp, fixed.buffer)
        assert torch.equal(via_szp, fixed.decompress())
        assert torch.equal(direct, fixed.decompress())
