"""The embedded default model: a byte-level Mixtral trained on the stdlib.

The checkpoint lives beside this file in ``tiny-moe/`` (Hugging Face format,
loadable with ``MixtralForCausalLM.from_pretrained``); ``tools/train_tiny_moe.py``
made it. Tokens are bytes 0-255 plus BOS/EOS/PAD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..evaluation import evaluate, router_choices
from ..evaluation import windows as token_windows

DEFAULT_DIR = Path(__file__).resolve().parent / "tiny-moe"
BOS, EOS, PAD = 256, 257, 258
VOCAB = 259


def config(**overrides):
    from transformers import MixtralConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=224, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5, router_aux_loss_coef=0.02,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        initializer_range=0.02,
    )
    base.update(overrides)
    return MixtralConfig(**base)


def new_model(seed: int = 0, **overrides):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(config(**overrides))


def save(model, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def load(path: Path | str | None = None, dtype: torch.dtype = torch.float32):
    """Load a checkpoint (the shipped one by default) for evaluation on the CPU."""
    from transformers import MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    path = DEFAULT_DIR if path in (None, "default") else Path(path)
    hf_logging.disable_progress_bar()
    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def default_heldout(path: Path | str | None = None) -> bytes:
    path = DEFAULT_DIR if path in (None, "default") else Path(path)
    return (path / "heldout.txt").read_bytes()


def with_bos(tokens: torch.Tensor) -> torch.Tensor:
    bos = torch.full((tokens.shape[0], 1), BOS, dtype=torch.long)
    return torch.cat([bos, tokens.long()], dim=1)


def windows(data: bytes, seq: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq - 1`` bytes, each prefixed with BOS."""
    return token_windows(list(data), seq, BOS)


def bits_per_byte(model, data: bytes, seq: int = 256) -> float:
    return evaluate(model, windows(data, seq))["nll"] / float(np.log(2))


def routing_traces(model, data: bytes, seq: int = 256) -> np.ndarray:
    """uint8 [sequence, token, layer, k]: the experts each token chose."""
    return router_choices(model, windows(data, seq))


def expert_usage(model, data: bytes, seq: int = 256) -> np.ndarray:
    """Fraction of top-k slots each expert took, per layer: [layers, experts]."""
    tr = routing_traces(model, data, seq)
    n_exp = model.config.num_local_experts
    counts = np.stack([np.bincount(tr[:, :, l].ravel(), minlength=n_exp) for l in range(tr.shape[2])])
    return counts / counts.sum(axis=1, keepdims=True)
