"""Named errors. The native core raises these same classes (by name)."""


class MoeoffloadError(Exception):
    """Base of every error moeoffload raises on purpose."""


class CodecError(MoeoffloadError, ValueError):
    """A tensor could not be compressed or decompressed."""


class CorruptDataError(CodecError):
    """A compressed buffer is truncated, corrupted or not one of ours."""


class FormatVersionError(CorruptDataError):
    """A buffer or table of a format version this build does not read (the message says how to rebuild it)."""


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


class InvalidArgumentError(MoeoffloadError, ValueError):
    """An argument is outside its range (a negative size, an unknown policy, ...)."""


class BudgetError(MoeoffloadError, ValueError):
    """A cache budget that cannot hold the largest expert, or cannot be parsed."""


class CacheFullError(MoeoffloadError, RuntimeError):
    """No slot can be freed: every cached expert is in use or in flight."""


class ClosedError(MoeoffloadError, RuntimeError):
    """The object was closed and cannot be used any more."""


class WaitTimeoutError(MoeoffloadError, TimeoutError):
    """A wait for a transfer ran past its timeout."""


class TableError(MoeoffloadError, ValueError):
    """An expert table cannot be built, saved or loaded."""


class TableMismatchError(TableError):
    """The table was built from another model (names, shapes or dtypes differ)."""


class MissingExpertError(TableError, KeyError):
    """An expert (or one of its matrices) is missing from the table or checkpoint."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ChecksumError(TableError, CorruptDataError):
    """A table payload does not match the checksum in its manifest."""


class NoMoeLayersError(MoeoffloadError, ValueError):
    """The model has no Mixture-of-Experts layers to study or compress."""


class TableChangedError(TableError):
    """A table file loaded in mapped mode changed on disk; load it again (or with mode="copy")."""


class ForkedError(ClosedError):
    """A runtime object built before fork() was used in the child: its copy threads do not exist there."""


class TableVersionError(TableError, FormatVersionError):
    """A table written in a format version this build does not read; the message says how to rebuild it."""


class MissingExtraError(MoeoffloadError, ImportError):
    """A command needs an optional dependency that is not installed; the message names the pip install."""
