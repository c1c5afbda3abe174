"""Trace replay: the cache and prefetch code of the runtime, on a recorded
routing trace, without weights.

    stats = moeoffload.sim.replay(trace, expert_bytes=3_000_000, budget=60_000_000,
                                  policy="activation", prefetch=PrefetchConfig())

A trace is integers [sequences, tokens, layers, k] (uint8 up to 256 experts, trace_dtype): the experts each token
chose at each MoE layer. Sequences are served one after another, each token
through every layer in order (decode order), on one cache that persists
across sequences. The cache is the native CacheIndex the DeviceCache uses, and
each layer's record -> predict -> plan is the native decision step the live
path runs (prefetch.decision_step); only the copies are modelled here.

Time is modelled, not measured: each layer computes for ``layer_seconds``;
copies go over one link of ``link_bytes_per_s`` in the order issued (a demand
fetch waits behind queued prefetches, as on a real PCIe link). An access
whose expert is not ready stalls the layer until it is.

``belady`` is Belady's MIN on the same trace and budget: the best any
demand-fetching cache can do, the upper bound the policies are compared with.
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _native
from .errors import InvalidArgumentError
from .prefetch import PrefetchConfig, decision_step

SLOT_ALIGN = 256
MAX_EXPERT_IDS = 2**20  # layers x experts a replay tracks (models have ~10^4): beyond it an id is a mistake


def trace_dtype(experts: int) -> np.dtype:
    """The narrowest dtype of a trace of `experts` ids a layer (uint8 wraps above 256 experts)."""
    return np.dtype(np.uint8 if experts <= 256 else np.uint16 if experts <= 65536 else np.uint32)


def _check_trace(trace, sequences_may_be_none: bool = False) -> np.ndarray:
    """The trace as an integer array [S, T, L, k] of non-negative expert ids; InvalidArgumentError
    otherwise. S may be 0 where a history of no sequences is asked for."""
    tr = np.asarray(trace)
    if tr.ndim != 4 or 0 in tr.shape[1:] or (tr.shape[0] == 0 and not sequences_may_be_none):
        raise InvalidArgumentError(f"a trace is [sequences, tokens, layers, k], none of them 0; got shape {tr.shape}")
    if tr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"a trace holds expert ids (integers), got {tr.dtype}")
    if tr.size and int(tr.min()) < 0:
        raise InvalidArgumentError(f"the trace routes to expert {int(tr.min())}: ids lie in [0, E)")
    return tr


def _experts_of(tr: np.ndarray, given=None, *known: int | None) -> int:
    """Experts per layer: `given` (every id of the trace below it), else the largest of what is known (a
    history's, the hidden predictions') and the trace's largest id + 1; refused when layers x experts is
    beyond any model (its tables would not fit in memory)."""
    high = int(tr.max()) if tr.size else -1
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 1:
            raise InvalidArgumentError(f"experts per layer must be a positive integer, got {given!r}")
        E = int(given)
        if high >= E:
            raise InvalidArgumentError(f"the trace routes to expert {high}: ids lie in [0, {E})")
    else:
        E = max([high + 1, 1, *(k for k in known if k is not None)])
    if tr.shape[2] * E > MAX_EXPERT_IDS:
        raise InvalidArgumentError(f"{E} experts per layer at {tr.shape[2]} layers: more expert ids than any model "
                                   f"has ({MAX_EXPERT_IDS}); is the trace (or experts=) of expert indices?")
    return E


def _expert_sizes(expert_bytes, n: int) -> np.ndarray:
    try:
        sizes = np.broadcast_to(np.asarray(expert_bytes, dtype=np.int64), (n,)).copy()
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidArgumentError(f"expert_bytes must be one size or one per expert id ({n}): {e}") from None
    if (sizes <= 0).any():
        raise InvalidArgumentError("expert_bytes must be positive")
    return sizes


def _check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 <= budget < 2**63:
        raise InvalidArgumentError(f"budget must be a non-negative number of bytes, got {budget!r}")
    return int(budget)


@dataclass
class ReplayStats:
    policy: str
    prefetch: str
    budget: int
    accesses: int
    hits: int             # ready when needed
    inflight_hits: int    # fetched ahead but still on the link when needed
    demand_misses: int
    prefetches: int
    prefetch_hits: int
    prefetch_unused: int
    evictions: int
    bytes_moved: int
    stalls: int           # accesses that waited (demand misses + late prefetches)
    stall_seconds: float
    compute_seconds: float

    @property
    def hit_rate(self) -> float:
        """Accesses that needed no demand fetch (ready or already in flight)."""
        return (self.hits + self.inflight_hits) / max(self.accesses, 1)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["hit_rate"] = self.hit_rate
        return d


def replay(trace, expert_bytes, budget: int, policy: str = "lru", prefetch: PrefetchConfig | None = None, *,
           history=None, hidden_predictions=None, link_bytes_per_s: float = 25e9, layer_seconds: float = 1e-4,
           experts: int | None = None, check_invariants: bool = False) -> ReplayStats:
    """Replay `trace` through a CacheIndex of `budget` bytes.

    expert_bytes: one size for all experts, or an array per expert id.
    policy: "lru", "lfu" or "activation" (the activation policy's priorities
        come from the activation predictor, whether or not it prefetches).
    prefetch: None, or a PrefetchConfig; sources "hidden" and "combined" need
        hidden_predictions [sequences, tokens, layers, experts]: at layer l, the
        predicted probabilities for layer l+1 (the next router on the current
        hidden state).
    history: an ActivationHistory of past sequences (from the table), or None
        to start empty; every replayed sequence is added when it ends.
    experts: experts per layer (default: the largest of the history's, the predictions' and the trace's
        largest id + 1).
    """
    tr = _check_trace(trace)
    S, T, L, K = tr.shape
    if hidden_predictions is not None:
        hidden_predictions = np.ascontiguousarray(hidden_predictions, dtype=np.float32)
        if hidden_predictions.ndim != 4 or hidden_predictions.shape[:3] != (S, T, L):
            raise InvalidArgumentError(f"hidden_predictions must be [{S}, {T}, {L}, experts] for this trace, got "
                                       f"{list(hidden_predictions.shape)}")
    E = _experts_of(tr, experts, getattr(history, "experts_per_layer", None),  # (decision_step checks history)
                    None if hidden_predictions is None else hidden_predictions.shape[3])
    sizes = _expert_sizes(expert_bytes, L * E)
    for name, v in (("link_bytes_per_s", link_bytes_per_s), ("layer_seconds", layer_seconds)):
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and (v > 0 if name == "link_bytes_per_s" else v >= 0)):
            raise InvalidArgumentError(f"{name} must be a finite {'positive' if name == 'link_bytes_per_s' else 'non-negative'} number, got {v!r}")
    cache = _native.CacheIndex(_check_budget(budget), policy, L, E, int(sizes.max()))
    decisions = decision_step(L, E, prefetch, policy, history)
    if decisions.needs_hidden and hidden_predictions is None:
        raise InvalidArgumentError(f"prefetch source {prefetch.source!r} needs hidden_predictions")

    now = 0.0
    link_free = 0.0
    ready_at: dict[int, float] = {}
    pending: list[tuple[float, int]] = []  # (ready time, id) of copies in flight
    stalls, stall_seconds = 0, 0.0

    def issue(eid: int) -> float:
        nonlocal link_free
        start = max(now, link_free)
        link_free = start + sizes[eid] / link_bytes_per_s
        ready_at[eid] = link_free
        heapq.heappush(pending, (link_free, eid))
        return link_free

    def retire(until: float) -> None:
        while pending and pending[0][0] <= until:
            t, eid = heapq.heappop(pending)
            if ready_at.get(eid) == t and cache.loading(eid):
                cache.mark_ready(eid)

    for s in range(S):
        routed = np.ascontiguousarray(tr[s], dtype=np.uint32)
        decisions.begin_sequence()
        for t in range(T):
            for l in range(L):
                retire(now)
                needed = [int(e) + l * E for e in dict.fromkeys(tr[s, t, l].tolist())]
                wait_until = now
                for eid in needed:
                    r = cache.access(eid)
                    if r == 2:  # miss: fetch on demand
                        cache.insert_demand(eid, int(sizes[eid]))
                        wait_until = max(wait_until, issue(eid))
                    elif r == 1:  # in flight
                        wait_until = max(wait_until, ready_at[eid])
                    cache.pin(eid)
                if wait_until > now:
                    stalls += sum(1 for eid in needed if ready_at.get(eid, 0.0) > now)
                    stall_seconds += wait_until - now
                    now = wait_until
                retire(now)
                hidden_next = None if hidden_predictions is None else hidden_predictions[s, t, l]
                for eid, pri in decisions.step(l, routed[t, l], hidden_next, cache):
                    if cache.insert_prefetch(eid, int(sizes[eid]), pri) is not None:
                        issue(eid)
                if check_invariants:
                    cache.check_invariants()
                now += layer_seconds
                for eid in needed:
                    cache.unpin(eid)
        decisions.end_sequence()
    st = cache.stats()
    return ReplayStats(
        policy=policy, prefetch="none" if prefetch is None else prefetch.source, budget=int(budget),
        accesses=st["accesses"], hits=st["hits"], inflight_hits=st["inflight_hits"], demand_misses=st["misses"],
        prefetches=st["prefetches"], prefetch_hits=st["prefetch_hits"], prefetch_unused=st["prefetch_unused"],
        evictions=st["evictions"], bytes_moved=st["bytes_loaded"], stalls=stalls, stall_seconds=stall_seconds,
        compute_seconds=S * T * L * layer_seconds)


def activation_matrices(trace, experts_per_layer: int) -> list[np.ndarray]:
    """Each sequence's activation matrix of `trace` [S, T, L, k]: uint32 counts [L * experts_per_layer]
    (none for S = 0)."""
    tr = _check_trace(trace, sequences_may_be_none=True)
    experts_per_layer = _experts_of(tr, experts_per_layer)
    S, T, L, K = tr.shape
    out = []
    for s in range(S):
        m = np.zeros((L, experts_per_layer), np.uint32)
        for l in range(L):
            np.add.at(m[l], tr[s, :, l].ravel().astype(np.int64), 1)
        out.append(m.ravel())
    return out


def history_from_trace(trace, experts_per_layer: int, capacity: int | None = None):
    """An ActivationHistory holding each sequence's activation matrix of `trace` [S, T, L, k]."""
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise InvalidArgumentError(f"capacity must be a positive number of sequences or None, got {capacity!r}")
    matrices = activation_matrices(trace, experts_per_layer)
    L = np.shape(trace)[2]
    hist = _native.ActivationHistory(L, experts_per_layer, capacity or max(len(matrices), 1))
    for m in matrices:
        hist.add(m)
    return hist


def belady(trace, expert_bytes, budget: int, *, experts: int | None = None) -> dict:
    """Belady's MIN on the trace's access sequence: evict the expert used furthest in the future.

    Capacity is budget // (largest slot): exact when experts have one size.
    """
    tr = _check_trace(trace)
    S, T, L, K = tr.shape
    E = _experts_of(tr, experts)
    sizes = _expert_sizes(expert_bytes, L * E)
    slot = int(-(-int(sizes.max()) // SLOT_ALIGN) * SLOT_ALIGN)
    capacity = _check_budget(budget) // slot
    if capacity < K:
        raise InvalidArgumentError(f"a budget of {budget} bytes holds {capacity} experts, fewer than top-k = {K}")
    steps = [[int(e) + l * E for e in dict.fromkeys(tr[s, t, l].tolist())]
             for s in range(S) for t in range(T) for l in range(L)]
    INF = len(steps) + 1
    next_use: list[list[int]] = [[] for _ in steps]
    last: dict[int, int] = {}
    for i in range(len(steps) - 1, -1, -1):
        next_use[i] = [last.get(eid, INF) for eid in steps[i]]
        for eid in steps[i]:
            last[eid] = i
    resident: dict[int, int] = {}  # id -> next use
    heap: list[tuple[int, int]] = []  # (-next use, id), lazy
    hits = misses = moved = 0
    for i, ids in enumerate(steps):
        for eid, nu in zip(ids, next_use[i]):
            if eid in resident:
                hits += 1
            else:
                misses += 1
                moved += int(sizes[eid])
                skipped = []
                while len(resident) >= capacity:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) != -neg:
                        continue  # stale entry
                    if victim in ids:
                        skipped.append((neg, victim))  # needed by this very step
                        continue
                    del resident[victim]
                for item in skipped:
                    heapq.heappush(heap, item)
            resident[eid] = nu
            heapq.heappush(heap, (-nu, eid))
    accesses = hits + misses
    return {"policy": "belady", "prefetch": "none", "budget": int(budget), "accesses": accesses, "hits": hits,
            "demand_misses": misses, "bytes_moved": moved, "hit_rate": hits / max(accesses, 1)}


def synthetic_trace(num_sequences: int = 48, tokens: int = 128, num_layers: int = 24, experts: int = 32, k: int = 2,
                    topics: int = 6, concentration: float = 0.3, zipf: float = 1.0, topic_weight: float = 0.7,
                    stickiness: float = 0.4, seed: int = 0) -> np.ndarray:
    """Skewed, sequence-correlated routing.

    Each sequence draws one of `topics` topics. A topic has, per layer, a
    Dirichlet(`concentration`) preference over experts; a sequence routes from
    topic_weight x its topic's preference + (1 - topic_weight) x a global Zipf(`zipf`)
    popularity (a random expert order per layer). Each token keeps its
    previous token's choice at a layer with probability `stickiness`, else
    draws k distinct experts from the sequence's distribution.
    """
    for name, v in (("num_sequences", num_sequences), ("tokens", tokens), ("num_layers", num_layers),
                    ("experts", experts), ("k", k), ("topics", topics)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
    if k > experts:
        raise InvalidArgumentError(f"k = {k} distinct experts a token, of {experts}")
    if not (concentration > 0 and math.isfinite(concentration)) or not 0 <= topic_weight <= 1 \
            or not 0 <= stickiness <= 1 or not math.isfinite(zipf):
        raise InvalidArgumentError("concentration must be positive and finite, topic_weight and stickiness in [0, 1], "
                                   "zipf finite")
    rng = np.random.default_rng(seed)
    pref = rng.dirichlet(np.full(experts, concentration), size=(topics, num_layers))
    ranks = np.argsort(rng.random((num_layers, experts)), axis=1)
    glob = 1.0 / (1.0 + ranks) ** zipf
    glob /= glob.sum(axis=1, keepdims=True)
    out = np.zeros((num_sequences, tokens, num_layers, k), dtype=trace_dtype(experts))
    for s in range(num_sequences):
        z = rng.integers(topics)
        p = topic_weight * pref[z] + (1 - topic_weight) * glob
        for t in range(tokens):
            for l in range(num_layers):
                if t > 0 and rng.random() < stickiness:
                    out[s, t, l] = out[s, t - 1, l]
                else:
                    out[s, t, l] = rng.choice(experts, size=k, replace=False, p=p[l])
    return out
