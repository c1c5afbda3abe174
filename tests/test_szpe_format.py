"""Parsing and validation of szpe buffers (cpp/codec/szpe_format.cpp, the stream checks of
cpp/kernels/szpe_decode.cpp): the corruption fuzz, over every section (header, frequency table, stream
offsets, escape index, exception table, escapes, rANS streams). Each buffer is mutated and, in half the
cases, its CRC recomputed so the checks behind the checksum run too: decoding to values and back to
szp must raise CorruptDataError or succeed (and then give a valid szp buffer), never crash."""

import numpy as np
import pytest
import torch

from conftest import fix_crc, fuzz_bit_flips, word_mutations
from moeoffload import CorruptDataError, FormatVersionError, UnsupportedDtypeError, _native, codec


SZP_HEADER_BYTES = 64  # where szp's shape starts (docs/format.md)


def _valid_buffers():
    g = torch.Generator().manual_seed(0)
    yield codec.compress(torch.randn(7, 70, generator=g), 0.01, codec="szpe").buffer
    x = torch.randn(300, generator=g).to(torch.bfloat16)
    x[::37] = 30.0  # escapes
    yield codec.compress(x, 1e-3, codec="szpe").buffer
    x = torch.randn(16, 64, generator=g).half()
    x[0, 5], x[9, 60] = 65504, -65504  # exceptions
    yield codec.compress(x, 20000.0, codec="szpe").buffer
    yield np.asarray(_native.szpe_from_szp(codec.compress(torch.randn(3, 4, 5, generator=g).half(), 0.1).buffer, 1))
    yield codec.compress(torch.zeros(0, 5), 0.1, codec="szpe").buffer
    yield codec.compress(torch.zeros(6, 33), 0.1, codec="szpe").buffer
    x = torch.randn(9, 20, generator=g)
    x[1, 2], x[4, 0], x[4, 19], x[8, 7] = 3.4e38, -3.4e38, 3.4e38, -3.4e38  # exceptions in several streams
    yield np.asarray(_native.szpe_from_szp(codec.compress(x, 1e38).buffer, 2))
    x = torch.randn(5, 50, generator=g) * 0.01
    x[2, 3], x[4, 9] = 500.0, -20.0  # escapes stored as u32
    yield codec.compress(x, 1e-3, codec="szpe").buffer


def _decode(buf: np.ndarray):
    try:
        info = _native.szpe_inspect(buf, True)
    except CorruptDataError:
        return
    if info["numel"] > 10**6:
        return  # a valid szpe of a constant tensor is tiny for its size: nothing to learn from decoding it
    dtype = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}[info["dtype"]]
    out = torch.empty(info["numel"], dtype=dtype)
    try:
        _native.szpe_decode(buf, out, True)
    except CorruptDataError:
        pass
    try:
        szp = _native.szpe_to_szp(buf, True)
    except CorruptDataError:
        return
    # What the transcoder writes is always a structurally valid szp buffer of the size szpe states (its
    # CRC is the one szpe stored: a change that decodes still fails it), so a kernel never reads outside it.
    assert _native.szp_inspect(szp, False)["total_bytes"] == info["szp_total_bytes"] == szp.size


def test_sections_are_present():
    infos = [_native.szpe_inspect(b) for b in _valid_buffers()]
    assert infos[1]["n_escapes"] > 0 and infos[2]["n_exceptions"] > 0
    assert infos[3]["n_streams"] == 12 and infos[4]["numel"] == 0
    assert infos[6]["n_exceptions"] == 4 and infos[6]["n_streams"] == 5
    assert infos[7]["escape_bytes"] == 4 and infos[1]["escape_bytes"] == 2


def test_bit_flips_never_crash():
    assert fuzz_bit_flips(_valid_buffers(), _native.szpe_inspect, _decode, 700) >= 4000


def test_every_word_set_to_edge_values_never_crashes():
    rng = np.random.default_rng(11)
    edge = [0, 1, 2**12, 2**13, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
    for buf in _valid_buffers():
        for mutated in word_mutations(buf, rng, 2, buf.size, edge):
            _decode(mutated)


def test_stream_bytes_that_do_not_decode_are_corrupt():
    # A changed rANS byte shows when its stream does not use up exactly its bytes and escapes, or does
    # not end in the encoder's initial states. A few changes decode to other valid values; the szpe
    # CRC (here recomputed on purpose) and then the CRC of the szp buffer it was made from catch those.
    buf = next(_valid_buffers())
    info = _native.szpe_inspect(buf)
    payload_at = buf.size - 4 - info["payload_bytes"]
    caught = total = 0
    for pos in range(payload_at, buf.size - 4):
        mutated = buf.copy()
        mutated[pos] ^= 0x5A
        with pytest.raises(CorruptDataError, match="CRC32"):
            _native.szpe_to_szp(mutated, True)
        with pytest.raises(CorruptDataError, match="stream 0|CRC32 it was made with") as e:
            _native.szpe_to_szp(fix_crc(mutated), True)
        caught += "stream 0" in str(e.value)
        total += 1
    assert total > 100 and caught >= 0.95 * total


def test_random_bytes_and_truncations_raise_corrupt_data():
    rng = np.random.default_rng(3)
    for _ in range(1000):
        junk = rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8)
        junk[:4] = np.frombuffer(b"MSZE", np.uint8)[: min(4, junk.size)]
        with pytest.raises(CorruptDataError):
            _native.szpe_inspect(junk, True)
    for buf in _valid_buffers():
        for cut in range(0, buf.size, max(1, buf.size // 150)):
            with pytest.raises(CorruptDataError):
                codec.CompressedTensor.from_bytes(buf[:cut].tobytes())
            _decode(fix_crc(buf[:cut]))


def test_decoders_refuse_an_output_of_another_dtype_or_layout():
    buf = next(_valid_buffers())  # float32 values
    n = _native.szpe_inspect(buf)["numel"]
    with pytest.raises(UnsupportedDtypeError):
        _native.szpe_decode(buf, torch.empty(n, dtype=torch.int32), True)  # the same bytes, another dtype
    with pytest.raises(TypeError):
        _native.szpe_decode(buf, torch.empty(n, 2)[:, 0], True)  # strided: a converted copy would take the values
    szp = _native.szpe_to_szp(buf)
    with pytest.raises(UnsupportedDtypeError):
        _native.szp_decode(szp, torch.empty(n, dtype=torch.int32), True)


def test_shapes_past_int64_are_corrupt():
    # A tensor with a zero dimension has no values, but its other dimensions still make torch's sizes and
    # strides: beyond 2^63 - 1 no tensor exists, so both parsers refuse the shape by name.
    x = torch.zeros(0, 5)
    for buf, shape_at, inspect in ((codec.compress(x, 0.1).buffer, SZP_HEADER_BYTES, _native.szp_inspect),
                                   (codec.compress(x, 0.1, codec="szpe").buffer, 96, _native.szpe_inspect)):
        for dims in ([2**63, 0], [0, 2**64 - 1]):
            mutated = np.array(buf)
            mutated[shape_at:shape_at + 16] = np.frombuffer(np.array(dims, np.uint64).tobytes(), np.uint8)
            with pytest.raises(CorruptDataError, match="2\\^63"):
                inspect(fix_crc(mutated), True)


def test_another_version_is_named():
    buf = next(_valid_buffers()).copy()
    buf[4] = 9
    with pytest.raises(FormatVersionError, match="version 9"):
        _native.szpe_inspect(fix_crc(buf), True)
    for old in (2, 3):  # 2: before per-stream exceptions and 13-bit frequencies; 3: four states a stream
        buf[4] = old
        with pytest.raises(FormatVersionError, match=f"version {old} is older.*re-encode"):
            _native.szpe_inspect(fix_crc(buf), True)


def test_a_misaligned_stream_offset_is_refused():
    # A GPU reads a stream's words as u16 and writes its szp blocks as u32: an odd stream offset, or an szp
    # offset off a multiple of 4, would fault there (and end the CUDA context), so parse refuses both.
    fixed = codec.compress(torch.randn(40, 64, generator=torch.Generator().manual_seed(3)), 0.01)
    buf = np.asarray(_native.szpe_from_szp(fixed.buffer, 3))
    info = _native.szpe_inspect(buf)
    n = info["n_streams"]
    stream_offsets_at = 96 + 8 * len(info["shape"]) + 2 * ((info["alphabet"] + 3) & ~3)
    szp_offsets_at = stream_offsets_at + 2 * 8 * (n + 1)  # after the escape index
    for at, delta in ((stream_offsets_at + 8, 1), (szp_offsets_at + 8, 2)):
        mutated = buf.copy()
        mutated[at:at + 8] = np.frombuffer((int(np.frombuffer(buf[at:at + 8].tobytes(), np.uint64)[0]) + delta)
                                           .to_bytes(8, "little"), np.uint8)
        with pytest.raises(CorruptDataError, match="misaligned"):
            _native.szpe_inspect(fix_crc(mutated), True)
