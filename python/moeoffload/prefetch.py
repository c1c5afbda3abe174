"""Predicting which experts come next, two ways.

Activation matching (MoE-Infinity): the sequence-level expert activation
matrix of the sequence being served, matched against past matrices (cosine
similarity over the layers seen so far; the best matches averaged).

Hidden state (mixtral-offloading, FloE): the next layer's router applied to
the current residual stream, which changes slowly, so it guesses the next
layer's experts well (models.adapters.router_probabilities; live in
integrations/hf.py, offline in hidden_predictions for the simulator).

Both give a [layers, experts] probability matrix; ``plan`` turns one into an
ordered prefetch list (the native plan_prefetch). The live path and the
simulator run all of it per layer as one native call, ``decision_step``:
record -> predict -> source -> plan, then the DeviceCache (or the simulator,
moeoffload.sim) fetches the plan without evicting what runs now.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from . import _native
from .errors import InvalidArgumentError


@dataclass(frozen=True)
class PrefetchConfig:
    source: str = "activation"  # "activation", "hidden", or "combined" (both averaged for the next layer)
    depth: int = 2               # layers ahead
    per_layer: int = 3           # at most this many experts of each layer
    min_probability: float = 0.05
    top_matches: int = 4         # activation: past matrices averaged
    recency: float = 1.0         # activation: decay of the sequence's own counts per token (1: plain counts)

    def __post_init__(self):
        if self.source not in ("activation", "hidden", "combined"):
            raise InvalidArgumentError(f"prefetch source must be 'activation', 'hidden' or 'combined', got {self.source!r}")
        for name in ("depth", "per_layer", "top_matches"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"prefetch {name} must be an integer >= 1, got {v!r}")
        p = self.min_probability
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:  # (NaN fails the range)
            raise InvalidArgumentError(f"prefetch min_probability must be a probability in [0, 1], got {p!r}")


def plan(prediction: np.ndarray, current_layer: int, config: PrefetchConfig) -> list[tuple[int, float]]:
    """(expert id, priority) to fetch, best first."""
    prediction = np.ascontiguousarray(prediction, dtype=np.float32)
    finite = bool(np.isfinite(prediction).all())
    if prediction.ndim != 2 or not finite:
        raise InvalidArgumentError(f"a prediction is finite probabilities [layers, experts], got shape "
                                   f"{list(prediction.shape)}{'' if finite else ' with NaN or Inf'}")
    L, E = prediction.shape
    return _native.plan_prefetch(prediction.ravel(), L, E, current_layer,
                                 config.depth, config.per_layer, config.min_probability)


def decision_step(num_layers: int, experts_per_layer: int, config: PrefetchConfig | None, policy: str,
                  history=None, self_weight: float = 1.0):
    """The native per-layer decision step (cpp/include/moeoffload/decision.h) that ExpertCache.record and
    sim.replay both run: record the router's choices, predict, make the plan's source by ``config.source``
    ("activation"; "hidden": the next layer's router on the current hidden state; "combined": both
    averaged on the next layer), plan. ``config`` None plans nothing; the prediction is still made when
    ``policy`` is "activation" (its eviction priorities)."""
    if policy not in ("lru", "lfu", "activation"):
        raise InvalidArgumentError(f"policy must be 'lru', 'lfu' or 'activation', got {policy!r}")
    if config is not None and not isinstance(config, PrefetchConfig):
        raise InvalidArgumentError(f"prefetch must be a PrefetchConfig or None, got {config!r}")
    if history is not None and not isinstance(history, _native.ActivationHistory):
        raise InvalidArgumentError("history must be an ActivationHistory (moeoffload.table.load_history, "
                                   f"sim.history_from_trace) or None, got {type(history).__name__}")
    cfg = config if config is not None else PrefetchConfig()
    return _native.DecisionStep(num_layers, experts_per_layer, history,
                                source="none" if config is None else config.source,
                                activation_priorities=policy == "activation", depth=cfg.depth,
                                per_layer=cfg.per_layer, min_probability=cfg.min_probability,
                                top_matches=cfg.top_matches, recency=cfg.recency, self_weight=self_weight)


@torch.no_grad()
def hidden_predictions(model, input_ids: torch.Tensor, batch: int = 16) -> np.ndarray:
    """[sequences, tokens, layers, experts]: at each token and MoE layer l, layer l+1's routing scores
    on the residual stream in front of l's router norm (what the live hidden-state prefetcher of
    integrations/hf.py sees when layer l starts its experts). Any family models.adapters knows."""
    from .models.adapters import moe_layers, router_probabilities

    from .evaluation import check_windows

    check_windows(input_ids, batch, min_tokens=1)
    layers = moe_layers(model)
    L, E = len(layers), layers[0].experts.down_proj.shape[0]
    captured = {}
    hooks = [ml.norm.register_forward_pre_hook(lambda mod, args, l=ml.index: captured.__setitem__(l, args[0].detach()))
             for ml in layers]
    out = np.zeros((input_ids.shape[0], input_ids.shape[1], L, E), np.float32)
    try:
        for i in range(0, input_ids.shape[0], batch):
            captured.clear()
            model(input_ids=input_ids[i : i + batch])
            for l in range(L):
                probs = router_probabilities(layers[(l + 1) % L], captured[l])
                out[i : i + batch, :, l] = probs.reshape(-1, input_ids.shape[1], E).numpy()
    finally:
        for h in hooks:
            h.remove()
    return out
