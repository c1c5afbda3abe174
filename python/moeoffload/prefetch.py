"""Predicting which experts come next, two ways.

ActivationPredictor (MoE-Infinity): the sequence-level expert activation
matrix of the sequence being served, matched against past matrices (cosine
similarity over the layers seen so far; the best matches averaged).

Hidden state (mixtral-offloading, FloE): the next layer's router applied to
the current residual stream, which changes slowly, so it guesses the next
layer's experts well (models.adapters.router_probabilities; live in
integrations/hf.py, offline in hidden_predictions for the simulator).

Both give a [layers, experts] probability matrix; ``plan`` turns one into an
ordered prefetch list (the native plan_prefetch), which the DeviceCache or the
simulator (moeoffload.sim) fetches without evicting what runs now.
"""

from __future__ import annotations

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
            raise ValueError(f"prefetch source must be 'activation', 'hidden' or 'combined', got {self.source!r}")
        if self.depth < 1 or self.per_layer < 1 or self.top_matches < 1:
            raise ValueError("prefetch depth, per_layer and top_matches must be >= 1")


def plan(prediction: np.ndarray, current_layer: int, config: PrefetchConfig) -> list[tuple[int, float]]:
    """(expert id, priority) to fetch, best first."""
    L, E = prediction.shape
    return _native.plan_prefetch(np.ascontiguousarray(prediction, dtype=np.float32).ravel(), L, E, current_layer,
                                 config.depth, config.per_layer, config.min_probability)


def prefetch_source(config: PrefetchConfig, prediction: np.ndarray | None, hidden_next: np.ndarray | None,
                    layer: int, shape: tuple[int, int]) -> np.ndarray:
    """The [L, E] matrix a prefetch plan is made from at `layer`, by ``config.source``: the activation
    prediction, the next layer's router probabilities on the hidden state (``hidden_next`` [E]), or
    "combined" (both averaged for the next layer, the activation prediction further ahead). One rule
    for the live path (ExpertCache.record) and the simulator (sim.replay)."""
    L, _ = shape
    if config.source != "activation" and hidden_next is None:
        raise InvalidArgumentError(f"prefetch source {config.source!r} needs the hidden-state prediction of the next layer")
    if config.source != "hidden" and prediction is None:
        raise InvalidArgumentError(f"prefetch source {config.source!r} needs the activation prediction")
    if config.source == "activation":
        return prediction
    nxt = (layer + 1) % L
    if config.source == "hidden":
        out = np.zeros(shape, dtype=np.float32)
        out[nxt] = hidden_next
        return out
    out = np.array(prediction, dtype=np.float32, copy=True)
    out[nxt] = 0.5 * (out[nxt] + hidden_next)
    return out


class ActivationPredictor:
    def __init__(self, num_layers: int, experts_per_layer: int, capacity: int = 512, top_matches: int = 4,
                 history=None, self_weight: float = 1.0, recency: float = 1.0):
        self.num_layers, self.experts_per_layer = num_layers, experts_per_layer
        self.tracer = _native.ActivationTracer(num_layers, experts_per_layer)
        self.history = history if history is not None else _native.ActivationHistory(num_layers, experts_per_layer, capacity)
        self.top_matches = top_matches
        self.self_weight = self_weight
        if not 0.0 < recency <= 1.0:
            raise ValueError(f"recency must be in (0, 1], got {recency}")
        self.recency = recency
        self._own = np.zeros((num_layers, experts_per_layer), np.float32)

    def begin_sequence(self) -> None:
        self.tracer.begin_sequence()
        self._own[:] = 0

    def record(self, layer: int, experts) -> None:
        ids = np.ascontiguousarray(experts, dtype=np.uint32).ravel()
        self.tracer.record(layer, ids)
        self._own[layer] *= self.recency
        np.add.at(self._own[layer], ids.astype(np.int64), 1.0)

    def predict(self) -> np.ndarray:
        # During the first token only rows 0..current have counts; after it, all rows.
        m = self.tracer.matrix()
        seen = self.tracer.layers_seen
        matched = self.history.predict(m.ravel(), seen, self.top_matches).reshape(self.num_layers, self.experts_per_layer)
        if self.self_weight <= 0:
            return matched
        # The sequence's own rows so far are one more match, weighted self_weight;
        # with recency < 1 each token's count decays by that factor per later token.
        rows = self._own.sum(axis=1, keepdims=True)
        own = np.divide(self._own, rows, out=np.zeros(m.shape, np.float32), where=rows > 0)
        w = np.where(rows > 0, self.self_weight, 0.0).astype(np.float32)
        return (matched + w * own) / (1.0 + w)

    def end_sequence(self) -> bool:
        return self.history.add(self.tracer.matrix().ravel())


@torch.no_grad()
def hidden_predictions(model, input_ids: torch.Tensor, batch: int = 16) -> np.ndarray:
    """[sequences, tokens, layers, experts]: at each token and MoE layer l, layer l+1's routing scores
    on the residual stream in front of l's router norm (what the live hidden-state prefetcher of
    integrations/hf.py sees when layer l starts its experts). Any family models.adapters knows."""
    from .models.adapters import moe_layers, router_probabilities

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
