"""Named errors. The native core raises these same classes (by name)."""


class MoeoffloadError(Exception):
    """Base of every error moeoffload raises on purpose."""


class CodecError(MoeoffloadError, ValueError):
    """A tensor could not be compressed or decompressed."""


class CorruptDataError(CodecError):
    """A compressed buffer is truncated, corrupted or not one of ours."""


class NonFiniteError(CodecError):
    """The input holds NaN or Inf: error-bounded compression needs finite values."""


class InvalidBoundError(CodecError):
    """The error bound is not a positive finite number (or the mode is unknown)."""


class BoundTooSmallError(CodecError):
    """The bound is so small that quantised values would overflow their field."""


class UnsupportedDtypeError(CodecError, TypeError):
    """The dtype is not float32, bfloat16 or float16 (or the codec is unknown)."""


class ShapeError(CodecError):
    """Shapes or sizes of the arguments do not match."""


class CudaError(MoeoffloadError, RuntimeError):
    """A CUDA call failed, or CUDA was asked for where it is not available."""
