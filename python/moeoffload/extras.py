"""Optional dependencies: what needs which extra, and the one-line error when it is missing.

The runtime, the codecs and the Hugging Face path need only the required dependencies; the
sensitivity study's plots and the benchmark plots need ``moeoffload[study]`` (matplotlib)."""

from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingExtraError

EXTRAS = {"matplotlib": "study"}  # module -> the extra that installs it


def require(module: str, purpose: str):
    """Import `module`, or raise MissingExtraError naming the pip install that provides it."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{purpose} need{'s' if not purpose.endswith('s') else ''} {module}, which is not "
                                f"installed: pip install 'moeoffload[{EXTRAS[module]}]'")
    return importlib.import_module(module)
