"""The CUDA entry points of cuda/*.cu on the CPU emulator (a library built from them as C++, see
emulated_kernels.cpp) against the CPU kernels, in a process of its own so that AddressSanitizer can
come first: `python checks.py LIBRARY CHECK`, CHECK one of CHECKS. Exits 0 when the check holds;
tests/test_cuda_emulation.py builds the library and runs each check."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared inputs

from moeoffload import CorruptDataError, _native, codec, ops  # noqa: E402

from conftest import DTYPES, fix_crc  # noqa: E402
from test_szpe import _exceptions_in_many_streams, adversarial  # noqa: E402

DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gptoss": 4}
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # tests/test_ops.py's, doubled below


class Emulated:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.emu_error.restype = ctypes.c_char_p

    def _call(self, name: str, *args) -> int:
        rc = getattr(self.lib, name)(*args)
        if rc == -1:
            raise RuntimeError(f"{name}: {self.lib.emu_error().decode()}")
        assert rc == 0, f"{name} returned cudaError {rc}"
        return rc

    @staticmethod
    def _buf(a: np.ndarray):
        return ctypes.c_void_p(a.ctypes.data), ctypes.c_uint64(a.size)

    def szp_decode(self, buf: np.ndarray, shape, dtype) -> torch.Tensor:
        out = torch.full(shape, float("nan"), dtype=dtype)
        self._call("emu_szp_decode", *self._buf(buf), ctypes.c_void_p(out.data_ptr()))
        return out

    def szpe(self, buf: np.ndarray, shape, dtype) -> tuple[bytes | None, bytes | None]:
        """(the transcoded szp buffer, the values), None where a warp flagged a corrupt stream."""
        info = _native.szpe_inspect(buf, False)
        szp = np.full(info["szp_total_bytes"], 0xA5, np.uint8)
        failed = ctypes.c_int(0)
        self._call("emu_szpe_to_szp", *self._buf(buf), ctypes.c_void_p(szp.ctypes.data), ctypes.byref(failed))
        got_szp = None if failed.value else szp.tobytes()
        out = torch.full(shape, float("nan"), dtype=dtype)
        failed = ctypes.c_int(0)
        self._call("emu_szpe_values", *self._buf(buf), ctypes.c_void_p(out.data_ptr()), ctypes.byref(failed))
        return got_szp, None if failed.value else out.view(torch.uint8).numpy().tobytes()

    def szp_linear(self, x: torch.Tensor, w) -> torch.Tensor:
        y = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype)
        self._call("emu_szp_linear", *self._buf(w.buffer), ctypes.c_void_p(x.data_ptr()),
                   ctypes.c_int(DTYPE_CODES[x.dtype]), ctypes.c_uint32(x.shape[0]), ctypes.c_void_p(y.data_ptr()))
        return y

    @staticmethod
    def _gate(act, layout, alpha, limit):
        return (ctypes.c_int(ACT_CODES[act]), ctypes.c_int(ops.GATE_LAYOUTS[layout]), ctypes.c_float(alpha),
                ctypes.c_float(limit))

    def expert_mlp(self, x, gu, dn, act, layout, alpha, limit, gu_bias=None, dn_bias=None) -> torch.Tensor:
        T, I = x.shape[0], dn.shape[1]
        y = torch.full_like(x, float("nan"))
        scratch = torch.full((T * 2 * I,), float("nan"))
        ptr = lambda t: ctypes.c_void_p(None if t is None else t.data_ptr())  # noqa: E731
        self._call("emu_expert_mlp", *self._buf(gu.buffer), *self._buf(dn.buffer), ptr(x),
                   ctypes.c_int(DTYPE_CODES[x.dtype]), ctypes.c_uint32(T), *self._gate(act, layout, alpha, limit),
                   ptr(gu_bias), ptr(dn_bias), ptr(scratch), ptr(y))
        return y

    def moe_experts(self, x, idx, w, experts, act, layout, alpha, limit, gu_bias=None, dn_bias=None):
        E, (T, k) = len(experts), idx.shape
        H, I = x.shape[1], experts[0][1].shape[1]
        arr = lambda vals, t: (t * E)(*vals)  # noqa: E731
        gu = arr([ctypes.cast(ctypes.c_void_p(g.buffer.ctypes.data), ctypes.POINTER(ctypes.c_uint8)) for g, _ in experts],
                 ctypes.POINTER(ctypes.c_uint8))
        dn = arr([ctypes.cast(ctypes.c_void_p(d.buffer.ctypes.data), ctypes.POINTER(ctypes.c_uint8)) for _, d in experts],
                 ctypes.POINTER(ctypes.c_uint8))
        gl = arr([g.buffer.size for g, _ in experts], ctypes.c_uint64)
        dl = arr([d.buffer.size for _, d in experts], ctypes.c_uint64)
        gb = None if gu_bias is None else arr([gu_bias[e].data_ptr() for e in range(E)], ctypes.c_void_p)
        db = None if dn_bias is None else arr([dn_bias[e].data_ptr() for e in range(E)], ctypes.c_void_p)
        index = idx.to(torch.int64).contiguous()
        weights = w.to(torch.float32).contiguous()
        out = torch.full_like(x, float("nan"))
        scratch = torch.full((_native.moe_experts_cuda_scratch(T * k, H, I),), float("nan"))
        self._call("emu_moe_experts", ctypes.c_uint32(E), gu, gl, dn, dl, gb, db, ctypes.c_void_p(index.data_ptr()),
                   ctypes.c_uint32(T), ctypes.c_uint32(k), ctypes.c_void_p(weights.data_ptr()),
                   ctypes.c_void_p(x.data_ptr()), ctypes.c_int(DTYPE_CODES[x.dtype]),
                   *self._gate(act, layout, alpha, limit), ctypes.c_void_p(scratch.data_ptr()),
                   ctypes.c_void_p(out.data_ptr()))
        return out

    def _failed(self, what: str) -> RuntimeError:
        self.lib.emu_arrival_error.restype = ctypes.c_char_p
        return RuntimeError(f"{what}: {self.lib.emu_arrival_error().decode()}")

    def arrivals(self, experts: list[list[tuple[np.ndarray, bool]]], streams: int,
                 issue_ahead: int = 8) -> list[tuple[bytes, str]]:
        """Each expert's (buffer, is szpe) matrices through the runtime's store, copy engine and arrival
        step: (its device slot, read back; the transfer's error or "")."""
        sizes = [resident_bytes(e) for e in experts]
        slots = [np.full(n, 0x5A, np.uint8) for n in sizes]
        errors = ctypes.create_string_buffer(ERROR_LEN * len(experts))
        rc = self.lib.emu_arrivals(*_experts_args(experts), ctypes.c_int(streams), ctypes.c_int(issue_ahead),
                                   _ptrs(slots), (ctypes.c_uint64 * len(sizes))(*sizes), errors,
                                   ctypes.c_uint64(ERROR_LEN))
        if rc == -1:
            raise self._failed("emu_arrivals")
        return [(slot.tobytes(), error) for slot, error in zip(slots, _errors(errors, len(experts)))]

    def faulty_fetches(self, experts, call: str, nth: int, streams: int = 2, delay: int = 40):
        """emu_faulty_fetches: (fired, [(what round one's read saw or None, round two's slot, round one's
        error) for each expert])."""
        sizes = [resident_bytes(e) for e in experts]
        seen = [np.full(n, 0x5A, np.uint8) for n in sizes]
        slots = [np.full(n, 0x5A, np.uint8) for n in sizes]
        errors = ctypes.create_string_buffer(ERROR_LEN * len(experts))
        fired = self.lib.emu_faulty_fetches(call.encode(), ctypes.c_int(nth), *_experts_args(experts),
                                            ctypes.c_int(streams), ctypes.c_int(delay), _ptrs(seen), _ptrs(slots),
                                            (ctypes.c_uint64 * len(sizes))(*sizes), errors, ctypes.c_uint64(ERROR_LEN))
        if fired == -1:
            raise self._failed(f"emu_faulty_fetches({call}, {nth})")
        out = []
        for i, error in enumerate(_errors(errors, len(experts))):
            read = error == "" or error.startswith("release ")  # its read was queued before the release
            out.append((seen[i].tobytes() if read else None, slots[i].tobytes(), error))
        return fired, out


ERROR_LEN = 512  # the bytes each expert's error has in the errors buffer of emu_arrivals and emu_faulty_fetches


def _ptrs(arrays):
    return (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))


def _experts_args(experts: list[list[tuple[np.ndarray, bool]]]) -> tuple:
    """The experts as emu_arrivals and emu_faulty_fetches take them: their count, each one's number of
    matrices, and every matrix's buffer, length and coding (1 szpe)."""
    bufs = [b for e in experts for b, _ in e]
    return (ctypes.c_uint32(len(experts)), (ctypes.c_uint32 * len(experts))(*(len(e) for e in experts)), _ptrs(bufs),
            (ctypes.c_uint64 * len(bufs))(*(b.size for b in bufs)),
            (ctypes.c_int * len(bufs))(*(int(c) for e in experts for _, c in e)))


def _errors(errors, n: int) -> list[str]:
    return [errors.raw[ERROR_LEN * i:ERROR_LEN * (i + 1)].split(b"\0")[0].decode() for i in range(n)]


def slot_layout(expert: list[tuple[np.ndarray, bool]]) -> list[tuple[int, int]]:
    """Where each matrix's buffer lies in the expert's device slot (expert_store.cpp): as in the payload
    (each buffer 8-aligned, as emu_arrivals packs it) when nothing is szpe, else the szp buffers they
    transcode to (their size from the szpe header), 64-aligned."""
    coded = any(c for _, c in expert)
    align, at, out = 64 if coded else 8, 0, []
    for buf, c in expert:
        at = (at + align - 1) // align * align
        out.append((at, _native.szpe_inspect(buf, False)["szp_total_bytes"] if coded and c else buf.size))
        at += out[-1][1]
    return out


def resident_bytes(expert) -> int:
    return sum(slot_layout(expert)[-1])


def landed_bytes(buf: np.ndarray, szpe: bool, coded: bool) -> bytes:
    """What a matrix's buffer must be in the slot: its szp buffer, or the bytes copied."""
    return bytes(np.asarray(_native.szpe_to_szp(buf, True))) if szpe and coded else buf.tobytes()


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def check_decoders(emu: Emulated) -> None:
    """szpe a warp a stream (the transcode byte for byte the szp buffer, the direct decode its values) at
    the default stream length and 1 and 3 rows a stream; szp a warp a row; poisoned outputs."""
    for dtype in DTYPES:
        for name, x in adversarial(dtype):
            if x.numel() > 20000:  # each emulated collective wakes 32 threads: the 100003-value row takes minutes
                continue
            fixed = codec.compress(x.to(dtype), 2e-3)
            values = as_bytes(fixed.decompress())
            assert as_bytes(emu.szp_decode(fixed.buffer, x.shape, dtype)) == values, (name, dtype, "szp")
            for rows in (0, 1, 3):
                buf = np.asarray(_native.szpe_from_szp(fixed.buffer, rows))
                assert emu.szpe(buf, x.shape, dtype) == (fixed.buffer.tobytes(), values), (name, dtype, rows)
        if dtype != torch.bfloat16:
            fixed, bufs = _exceptions_in_many_streams(dtype)
            for buf in bufs:
                assert emu.szpe(buf, fixed.shape, dtype) == (fixed.buffer.tobytes(), as_bytes(fixed.decompress()))


def check_misaligned(emu: Emulated) -> None:
    """A buffer 4 bytes off 8-alignment is refused (cudaErrorMisalignedAddress) before any launch by
    each entry point: a GPU faults on the kernels' u64 loads of its offset tables."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    fixed = codec.compress(x, 1e-3)
    szpe = np.asarray(_native.szpe_from_szp(fixed.buffer, 0))
    space = np.zeros(max(fixed.buffer.size, szpe.size) + 16, np.uint8)
    at = (-space.ctypes.data) % 8 + 4

    def off(buf):
        space[at:at + buf.size] = buf
        return space[at:at + buf.size]

    out, y = torch.empty(8, 64), torch.empty(1, 8)
    assert emu.lib.emu_szp_decode(*emu._buf(off(fixed.buffer)), ctypes.c_void_p(out.data_ptr())) == 716
    assert emu.lib.emu_szp_linear(*emu._buf(off(fixed.buffer)), ctypes.c_void_p(torch.ones(1, 64).data_ptr()),
                                  ctypes.c_int(DTYPE_CODES[torch.float32]), ctypes.c_uint32(1),
                                  ctypes.c_void_p(y.data_ptr())) == 716
    failed = ctypes.c_int(0)
    assert emu.lib.emu_szpe_values(*emu._buf(off(szpe)), ctypes.c_void_p(out.data_ptr()), ctypes.byref(failed)) == 716
    assert emu.szp_decode(fixed.buffer, x.shape, torch.float32).equal(fixed.decompress())  # aligned: decodes


def check_corrupt(emu: Emulated) -> None:
    """Flipped bits in the streams (states and words) and the escapes, the CRC fixed: the emulated value
    decoder and the CPU's agree on each (the same bytes, or corrupt); the emulated transcode gives the
    CPU's szp buffer where that passes its CRC check, else nothing or a buffer of the same values."""
    x = torch.distributions.StudentT(2.0).sample((24, 160)) * 0.01  # heavy tails: escapes
    fixed = codec.compress(x.to(torch.bfloat16), 1e-3)
    buf = np.asarray(_native.szpe_from_szp(fixed.buffer, 5))
    info = _native.szpe_inspect(buf)
    assert info["n_escapes"] > 0 and info["n_streams"] > 1
    payload_at = buf.size - 4 - info["payload_bytes"]
    rng = np.random.default_rng(0)
    corrupt = 0
    for at in [*rng.integers(payload_at, buf.size - 4, 24), *rng.integers(payload_at - 64, payload_at, 6)]:
        broken = buf.copy()
        broken[at] ^= 1 << int(rng.integers(0, 8))
        broken = fix_crc(broken)
        try:
            _native.szpe_inspect(broken, True)
        except CorruptDataError:
            continue  # parse refuses it: no decoder runs
        szp, values = emu.szpe(broken, x.shape, torch.bfloat16)
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        try:
            _native.szpe_decode(broken, out, True)
            want = as_bytes(out)
        except CorruptDataError:
            want = None
        assert values == want, at
        corrupt += values is None
        try:
            want_szp = bytes(np.asarray(_native.szpe_to_szp(broken, True)))
        except CorruptDataError:
            want_szp = None
        if want_szp is not None or szp is None:
            assert szp == want_szp, at
        else:  # decodes, to values other than those the szp CRC was made with
            _native.szp_decode(np.frombuffer(szp, np.uint8), out, False)
            assert as_bytes(out) == values, at
    assert corrupt >= 10


def check_fused(emu: Emulated) -> None:
    """szp_linear, expert_mlp and moe_experts (grouped launches, row maps, gated staging, biases,
    exceptions, tiles of 1 and 4) against the CPU kernels, as tests/test_ops.py's CUDA test compares
    them; moe_experts bit for bit against the eager loop of the emulated expert_mlp; a NaN token."""
    E, H, I, k = 4, 70, 45, 2  # ragged blocks in both projections
    for dtype, policy in ((torch.float32, 0.05), (torch.bfloat16, 0.01), (torch.float16, 0.05)):
        g = torch.Generator().manual_seed(11)
        experts = [tuple(codec.compress((torch.randn(*s, generator=g) * 0.05).to(dtype), policy * 0.05)
                         for s in ((2 * I, H), (H, I))) for _ in range(E)]
        gb, db = ((torch.randn(E, n, generator=g) * 0.1).to(dtype) for n in (2 * I, H))
        tol = TOL[dtype] * 2

        def close(got, want, what):
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max(),
                                       msg=lambda m: f"{what}: {m}")

        for T in (1, 5):  # a tile of one row, and a tile of 4 and one of 1 (emulated launches are slow: few)
            x = torch.randn(T, H, generator=g).to(dtype)
            close(emu.szp_linear(x, experts[0][0]), ops.szp_linear(x, experts[0][0]), (dtype, T, "szp_linear"))
            for act, layout, bias in (("silu", "concatenated", False), ("gptoss", "interleaved", True)):
                gate = dict(act=act, layout=layout, alpha=1.702, limit=0.5)
                b = dict(gu_bias=gb[2], dn_bias=db[2]) if bias else {}
                got = emu.expert_mlp(x, *experts[2], **gate, **b)
                want = ops.expert_mlp(x, *experts[2], **gate, **({"gate_up_bias": gb[2], "down_bias": db[2]} if bias else {}))
                close(got, want, (dtype, T, act, "expert_mlp"))
                idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
                w = torch.rand(T, k, generator=g)
                bb = dict(gu_bias=gb, dn_bias=db) if bias else {}
                got = emu.moe_experts(x, idx, w, experts, **gate, **bb)
                want = ops.moe_experts(x, idx, w, experts, **gate, **({"gate_up_bias": gb, "down_bias": db} if bias else {}))
                close(got, want, (dtype, T, act, "moe_experts"))
                eager = torch.zeros(T, H, dtype=dtype)
                for e in idx.unique().tolist():
                    t, pos = torch.where(idx == e)
                    be = dict(gu_bias=gb[e], dn_bias=db[e]) if bias else {}
                    y = emu.expert_mlp(x[t].contiguous(), *experts[e], **gate, **be)
                    eager.index_add_(0, t, (y * w[t, pos, None]).to(dtype))
                assert torch.equal(got, eager), (dtype, T, act, "moe_experts against the eager loop")
        x = torch.randn(3, H, generator=g).to(dtype)
        x[1, 0] = float("nan")
        idx, w = torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.rand(3, k, generator=g)
        gate = dict(act="silu", layout="concatenated", alpha=1.702, limit=7.0)
        for got in (emu.expert_mlp(x, *experts[0], **gate), emu.moe_experts(x, idx, w, experts, **gate)):
            nan = got.float().isnan()
            assert bool(nan[1].all()) and not bool(nan[0].any() or nan[2].any()), (dtype, "a NaN token")


def _matrix(g, rows, cols, dtype, szpe, eb=2e-3, per_stream=0):
    x = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    fixed = codec.compress(x, eb)
    return (np.asarray(_native.szpe_from_szp(fixed.buffer, per_stream)), True) if szpe else (fixed.buffer, False)


def _experts(g) -> list[list[tuple[np.ndarray, bool]]]:
    """Experts of (buffer, is szpe) matrices: szpe, szp only, mixed, five szpe matrices (two launches),
    and a larger one (the staging buffer grows)."""
    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    return [
        [_matrix(g, 24, 96, bf16, True, per_stream=5), _matrix(g, 96, 12, bf16, True, per_stream=7)],
        [_matrix(g, 10, 40, f32, False), _matrix(g, 40, 5, f32, False)],
        [_matrix(g, 8, 64, f16, True, per_stream=1), _matrix(g, 64, 4, f16, False)],
        [_matrix(g, 6 + i, 33, bf16, True, per_stream=2) for i in range(5)],
        [_matrix(g, 48, 130, bf16, True, per_stream=9), _matrix(g, 130, 24, bf16, True, per_stream=11)],
    ]


def check_arrival(emu: Emulated) -> None:
    """The runtime's path onto a device with the cuda backend (pinned pool, expert store, the copy
    engine's staging, failure flag and event, the arrival step's one launch per expert) on emulated
    asynchronous streams: every szpe matrix lands as its szp buffer byte for byte, szp experts as
    copied; an expert of five szpe matrices takes two launches; a corrupt stream fails its own transfer
    (CorruptDataError) and no other, on either stream, before and after it. And a compute stream
    ordered after queued copies (Transfer::order) reads what they bring, close() lands the copies still
    queued, and a slot released with the
    stream of a read still queued (DeviceCache::release) is not overwritten under it, nor when that stream
    is destroyed and its handle taken by the next."""
    g = torch.Generator().manual_seed(21)
    experts = _experts(g)
    bf16 = torch.bfloat16
    # A corrupt stream (the CRC recomputed, so the store's parse passes), then clean experts after it.
    x = torch.distributions.StudentT(2.0).sample((24, 160)) * 0.01
    good = np.asarray(_native.szpe_from_szp(codec.compress(x.to(bf16), 1e-3).buffer, 5))
    info = _native.szpe_inspect(good)
    payload_at = good.size - 4 - info["payload_bytes"]
    rng = np.random.default_rng(3)
    while True:
        broken = good.copy()
        broken[int(rng.integers(payload_at, good.size - 4))] ^= 1 << int(rng.integers(0, 8))
        broken = fix_crc(broken)
        if _parses(broken) and not _decodes(broken, x.shape):
            break
    experts += [list(e) for e in experts[:3]]  # the same again, after the failure
    # Each next to szpe experts that decode: their failure flags must not swap (each copy reads its own).
    corrupt_at = (3, 6, 8)
    for at in corrupt_at:
        experts.insert(at, [_matrix(g, 16, 32, bf16, True, per_stream=3), (broken, True)])
    # A compute stream ordered after copies still queued behind others (no host wait) sees their bytes.
    assert emu.lib.emu_ordered_reads(ctypes.c_uint32(16), ctypes.c_uint64(1 << 16)) == 0
    # Closing the engine with copies queued and in flight on both streams lands every one.
    assert emu.lib.emu_close_in_flight(ctypes.c_uint32(40), ctypes.c_uint64(1 << 15)) == 0
    # A slot released with the stream of a read still queued keeps its bytes until the read is done; released
    # without it, the evicting fetch overwrites them under the read (the check can see the hazard).
    # (Torch's default stream is handle 0: a stream all the same, not "no stream".)
    for default_stream in (0, 1):
        fenced_release = lambda fenced: emu.lib.emu_fenced_release(  # noqa: E731
            ctypes.c_uint64(1 << 16), fenced, 300, default_stream)
        assert fenced_release(1) == 0, default_stream
        assert fenced_release(0) > 0, default_stream
    # A fence stays until passed, though a stream destroyed under it hands its handle to the next stream.
    assert emu.lib.emu_reused_stream_handle(ctypes.c_uint64(1 << 16), 300) == 0
    # A fence a fetch overlaps in part stays for the next fetch into the rest of its bytes (two copy streams).
    assert emu.lib.emu_partial_fences(300) == 0
    # The copy engine's completing thread resuming up to 400 ms late (one time in two; an emulated transcode
    # takes about 100 ms): an arrival's failure flag must still be its own when that thread reads it, with
    # 8 copies a stream in flight, and with 2 (one flag each: a third in flight would share one).
    emu.lib.emu_set_late_wake(ctypes.c_uint32(400_000))
    try:
        landed_on = {(streams, ahead): emu.arrivals(experts, streams, ahead) for streams, ahead in ((1, 8), (2, 8), (1, 2))}
    finally:
        emu.lib.emu_set_late_wake(ctypes.c_uint32(20_000))
    for streams, landed in landed_on.items():
        for i, (expert, (slot, error)) in enumerate(zip(experts, landed)):
            if i in corrupt_at:
                assert error.startswith("CorruptDataError") and f"expert {i}" in error, (streams, i, error)
                continue
            assert error == "", (streams, i, error)
            coded = any(c for _, c in expert)
            for (buf, c), (at, n) in zip(expert, slot_layout(expert)):
                assert slot[at:at + n] == landed_bytes(buf, c, coded), (streams, i, at)


# The runtime functions the copy path calls (and "launch": a kernel launch), each made to fail in turn.
FAULTY_CALLS = ("cudaMalloc", "cudaHostAlloc", "cudaMemsetAsync", "cudaMemcpyAsync", "launch", "cudaEventCreateWithFlags",
                "cudaEventRecord", "cudaStreamWaitEvent", "cudaEventSynchronize", "cudaStreamSynchronize")


def check_faults(emu: Emulated) -> None:
    """The copy path's error paths, which a GPU that works never takes: each CUDA call it makes fails in
    turn (the 1st, 2nd or 5th call of it, while experts are fetched into a cache a quarter their
    size, released with a compute stream whose reads of them are still queued, and evicted). The one
    fetch or release that met the failure raises CudaError, named, and nothing else does; no read
    queued before a release sees its slot overwritten (a release that could not make its fence still
    keeps the bytes from being written under the read); nothing hangs; and once the fault is gone every
    expert is fetched again and lands byte for byte, the cache's invariants whole."""
    g = torch.Generator().manual_seed(22)
    experts = _experts(g)
    experts += [list(e) for e in _experts(g)]  # ten experts: the cache holds about three
    for call in FAULTY_CALLS:
        for nth in (1, 2, 5):
            # A release's fence (an event made and recorded) failing: its read is queued long enough that
            # the fetches after it evict the slot while the read still waits.
            delay = 300 if call in ("cudaEventCreateWithFlags", "cudaEventRecord") else 40
            fired, results = emu.faulty_fetches(experts, call, nth, delay=delay)
            assert nth > 1 or fired == 1, (call, "never called: the check reaches nothing")
            failed = [i for i, (_, _, error) in enumerate(results) if error]
            assert len(failed) == fired, (call, nth, [r[2] for r in results])
            for i, (expert, (seen, slot, error)) in enumerate(zip(experts, results)):
                assert error == "" or ("CudaError" in error and "(emulated" in error), (call, nth, i, error)
                coded = any(c for _, c in expert)
                for (buf, c), (at, n) in zip(expert, slot_layout(expert)):
                    want = landed_bytes(buf, c, coded)
                    assert slot[at:at + n] == want, (call, nth, i, "round two")
                    assert seen is None or seen[at:at + n] == want, (call, nth, i, "overwritten under a read", error)


def _parses(buf: np.ndarray) -> bool:
    try:
        _native.szpe_inspect(buf, True)
        return True
    except CorruptDataError:
        return False


def _decodes(buf: np.ndarray, shape) -> bool:
    try:
        _native.szpe_decode(buf, torch.empty(shape, dtype=torch.bfloat16), True)
        return True
    except CorruptDataError:
        return False


CHECKS = {"decoders": check_decoders, "misaligned": check_misaligned, "corrupt": check_corrupt, "fused": check_fused,
          "arrival": check_arrival, "faults": check_faults}

if __name__ == "__main__":
    CHECKS[sys.argv[2]](Emulated(sys.argv[1]))
    print("ok")
