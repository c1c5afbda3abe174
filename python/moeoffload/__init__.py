"""moeoffload: run Mixture-of-Experts models whose experts do not fit in GPU memory.

Importing this package touches no GPU: CUDA is queried only when asked
(`backend_info()`, or a decode onto a CUDA device).
"""

from . import codec
from .errors import (
    BoundTooSmallError,
    BudgetError,
    CacheFullError,
    ChecksumError,
    ClosedError,
    CodecError,
    CorruptDataError,
    CudaError,
    FormatVersionError,
    ForkedError,
    MissingExtraError,
    InvalidArgumentError,
    InvalidBoundError,
    MissingExpertError,
    MoeoffloadError,
    NoMoeLayersError,
    NonFiniteError,
    ShapeError,
    TableChangedError,
    TableError,
    TableMismatchError,
    TableVersionError,
    UnsupportedDtypeError,
    WaitTimeoutError,
)

__version__ = "0.1.0"


def backend_info() -> dict:
    """What the build holds and what the machine offers.

    Keys: backend ("cuda" or "cpu"), built_with_cuda, gpu_available,
    device_count, device_name, compute_capability (major, minor), reason (why
    no GPU is usable, when none is), num_threads (CPU backend threads).
    """
    from . import _native

    info = dict(_native.backend_info())
    info["backend"] = "cuda" if info["gpu_available"] else "cpu"
    info["num_threads"] = _native.num_threads()
    return info


def set_num_threads(n: int) -> None:
    """Threads of the CPU backend (codec encode/decode); n <= 0 restores the default."""
    from . import _native

    _native.set_num_threads(int(n))


__all__ = [
    "BoundTooSmallError",
    "BudgetError",
    "CacheFullError",
    "ChecksumError",
    "ClosedError",
    "CodecError",
    "CorruptDataError",
    "CudaError",
    "FormatVersionError",
    "ForkedError",
    "MissingExtraError",
    "InvalidArgumentError",
    "InvalidBoundError",
    "MissingExpertError",
    "MoeoffloadError",
    "NoMoeLayersError",
    "NonFiniteError",
    "ShapeError",
    "TableChangedError",
    "TableError",
    "TableMismatchError",
    "TableVersionError",
    "UnsupportedDtypeError",
    "WaitTimeoutError",
    "backend_info",
    "from_pretrained",
    "offload",
    "codec",
    "set_num_threads",
]


def offload(model, *args, **kwargs):
    """Serve a transformers 5 MoE model's experts from moeoffload (moeoffload.integrations.hf.offload)."""
    from .integrations.hf import offload as _offload

    return _offload(model, *args, **kwargs)


def from_pretrained(checkpoint_dir, *args, **kwargs):
    """Load a checkpoint's non-expert weights and serve its experts compressed; (model, Offload)
    (moeoffload.integrations.hf.from_pretrained)."""
    from .integrations.hf import from_pretrained as _from_pretrained

    return _from_pretrained(checkpoint_dir, *args, **kwargs)
