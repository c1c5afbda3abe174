"""What the offload path needs to know of an MoE model family, in one place.

transformers 5 gives every ``@use_experts_implementation`` family the same
experts module (fused [E, ...] parameters and the flags ``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``), so most of what differs
between families is found from the module tree, not listed per family:

- the MoE layers: the experts modules, in model order (layer 0..L-1);
- the router of each layer: the sibling ``gate`` / ``router`` of the experts
  module, with a weight [E, H] (and a bias for GPT-OSS); families with an
  ``e_score_correction_bias`` (DeepSeek-V3, GLM-4-MoE: sigmoid, grouped
  routing) score with a sigmoid plus that bias, the others with a softmax;
- the norm in front of the router (router_norm): the decoder layer's
  ``pre_feedforward_layernorm``, else its ``post_attention_layernorm`` in a
  pre-norm layer; none in a post-norm layer (FlexOlmo);
- the gate of the expert MLP (``gate_kind``): the default gate with the
  config's activation, or GPT-OSS's clamped gate on interleaved rows; anything
  else (a custom ``_apply_gate``, a post-expert norm, no gate) is not fused
  and runs the family's own eager code on decoded weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoeoffloadError

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


class UnsupportedModelError(MoeoffloadError, ValueError):
    """The model has no experts module the offload path can serve; the message says what is missing."""


@dataclass
class MoeLayer:
    index: int                     # MoE layer position 0..L-1
    name: str                      # the experts module's name in the model
    experts: nn.Module             # the @use_experts_implementation module
    router: nn.Module | None       # its sibling gate/router (None: no hidden-state prediction for this layer)
    norm: nn.Module | None         # the norm the router's input went through


@dataclass(frozen=True)
class GateKind:
    """How the fused expert_mlp op computes this family's gate (ops.expert_mlp's arguments)."""

    act: str
    layout: str = "concatenated"
    alpha: float = 1.702
    limit: float = 7.0


def is_experts_module(module: nn.Module) -> bool:
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and isinstance(
        getattr(module, "down_proj", None), (torch.Tensor, nn.Parameter)) and module.down_proj.dim() == 3


def router_norm(decoder_layer: nn.Module | None) -> nn.Module | None:
    """The norm whose output the MLP (router and experts) reads: a pre-feedforward norm where the layer
    has one (sandwich norms), else post_attention_layernorm in a pre-norm layer (one with an
    input_layernorm); None in a post-norm layer (FlexOlmo: post_attention_layernorm normalises the
    attention's output before the residual add, and the MLP reads the raw residual stream)."""
    if decoder_layer is None:
        return None
    pre = getattr(decoder_layer, "pre_feedforward_layernorm", None)
    if pre is not None:
        return pre
    if getattr(decoder_layer, "input_layernorm", None) is None:
        return None
    return getattr(decoder_layer, "post_attention_layernorm", None)


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every experts module of the model, in order; UnsupportedModelError when there is none."""
    modules = dict(model.named_modules())
    layers = []
    for name, module in modules.items():
        if not is_experts_module(module):
            continue
        parent_name, _, _ = name.rpartition(".")
        block = modules.get(parent_name)
        router = next((r for r in (getattr(block, "gate", None), getattr(block, "router", None))
                       if isinstance(getattr(r, "weight", None), torch.Tensor) and r.weight.dim() == 2), None)
        layer_name = parent_name.rpartition(".")[0]
        norm = router_norm(modules.get(layer_name))
        layers.append(MoeLayer(len(layers), name, module, router, norm))
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no experts module of the transformers 5 kind (fused [E, ...] expert "
            "parameters under @use_experts_implementation); moeoffload serves only such MoE models")
    return layers


def expert_matrix_names(experts: nn.Module) -> list[str]:
    """The expert parameters the table stores, by name: gate_up_proj (or up_proj) and down_proj."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    return [first, "down_proj"]


def gate_kind(experts: nn.Module) -> GateKind | None:
    """The fused gate for this experts module, or None when it must run unfused (decode + eager code)."""
    if not experts.has_gate or getattr(experts, "has_post_expert_norm", False):
        return None
    cls_gate = getattr(type(experts), "_apply_gate", None)
    model_type = getattr(getattr(experts, "config", None), "model_type", "")
    if model_type == "gpt_oss" and not experts.is_concatenated:
        return GateKind("gptoss", "interleaved", float(experts.alpha), float(experts.limit))
    from transformers.integrations.moe import _default_apply_gate

    if cls_gate is not _default_apply_gate or not experts.is_concatenated:
        return None
    act = _ACTIVATIONS.get(getattr(experts.config, "hidden_act", None))
    return None if act is None else GateKind(act)


@dataclass(frozen=True)
class RouterWeights:
    """A router's parameters in float32, converted once for a prediction at every layer of every token."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    correction: torch.Tensor | None  # e_score_correction_bias: sigmoid scores plus it


def router_weights(layer: MoeLayer) -> RouterWeights:
    r = layer.router
    with torch.no_grad():
        bias, correction = getattr(r, "bias", None), getattr(r, "e_score_correction_bias", None)
        return RouterWeights(r.weight.float(), None if bias is None else bias.float(),
                             None if correction is None else correction.float())


def router_scores(h: torch.Tensor, weights: RouterWeights) -> torch.Tensor:
    """Routing scores [tokens, E] of a router's input [tokens, H] (after its norm)."""
    logits = F.linear(h.float(), weights.weight, weights.bias)
    if weights.correction is not None:
        return logits.sigmoid() + weights.correction
    return torch.softmax(logits, dim=-1)


def router_probabilities(layer: MoeLayer, residual: torch.Tensor, weights: RouterWeights | None = None) -> torch.Tensor:
    """This layer's routing scores [tokens, E] for residual-stream states [..., H] (its norm, then its
    router's logits; sigmoid + correction bias where the family routes so, else softmax). The norm's
    forward runs without its hooks: the offload path hooks that norm to capture the residual stream,
    and a prediction must not overwrite what it captured. `weights`: router_weights(layer), kept by a
    caller that predicts often."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return router_probabilities(layer, residual, weights)
    h = residual.reshape(-1, residual.shape[-1])
    if layer.norm is not None:
        h = layer.norm.forward(h)
    return router_scores(h, weights or router_weights(layer))


def rms_scale(norm: nn.Module | None) -> tuple[torch.Tensor, float] | None:
    """(g, eps) when norm(x) = g * x / sqrt(mean(x^2) + eps), a plain RMSNorm, checked on a probe input
    with a mean (a LayerNorm fails it) and against g (a Gemma-style 1 + g fails it); else None."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.device.type == "meta" or not isinstance(eps, float) \
            or getattr(norm, "bias", None) is not None or not bool(torch.isfinite(w).all()):
        return None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = (torch.randn(4, w.numel(), generator=g) + 1.0).to(w.device, w.dtype)
        got = norm.forward(x).float()
        xf = x.float()
        want = w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    close = torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    return (w.detach().float(), eps) if close else None


def next_router_on_input(layer: MoeLayer, nxt: MoeLayer) -> RouterWeights | None:
    """`nxt`'s router folded so that it scores the input `layer`'s experts get. With plain RMSNorms (same
    eps) in front of both routers, norm_n(r) = (g_n / g_l) * norm_l(r) for one residual state r (both
    divide by the same rms), so router_n(norm_n(r)) = (W_n diag(g_n / g_l)) norm_l(r): the next layer's
    scores from the hidden state the experts already hold, with no hook on the residual stream and no
    norm to run (a channel that g_l zeroes is lost to both). None when either norm is not plain."""
    if layer.router is None or nxt.router is None:
        return None
    here, there = rms_scale(layer.norm), rms_scale(nxt.norm)
    if here is None or there is None or here[1] != there[1]:
        return None
    g_l, g_n = here[0], there[0]
    lost = g_l.abs() <= 1e-6 * float(g_l.abs().max())  # a channel this norm (all but) zeroes carries nothing
    ratio = torch.where(lost, torch.zeros_like(g_l), g_n / torch.where(lost, torch.ones_like(g_l), g_l))
    w = router_weights(nxt)
    return RouterWeights(w.weight * ratio, w.bias, w.correction)
