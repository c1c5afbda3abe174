"""Predicting which experts come next, two ways.

ActivationPredictor (MoE-Infinity): the sequence-level expert activation
matrix of the sequence being served, matched against past matrices (cosine
similarity over the layers seen so far; the best matches averaged).

HiddenStatePredictor (mixtral-offloading, FloE): the next layers' routers
applied to the current hidden state; residual streams change slowly, so the
next layer's router guesses its experts well one or two layers ahead.

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


class HiddenStatePredictor:
    """Routers of later layers applied to a hidden state.

    routers: per MoE layer, the router weight [E, H]; norms: per layer, the
    RMSNorm weight applied before that router (None for none), eps its epsilon.
    """

    def __init__(self, routers: list[torch.Tensor], norms: list[torch.Tensor | None] | None = None, eps: float = 1e-6):
        self.routers = [r.detach().float() for r in routers]
        self.norms = [None if n is None else n.detach().float() for n in (norms or [None] * len(routers))]
        self.eps = eps

    @classmethod
    def from_mixtral(cls, model) -> "HiddenStatePredictor":
        layers = model.model.layers
        return cls([l.mlp.gate.weight for l in layers], [l.post_attention_layernorm.weight for l in layers],
                   model.config.rms_norm_eps)

    def probabilities(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Router probabilities of `layer` for hidden states [..., H]: [..., E]."""
        h = hidden.float()
        if self.norms[layer] is not None:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norms[layer]
        return torch.softmax(h @ self.routers[layer].T, dim=-1)

    def predict(self, hidden: torch.Tensor, current_layer: int, depth: int) -> np.ndarray:
        """[layers, experts]: for each of the next `depth` layers, the top-k-free router
        probabilities of one token's hidden state (other rows zero)."""
        L = len(self.routers)
        out = np.zeros((L, self.routers[0].shape[0]), dtype=np.float32)
        for d in range(1, depth + 1):
            l = (current_layer + d) % L
            out[l] = self.probabilities(hidden, l).reshape(-1, out.shape[1]).mean(0).numpy()
        return out


@torch.no_grad()
def mixtral_hidden_predictions(model, input_ids: torch.Tensor, batch: int = 16) -> np.ndarray:
    """[sequences, tokens, layers, experts] for a Mixtral-style model: at each token and
    layer l, layer l+1's router applied to the residual stream after l's attention
    (what a hidden-state prefetcher sees when layer l starts its experts)."""
    pred = HiddenStatePredictor.from_mixtral(model)
    layers = model.model.layers
    L, E = len(layers), model.config.num_local_experts
    captured = {}
    hooks = [layers[l].post_attention_layernorm.register_forward_hook(
        lambda mod, inp, out, l=l: captured.__setitem__(l, inp[0].detach())) for l in range(L)]
    out = np.zeros((input_ids.shape[0], input_ids.shape[1], L, E), np.float32)
    try:
        for i in range(0, input_ids.shape[0], batch):
            captured.clear()
            model(input_ids=input_ids[i : i + batch])
            for l in range(L):
                out[i : i + batch, :, l] = pred.probabilities(captured[l], (l + 1) % L).numpy()
    finally:
        for h in hooks:
            h.remove()
    return out
