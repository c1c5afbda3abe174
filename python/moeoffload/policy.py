"""Per-layer error-bound policies: which bound each MoE layer's experts get.

A policy is data. ``BoundPolicy.from_any`` takes what ``table.build`` accepts:
a single float (every layer), a mapping ``{layer: bound}`` (every MoE layer must
be listed), a callable ``layer -> bound``, a ``BoundPolicy``, or the JSON that
``moeoffload policy`` writes (a dict or a path). ``mode`` says what a bound is
measured in: "abs" (absolute), "rel" (x the matrix's value range) or
"meanabs" (x the matrix's mean |w|, the sensitivity study's unit).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .codec import bound_value
from .errors import InvalidBoundError

MODES = ("abs", "rel", "meanabs")
POLICY_FORMAT = "moeoffload-bound-policy"


def _check_bound(value, where: str) -> float:
    """A bound as a float: a Python or numpy number or a 0-d tensor (codec.bound_value); InvalidBoundError naming where."""
    try:
        return bound_value(value)
    except InvalidBoundError as e:
        raise InvalidBoundError(f"{where}: {e}") from None


@dataclass(frozen=True)
class BoundPolicy:
    mode: str = "abs"
    default: float | None = None
    per_layer: dict[int, float] = field(default_factory=dict)
    fn: Callable[[int], float] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidBoundError(f"policy mode must be one of {MODES}, got {self.mode!r}")

    def bound(self, layer: int) -> float:
        if layer in self.per_layer:
            return self.per_layer[layer]
        if self.fn is not None:
            return _check_bound(self.fn(layer), f"policy({layer})")
        if self.default is not None:
            return self.default
        raise InvalidBoundError(f"the policy gives no bound for MoE layer {layer} (it lists {sorted(self.per_layer)})")

    def to_json(self, layers: list[int]) -> dict:
        return {"format": POLICY_FORMAT, "mode": self.mode,
                "bounds": {str(l): self.bound(l) for l in layers}}

    @classmethod
    def from_any(cls, policy, mode: str | None = None) -> "BoundPolicy":
        if isinstance(policy, BoundPolicy):
            return policy if mode in (None, policy.mode) else BoundPolicy(mode, policy.default, policy.per_layer, policy.fn)
        if isinstance(policy, (str, Path)):
            try:
                policy = json.loads(Path(policy).read_text(), object_pairs_hook=no_repeated_keys)
            except (OSError, ValueError, RecursionError) as e:  # (nesting deeper than the parser's stack)
                raise InvalidBoundError(f"cannot read the bound policy {policy}: {e}") from e
        if isinstance(policy, Mapping) and policy.get("format") == POLICY_FORMAT:
            bounds = policy.get("bounds")
            if not isinstance(bounds, Mapping):
                raise InvalidBoundError(f"a {POLICY_FORMAT} document needs \"bounds\": {{layer: bound}}, "
                                        f"got {type(bounds).__name__}")
            mode = mode or policy.get("mode", "abs")
            if not isinstance(mode, str):
                raise InvalidBoundError(f"policy mode must be one of {MODES}, got {mode!r}")
            return cls(mode, None, _per_layer(bounds))
        if isinstance(policy, Mapping):
            return cls(mode or "abs", None, _per_layer(policy))
        if callable(policy):
            return cls(mode or "abs", None, {}, policy)
        return cls(mode or "abs", _check_bound(policy, "policy"))


def no_repeated_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook for the files moeoffload writes: a JSON object's pairs as a dict, and a
    ValueError for a key given twice (which json keeps the last of, silently)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"an object gives {str(k)[:40]!r} twice")
        out[k] = v
    return out


def _per_layer(bounds: Mapping) -> dict[int, float]:
    """{MoE layer: bound} from a mapping whose keys are layer numbers (ints, or their decimal strings)."""
    per = {}
    for k, v in bounds.items():
        layer = int(k) if isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_)) else None
        if isinstance(k, str) and k.strip().isascii() and k.strip().isdecimal() and len(k.strip()) <= 9:
            layer = int(k)  # ("²" is a digit, not decimal; a thousand-digit number is no layer, and int() refuses it)
        if layer is None or not 0 <= layer < 10**9:
            raise InvalidBoundError(f"a policy's keys are MoE layer numbers (0, 1, ...), got {str(k)[:40]!r}")
        if layer in per:
            raise InvalidBoundError(f"the policy names MoE layer {layer} twice (as {str(k)[:40]!r} and before)")
        per[layer] = _check_bound(v, f"layer {k}")
    return per


def choose_bounds(options: dict[int, list[tuple[float, float, float]]], budget: float, bins: int = 400) -> dict[int, float] | None:
    """Per-layer bounds minimising total bits with the summed damage within `budget`.

    options: layer -> [(bound, damage, bits)], damage measured with that layer
    alone perturbed (negative damage counts as 0: no layer buys another's
    error). Damages are assumed to add across layers; the caller measures the
    result. A knapsack solved by dynamic programming over `bins` damage steps
    (costs rounded up, so the sum of true damages stays within budget). None
    when even the smallest bounds exceed the budget.
    """
    layers = sorted(options)
    if not (budget > 0):
        return None
    step = budget / bins
    INF = float("inf")
    # best[c] = (bits, choices) using damage <= c * step
    best = [(0.0, ())] + [(0.0, ())] * bins
    for layer in layers:
        new = [(INF, ())] * (bins + 1)
        for c in range(bins + 1):
            for bound, damage, bits in options[layer]:
                cost = 0 if damage <= 0 else math.ceil(damage / step - 1e-9)
                if cost > c:
                    continue
                prev_bits, prev = best[c - cost]
                if prev_bits + bits < new[c][0]:
                    new[c] = (prev_bits + bits, prev + ((layer, bound),))
        best = new
    bits, choice = best[bins]
    return None if bits == INF else dict(choice)
