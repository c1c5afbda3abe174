"""Error-bounded compression of weight tensors.

    ct = compress(x, eb, mode="abs", codec="szp")
    x_hat = ct.decompress(dtype=None, device=None)

Guarantee (both codecs): for every element, |x - x_hat| <= ct.eb computed in
float64, where x_hat is the decompressed value in the stored dtype (the input's)
or any dtype that holds it exactly (float32 always). Decompressing into a
narrower dtype (float32 input to bfloat16, say) adds that dtype's rounding.

- "szp": the native block codec (the GPU format, docs/format.md): fixed-length
  blocks of 32 along the last dimension, per-row offsets, decodable on CPU and
  GPU. Fast, a little larger.
- "szpe": szp's quantised values entropy coded (rANS, docs/format.md): the same
  values bit for bit as "szp" at the same bound, near the order-0 entropy of
  the quantised values in size; decodes on the CPU, and back into the szp
  buffer (to_szp()) for the GPU and the fused kernels.
- "sz3": the SZ3 compressor (package `pysz`, by the SZ3 authors): higher ratio,
  CPU only, slower; values SZ3 returns outside the bound after rounding to the
  stored dtype are kept exactly as exceptions, so the same guarantee holds.
"""

from __future__ import annotations

import atexit
import math
import numbers
import struct
import zlib

import numpy as np
import torch

from . import _native
from .errors import (
    CorruptDataError,
    CudaError,
    FormatVersionError,
    InvalidArgumentError,
    InvalidBoundError,
    NonFiniteError,
    ShapeError,
    UnsupportedDtypeError,
)

# Join the codec's CPU threads before the interpreter goes away.
atexit.register(_native.stop_threads)

CODECS = ("szp", "szpe", "sz3")
SZ3_ALGORITHMS = ("nopred", "interp_lorenzo", "lorenzo_reg", "interp")

_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_RAW_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

_SZP_MAGIC = b"MSZP"
_SZPE_MAGIC = b"MSZE"
_SZ3_MAGIC = b"MSZ3"
_SZ3_VERSION = 1
_SZ3_HEADER = struct.Struct("<4sHBBdQQQ")  # magic, version, dtype, ndim, eb, numel, n_exceptions, sz3 bytes


def _as_tensor(x) -> torch.Tensor:
    """A contiguous CPU tensor of a supported dtype, sharing memory where it can."""
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":  # ml_dtypes
            x = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
        elif x.dtype in (np.float32, np.float16):
            x = torch.from_numpy(np.ascontiguousarray(x))
        else:
            raise UnsupportedDtypeError(
                f"dtype {x.dtype} is not supported; convert to float32, float16 or bfloat16 first"
            )
    if not isinstance(x, torch.Tensor):
        raise UnsupportedDtypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODES:
        raise UnsupportedDtypeError(
            f"dtype {x.dtype} is not supported; convert to torch.float32, torch.bfloat16 or torch.float16 first"
        )
    if x.device.type == "meta":
        raise InvalidArgumentError("the tensor is on the meta device: it holds no values to compress")
    if x.layout != torch.strided:
        raise InvalidArgumentError(f"a {x.layout} tensor: compress its dense form (x.to_dense())")
    return x.detach().to("cpu").contiguous()


def _check_finite(t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).reshape(-1).nonzero()[0].item()
        raise NonFiniteError(
            f"input holds NaN or Inf (first at flat index {bad}); "
            "error-bounded compression needs finite weights: fix or mask them first"
        )


def absolute_bound(t: torch.Tensor, eb: float, mode: str) -> float:
    """The absolute bound for `eb` in `mode`: "abs" (eb itself), "rel"
    (eb x (max - min)) or "meanabs" (eb x mean |x|, the scale of the
    MoE-Compression study's noise).

    A constant tensor has no range; "rel" then uses eb x |value| (or eb if 0);
    an all-zero tensor has no mean magnitude and "meanabs" uses eb.
    """
    eb = bound_value(eb)
    if mode == "abs":
        return eb
    if mode not in ("rel", "meanabs"):
        raise InvalidBoundError(f"mode must be 'abs', 'rel' or 'meanabs', got {mode!r}")
    if t.numel() == 0:
        return float(eb)
    _check_finite(t)
    if mode == "meanabs":
        scale = float(t.float().abs().mean())
        scale = scale if scale > 0 else 1.0
        what = "mean |x|"
    else:
        lo, hi = (float(v) for v in torch.aminmax(t.float()))
        scale = hi - lo
        if scale == 0:
            scale = abs(hi) or 1.0
        what = "the value range"
    bound = eb * scale
    if not (math.isfinite(bound) and bound > 0):  # overflow to Inf or underflow to 0 in float64
        raise InvalidBoundError(
            f"error bound {eb!r} in mode {mode!r} times {what} ({scale!r}) is {bound!r}, "
            "not a positive finite float64: choose a bound that keeps eb x scale in range")
    return bound


def bound_value(eb) -> float:
    """An error bound as a float (InvalidBoundError otherwise): a Python or numpy real number, or a 0-d real tensor; never a bool."""
    value = None
    if isinstance(eb, torch.Tensor):
        if eb.dim() == 0 and not eb.dtype.is_complex and eb.dtype != torch.bool:
            value = float(eb)
    elif isinstance(eb, np.ndarray):
        if eb.ndim == 0 and eb.dtype.kind in "iuf":
            value = float(eb)
    elif isinstance(eb, numbers.Real) and not isinstance(eb, (bool, np.bool_)):
        try:
            value = float(eb)
        except (OverflowError, ValueError, TypeError):
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        try:
            shown = repr(eb)
        except ValueError:  # an int of more than 4300 digits has no repr
            shown = f"an integer of {eb.bit_length()} bits"
        shown = shown if len(shown) <= 60 else shown[:45] + "..." + shown[-10:]
        raise InvalidBoundError(f"error bound must be a positive finite number, got {shown}")
    return value


class CompressedTensor:
    """A tensor compressed within an absolute error bound `eb`."""

    __slots__ = ("codec", "dtype", "shape", "eb", "n_exceptions", "_buf", "__weakref__")

    def __init__(self, codec: str, dtype: torch.dtype, shape, eb: float, n_exceptions: int, buf: np.ndarray):
        buf.flags.writeable = False
        self.codec = codec
        self.dtype = dtype
        self.shape = torch.Size(shape)
        self.eb = float(eb)
        self.n_exceptions = int(n_exceptions)
        self._buf = buf

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Compressed size in bytes (all of to_bytes(): header, offsets, payload, checksum)."""
        return int(self._buf.size)

    @property
    def ratio(self) -> float:
        """Input bytes / compressed bytes."""
        return self.numel * self.dtype.itemsize / self.nbytes

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(codec={self.codec!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"eb={self.eb:.4g}, nbytes={self.nbytes}, ratio={self.ratio:.2f})"
        )

    def to_bytes(self) -> bytes:
        return self._buf.tobytes()

    @property
    def buffer(self) -> np.ndarray:
        """The serialised bytes as a read-only uint8 array (no copy)."""
        return self._buf

    @classmethod
    def from_bytes(cls, buf) -> "CompressedTensor":
        """Parse and verify (checksum and structure) a buffer made by to_bytes()."""
        try:  # (a strided view of bytes is copied in order, as bytes(view) would)
            view = memoryview(buf)
        except TypeError:
            raise TypeError(f"from_bytes takes a bytes-like object (bytes, bytearray, a numpy array, a memoryview), "
                            f"got {type(buf).__name__}") from None
        arr = np.frombuffer(view if view.c_contiguous else view.tobytes(), dtype=np.uint8).copy()
        magic = arr[:4].tobytes()
        if magic == _SZP_MAGIC:
            info = _native.szp_inspect(arr, True)
            return cls("szp", _CODE_DTYPES[info["dtype"]], info["shape"], info["eb"], info["n_exceptions"], arr)
        if magic == _SZPE_MAGIC:
            info = _native.szpe_inspect(arr, True)
            return cls("szpe", _CODE_DTYPES[info["dtype"]], info["shape"], info["eb"], info["n_exceptions"], arr)
        if magic == _SZ3_MAGIC:
            head = _parse_sz3(arr)
            return cls("sz3", head["dtype"], head["shape"], head["eb"], head["n_exceptions"], arr)
        raise CorruptDataError("not a moeoffload compressed buffer (unknown magic); was it made by to_bytes()?")

    def decompress(self, dtype: torch.dtype | None = None, device=None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values, in the stored dtype unless `dtype` is given, on `device` (CPU by default).

        out: a contiguous CPU tensor of the stored dtype and shape to decode into
        (szp only): the hot-path form, no allocation. Returns `out`.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise UnsupportedDtypeError(
                f"decompress(dtype={dtype!r}): the values are floating point; ask for a torch floating dtype "
                "(float32 holds them exactly) or None for the stored one")
        if out is not None:
            return self._decode_szp_into(out)
        try:
            device = torch.device(device) if device is not None else torch.device("cpu")
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(f"decompress(device={device!r}): not a device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CudaError(f"decompress(device={str(device)!r}) needs a CUDA GPU; none is available")
        if self.codec in ("szp", "szpe") and device.type == "cuda":
            out = self._decode_szp_cuda(device)
        elif self.codec in ("szp", "szpe"):
            out = torch.empty(self.shape, dtype=self.dtype)
            (_native.szp_decode if self.codec == "szp" else _native.szpe_decode)(self._buf, out, False)
        else:
            out = _decode_sz3(self._buf)
        return out.to(device=device, dtype=dtype or self.dtype)

    def to_szp(self) -> "CompressedTensor":
        """The fixed-width szp form of an szp or szpe tensor (for szpe: the buffer it was made from,
        byte for byte)."""
        if self.codec == "szp":
            return self
        if self.codec != "szpe":
            raise UnsupportedDtypeError(f"to_szp() converts szpe tensors; this one is {self.codec!r}")
        return CompressedTensor("szp", self.dtype, self.shape, self.eb, self.n_exceptions,
                                _native.szpe_to_szp(self._buf, False))

    def _decode_szp_into(self, out: torch.Tensor) -> torch.Tensor:
        if self.codec not in ("szp", "szpe"):
            raise UnsupportedDtypeError("decompress(out=...) is available for the szp and szpe codecs only")
        if not isinstance(out, torch.Tensor):
            raise ShapeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.requires_grad and torch.is_grad_enabled():  # as torch refuses an in-place write to such a tensor
            raise InvalidArgumentError("decompress(out=...): out requires grad, and autograd cannot see this write; "
                                       "decode under torch.no_grad() or into a tensor that does not require grad")
        if out.dtype != self.dtype or out.shape != self.shape or out.device.type != "cpu" or not out.is_contiguous():
            raise ShapeError(
                f"out must be a contiguous CPU tensor of dtype {self.dtype} and shape {tuple(self.shape)}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        (_native.szp_decode if self.codec == "szp" else _native.szpe_decode)(self._buf, out, False)
        return out

    def _decode_szp_cuda(self, device: torch.device) -> torch.Tensor:
        if not torch.cuda.is_available():
            raise CudaError("decompress(device='cuda') needs a CUDA GPU; none is available")
        if not _native.backend_info()["built_with_cuda"]:
            raise CudaError("moeoffload was built without CUDA; rebuild with MOEOFFLOAD_CUDA=ON")
        dev_buf = torch.from_numpy(self._buf).to(device)
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        if self.codec == "szp":
            _native.szp_decode_cuda(self._buf, dev_buf, out, stream)
            return out
        # szpe: straight to values, a warp a stream (the runtime's cache instead transcodes to szp on arrival)
        failed = torch.zeros(1, dtype=torch.int32, device=device)
        _native.szpe_decode_values_cuda(self._buf, dev_buf, failed, out, stream)
        if failed.item():
            raise CorruptDataError("szpe buffer is corrupt: a stream did not decode on the device. Re-create it from "
                                   "the original weights (moeoffload.codec.compress)")
        return out


def width_histogram(ct: CompressedTensor) -> np.ndarray:
    """Blocks of each width 0..25 (bits per value) in an szp tensor."""
    if ct.codec != "szp":
        raise UnsupportedDtypeError("width_histogram is defined for the szp codec only")
    return np.asarray(_native.szp_width_histogram(ct.buffer), dtype=np.int64)


def compress(x, eb: float, mode: str = "abs", codec: str = "szp", *, sz3_algorithm: str = "nopred") -> CompressedTensor:
    """Compress `x` (torch.Tensor or numpy array; float32, bfloat16 or float16) within bound `eb`.

    mode: "abs" (eb is absolute), "rel" (eb x (max - min) of x) or "meanabs" (eb x mean |x|).
    codec: "szp" (native, GPU-decodable), "szpe" (szp's values entropy coded: the same values, fewer
    bytes) or "sz3" (pysz; `sz3_algorithm` picks its predictor: "nopred" suits weights, which have no
    spatial correlation).
    """
    if codec not in CODECS:
        raise UnsupportedDtypeError(f"codec must be one of {CODECS}, got {codec!r}")
    t = _as_tensor(x)
    eb_abs = absolute_bound(t, eb, mode)
    if codec in ("szp", "szpe"):
        buf, n_exc = _native.szp_encode(t, _DTYPE_CODES[t.dtype], list(t.shape), eb_abs, 0)
        if codec == "szpe":
            buf = _native.szpe_from_szp(buf, 0)
        return CompressedTensor(codec, t.dtype, t.shape, eb_abs, n_exc, buf)
    return _compress_sz3(t, eb_abs, sz3_algorithm)


# ---- sz3 container: header, shape, exceptions, SZ3 stream, CRC32 (docs/format.md) ----

_SZ3_MAX_NDIM = 8  # the container's limit (docs/format.md); the SZ3 stream itself is always the flat array


def _sz3_corrupt(why: str) -> CorruptDataError:
    return CorruptDataError(f"sz3 buffer is corrupt or truncated: {why}; re-create it from the original weights")


def _sz3_reconstruct(stream: np.ndarray, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The SZ3 stream's n values, rounded to `dtype`; CorruptDataError whatever way SZ3 fails on it.

    The same function runs at compress time on the fresh stream (so what cannot be
    decoded is refused there) and at decode time on the stored one.
    """
    from pysz import sz

    try:
        values = sz.decompress(np.ascontiguousarray(stream, dtype=np.uint8), np.float32, (n,))[0]
    except Exception as e:  # pysz / SZ3 raise IndexError, ValueError, RuntimeError, MemoryError, ... on bad input
        raise _sz3_corrupt(f"the SZ3 stream does not decode ({type(e).__name__}: {e})") from None
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.size != n:
        got = getattr(values, "size", None)
        raise _sz3_corrupt(f"the SZ3 stream decodes to {got} values, the header says {n}")
    return torch.from_numpy(np.ascontiguousarray(values).reshape(-1)).to(dtype)


def _compress_sz3(t: torch.Tensor, eb: float, algorithm: str) -> CompressedTensor:
    from pysz import sz, szAlgorithm, szConfig, szErrorBoundMode

    if algorithm not in SZ3_ALGORITHMS:
        raise InvalidBoundError(f"sz3_algorithm must be one of {SZ3_ALGORITHMS}, got {algorithm!r}")
    eb = float(eb)
    if not (math.isfinite(eb) and eb > 0):  # the header holds eb as float64, as pysz takes it
        raise InvalidBoundError(f"the absolute error bound must be a positive finite float64, got {eb!r}")
    if t.dim() > _SZ3_MAX_NDIM:
        raise ShapeError(f"the sz3 codec takes tensors of at most {_SZ3_MAX_NDIM} dimensions, got {t.dim()} "
                         f"(shape {tuple(t.shape)}); reshape it first")
    _check_finite(t)
    n = t.numel()
    flat = t.reshape(-1)
    if n:
        cfg = szConfig()
        cfg.errorBoundMode = szErrorBoundMode.ABS
        cfg.absErrorBound = eb
        cfg.cmprAlgo = getattr(szAlgorithm, algorithm.upper())
        try:
            stream, _ = sz.compress(flat.float().numpy(), cfg)
        except Exception as e:
            raise InvalidBoundError(f"SZ3 cannot compress at eb={eb!r} ({type(e).__name__}: {e})") from None
        stream = np.ascontiguousarray(stream, dtype=np.uint8)
        # Decode exactly as decompress() will: what fails here would fail there.
        try:
            x_hat = _sz3_reconstruct(stream, n, t.dtype)
        except CorruptDataError as e:
            raise InvalidBoundError(f"SZ3 cannot round-trip its own output at eb={eb!r}: {e}") from None
        err = (flat.double() - x_hat.double()).abs()
        idx = (~(err <= eb)).nonzero().reshape(-1)  # NaN or Inf from SZ3 is an exception too
    else:
        stream = np.zeros(0, np.uint8)
        idx = torch.zeros(0, dtype=torch.int64)
    raw = flat.view(_RAW_VIEW[t.dtype])[idx].to(torch.int64) & ((1 << (8 * t.dtype.itemsize)) - 1)
    parts = [
        _SZ3_HEADER.pack(_SZ3_MAGIC, _SZ3_VERSION, _DTYPE_CODES[t.dtype], t.dim(), eb, n, idx.numel(), stream.size),
        np.asarray(t.shape, dtype="<u8").tobytes(),
        idx.numpy().astype("<u8").tobytes(),
        raw.numpy().astype("<u4").tobytes(),
        stream.tobytes(),
    ]
    body = b"".join(parts)
    buf = np.frombuffer(body + struct.pack("<I", zlib.crc32(body)), dtype=np.uint8).copy()
    _parse_sz3(buf)  # the container's own checks, so a buffer that would not load is never handed out
    return CompressedTensor("sz3", t.dtype, t.shape, eb, idx.numel(), buf)


def _parse_sz3(arr: np.ndarray) -> dict:
    """Header, shape and exceptions of an sz3 container, checked (CorruptDataError); the SZ3 stream is not decoded."""
    corrupt = _sz3_corrupt
    if arr.size < _SZ3_HEADER.size + 4:
        raise corrupt("too short")
    if zlib.crc32(arr[:-4]) != int(arr[-4:].view("<u4")[0]):
        raise corrupt("CRC32 mismatch")
    magic, version, code, ndim, eb, numel, n_exc, n_stream = _SZ3_HEADER.unpack_from(arr)
    if magic != _SZ3_MAGIC:
        raise corrupt("not an sz3 container (magic)")
    if version != _SZ3_VERSION:
        raise FormatVersionError(f"sz3 container version {version} is not supported (this build reads "
                                 f"{_SZ3_VERSION}): compress the tensor again with this moeoffload")
    if code not in _CODE_DTYPES:
        raise corrupt(f"unknown dtype code {code}")
    if ndim > _SZ3_MAX_NDIM:
        raise corrupt(f"{ndim} dimensions (at most {_SZ3_MAX_NDIM})")
    if not (math.isfinite(eb) and eb > 0):
        raise corrupt(f"error bound {eb!r} is not a positive finite number")
    if n_exc > numel:
        raise corrupt(f"{n_exc} exceptions for {numel} values")
    at = _SZ3_HEADER.size
    # Sizes are Python ints (no wrap-around); compare them before slicing anything.
    if at + 8 * ndim + 12 * n_exc + n_stream + 4 != arr.size:
        raise corrupt("length does not match the header")
    shape = tuple(int(v) for v in arr[at : at + 8 * ndim].view("<u8"))
    if math.prod(shape) != numel:
        raise corrupt("shape does not match numel")
    if math.prod(d for d in shape if d) > 2**63 - 1:  # (with a zero dimension too: no tensor has such a shape)
        raise corrupt("a shape beyond 2^63 - 1 values")
    if (numel == 0) != (n_stream == 0):
        raise corrupt("SZ3 stream length does not match numel")
    at += 8 * ndim
    idx = arr[at : at + 8 * n_exc].view("<u8")  # unsigned: an index near 2**64 stays large, never -1
    raw = arr[at + 8 * n_exc : at + 12 * n_exc].view("<u4")
    if n_exc:
        if int(idx.max()) >= numel:
            raise corrupt("exception index out of range")
        if n_exc > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise corrupt("exception indices are not strictly increasing")
        if int(raw.max()) >> (8 * _CODE_DTYPES[code].itemsize):
            raise corrupt("exception value does not fit the dtype")
    return {"dtype": _CODE_DTYPES[code], "shape": shape, "eb": eb, "n_exceptions": n_exc, "numel": numel,
            "exceptions": (idx, raw), "stream": arr[at + 12 * n_exc : arr.size - 4]}


def _decode_sz3(arr: np.ndarray) -> torch.Tensor:
    head = _parse_sz3(arr)
    n, n_exc, dtype = head["numel"], head["n_exceptions"], head["dtype"]
    if n == 0:
        return torch.empty(head["shape"], dtype=dtype)
    out = _sz3_reconstruct(head["stream"], n, dtype)
    if n_exc:
        idx_u, raw_u = head["exceptions"]  # checked by _parse_sz3: indices < n, values fit the dtype
        idx = torch.from_numpy(idx_u.astype(np.int64))
        raw = torch.from_numpy(raw_u.astype(np.int64))
        half = 1 << (8 * dtype.itemsize - 1)  # unsigned bits -> the signed view's value
        out.view(_RAW_VIEW[dtype])[idx] = torch.where(raw >= half, raw - 2 * half, raw).to(_RAW_VIEW[dtype])
    if not bool(torch.isfinite(out).all()):  # the input was finite and every value is within eb of it
        raise _sz3_corrupt("it decodes to NaN or Inf")
    return out.reshape(head["shape"])
