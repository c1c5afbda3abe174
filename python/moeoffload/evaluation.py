"""Language-model evaluation: tokens, windows, perplexity and accuracy, router choices, lm-eval tasks.

Used by the sensitivity study, the default model's helpers, the CLI and the benchmarks; it knows
no model in particular (the default model and text are resolved by their callers).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def encode(model_dir: Path, model, text: bytes) -> list[int]:
    """Token ids: the model's tokenizer when it has one, else bytes (the tiny model's vocabulary)."""
    if (Path(model_dir) / "tokenizer_config.json").exists() or (Path(model_dir) / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)(text.decode("utf-8", "replace"))["input_ids"]
    return list(text)


def windows(ids: list[int], seq: int, bos: int | None) -> torch.Tensor:
    body = seq - (1 if bos is not None else 0)
    if body < 1:
        raise ValueError(f"a window of {seq} tokens holds no text after its BOS token: it needs at least 2")
    n = len(ids) // body
    if n == 0:
        raise ValueError(f"need at least {body} tokens of evaluation text, got {len(ids)}")
    x = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        x = torch.cat([torch.full((n, 1), bos, dtype=torch.long), x], dim=1)
    return x


def check_windows(batches, batch_size, min_tokens: int = 2) -> None:
    """InvalidArgumentError unless batches is token ids [n >= 1, seq >= min_tokens] and batch_size a positive
    integer."""
    from .errors import InvalidArgumentError

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.shape[0] < 1 or \
            batches.shape[1] < min_tokens:
        raise InvalidArgumentError(f"the windows must be token ids [n >= 1, seq >= {min_tokens}], got "
                                   f"{list(batches.shape) if isinstance(batches, torch.Tensor) else type(batches).__name__}")


@torch.no_grad()
def evaluate(model, batches: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity and next-token accuracy over windows [n, seq] (the first token is context only)."""
    check_windows(batches, batch_size)
    nll, correct, count = 0.0, 0, 0
    for i in range(0, batches.shape[0], batch_size):
        x = batches[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "acc": correct / count, "tokens": count}


@torch.no_grad()
def router_choices(model, ids: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """[windows, tokens, layers, k] (sim.trace_dtype: uint8 up to 256 experts): the experts each token chose
    at every MoE layer."""
    from .sim import trace_dtype

    check_windows(ids, batch_size, min_tokens=1)
    k = getattr(model.config, "num_experts_per_tok", 2)
    out = []
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i : i + batch_size]
        res = model(input_ids=x, output_router_logits=True)
        per_layer = [lg.view(x.shape[0], x.shape[1], -1).topk(k, dim=-1).indices for lg in res.router_logits]
        choices = torch.stack(per_layer, dim=2).numpy()
        out.append(choices.astype(trace_dtype(res.router_logits[0].shape[-1])))
    return np.concatenate(out, axis=0)


def lm_eval_tasks(model, tasks: list[str], limit: int | None = None) -> dict:
    """Task accuracy through lm-evaluation-harness, on the same (perturbed) model object."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise RuntimeError("--tasks needs lm-evaluation-harness: pip install lm-eval") from e
    res = lm_eval.simple_evaluate(model=HFLM(pretrained=model), tasks=tasks, limit=limit)
    out = {}
    for task, metrics in res["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none"):
                out[f"{task}/{name}"] = float(value)
    return out
