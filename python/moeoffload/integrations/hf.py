"""Hugging Face transformers 5: the "moeoffload" experts implementation and offload().

    model = AutoModelForCausalLM.from_pretrained(...)
    off = moeoffload.offload(model, gpu_budget="6GiB", error_bound=0.3)   # 0.3 x mean|w| per matrix
    model.generate(...)                                                   # experts compressed, cached, fused
    off.stats(); off.close()

offload() builds an expert table from the model's own experts (or takes one),
frees the dense expert parameters (they become meta tensors), and sets the
model's experts implementation to "moeoffload", registered once in
transformers' ``ExpertsInterface``. Each experts module then calls
``experts_forward``: it records the routing (tracer), prefetches ahead (the
activation prediction, or the next layer's router on the current hidden state),
acquires each routed expert's slot, runs the fused ``expert_mlp`` op on the
compressed bytes, scatters the weighted outputs, and releases.

Paths: fused (szp, a gate the kernel knows: models.adapters.gate_kind) or the
family's own eager code on weights read from the slots (codec "none": views of
the raw bytes, so the logits equal the original model's exactly; szp with a
gate the kernel does not know: decoded weights). Sequence boundaries: a
forward of the model on an empty KV cache (a prefill, or a forward without a
cache) starts a new sequence of the activation predictor, whatever the batch;
``begin_sequence()`` says so explicitly. Under ``torch.compile`` the experts
are one opaque op (``moeoffload::offload_experts``).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import warnings
import weakref

import numpy as np
import torch
from torch import nn

from ..cache import ExpertCache, parse_budget, slot_bytes
from ..errors import (BudgetError, ClosedError, CudaError, InvalidArgumentError, MissingExpertError, TableError,
                      TableMismatchError, UnsupportedDtypeError)
from ..models.adapters import (UnsupportedModelError, expert_matrix_names, gate_kind, moe_layers, next_router_on_input,
                               router_probabilities, router_scores, router_weights)
from ..prefetch import PrefetchConfig
from .. import ops as _ops  # also registers torch.ops.moeoffload.*
from .. import table as _table
from .stalls import Stalls

IMPLEMENTATION = "moeoffload"
PREFETCH = ("hidden", "activation", "combined", None)
_CODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NotOffloadedError(InvalidArgumentError):
    """An experts module ran with experts_implementation="moeoffload" but belongs to no offload()."""


def register() -> None:
    """Register "moeoffload" in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "moeoffload" experts implementation (transformers calls it with the experts module). Under
    torch.compile it is one opaque op (moeoffload::offload_experts), so the model traces into one graph
    around its MoE layers and the compiler fuses the rest: the attention, the norms, the router."""
    key = getattr(self, "_moeoffload_key", None)
    if key is None:
        raise NotOffloadedError(f"{type(self).__name__} runs with experts_implementation='moeoffload' but was not "
                                "offloaded: call moeoffload.offload(model) first")
    if torch.compiler.is_compiling():
        return torch.ops.moeoffload.offload_experts(hidden_states, top_k_index, top_k_weights, *key)
    off, layer = self._moeoffload
    return off._forward(layer, self, hidden_states, top_k_index, top_k_weights)


_NO_PREDICTION = np.empty(0, np.float32)  # hidden_next for a step with no hidden-state prediction
_LIVE: dict[int, weakref.ref] = {}  # Offload.key -> the Offload, for the op (its arguments are ints and tensors)
_keys = itertools.count(1)


@torch.library.custom_op("moeoffload::offload_experts", mutates_args=(), tags=_ops.UNSAFE_IN_CUDA_GRAPHS)
def _offload_experts_op(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        offload: int, layer: int) -> torch.Tensor:
    # Not capturable in a CUDA graph: it reads the routing on the host and fetches what is missing.
    if offload not in _LIVE:
        raise InvalidArgumentError(f"no offload has key {offload} (offload keys come from moeoffload.offload)")
    off = _LIVE[offload]()
    if off is None or off.closed:
        raise ClosedError("this offload is closed: its experts are gone, load the model again")
    if not 0 <= layer < len(off.layers):
        raise InvalidArgumentError(f"layer {layer} is not one of the offload's {len(off.layers)} MoE layers")
    return off._forward(layer, off.layers[layer].experts, hidden_states, top_k_index, top_k_weights, compiled=True)


@_offload_experts_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, offload, layer):
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


def _source_state_dict(layers) -> dict[str, torch.Tensor]:
    """The experts' parameters under names table.build reads ('layers.N.experts.<name>' [E, ...])."""
    out = {}
    for ml in layers:
        for name in expert_matrix_names(ml.experts):
            out[f"layers.{ml.index}.experts.{name}"] = getattr(ml.experts, name).detach()
    return out


class Offload:
    """A model whose experts are served by moeoffload: ``stats()``, ``begin_sequence()``, ``close()``."""

    def __init__(self, model: nn.Module, table=None, gpu_budget="6GiB", error_bound=0.3, codec: str = "szp",
                 cache_policy: str = "activation", prefetch: str | None = "hidden", *, error_mode: str = "meanabs",
                 progress: bool = False):
        self._owns_table = False  # from_pretrained hands over the tables it opened
        if prefetch not in PREFETCH:
            raise InvalidArgumentError(f"prefetch must be one of {PREFETCH}, got {prefetch!r}")
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"offload() takes a transformers model (an nn.Module), got {type(model).__name__}")
        if table is not None and not isinstance(table, _table.ExpertTable):
            raise InvalidArgumentError(f"table must be an ExpertTable or a table directory, got {type(table).__name__}")
        self.model = model
        self.layers = moe_layers(model)
        first = self.layers[0].experts
        if any(hasattr(ml.experts, "_moeoffload") for ml in self.layers):
            raise InvalidArgumentError("this model's experts are offloaded already (their dense weights were freed, "
                                       "whether or not that Offload is closed): load the model again to offload it")
        if table is None and first.down_proj.device.type == "meta":
            raise InvalidArgumentError("the model's experts are meta tensors, with no weights to build a table from: "
                                       "give table=, or use from_pretrained(checkpoint_dir)")
        _check_offload_codec(codec if table is None else table.manifest["codec"], "codec" if table is None else "table")
        self.device = first.down_proj.device if first.down_proj.device.type != "meta" else _device_of(model)
        self.kinds = [gate_kind(ml.experts) for ml in self.layers]
        E = first.down_proj.shape[0]
        if any(ml.experts.down_proj.shape[0] != E for ml in self.layers):
            raise UnsupportedModelError("the MoE layers have different numbers of experts")
        if table is None:
            transpose = codec != "none" and first.is_transposed  # fused kernels read [out, in]
            table = _table.build(_source_state_dict(self.layers), error_bound, codec,
                                 mode=error_mode, model_id=getattr(model.config, "name_or_path", None) or "model",
                                 progress=progress, transpose=transpose)
        if table.num_layers != len(self.layers) or table.experts_per_layer != E:
            raise UnsupportedModelError(f"the table holds {table.num_layers} layers of {table.experts_per_layer} "
                                        f"experts, the model {len(self.layers)} of {E}")
        _check_table_fits(table, self.layers, self.kinds)  # before anything of the model is freed
        self.table = table
        self._ids_of_layer = [list(range(l * E, (l + 1) * E)) for l in range(len(self.layers))]  # moe_experts' ids
        self.codec = table.manifest["codec"]
        self.names = table.matrix_names
        self._gate_up_down: list[tuple[int, int] | None] = [None] * len(self.layers)  # matrix indices, at first use
        cfg = None
        lacking = [ml.name for ml in self.layers if ml.router is None or ml.norm is None]
        if prefetch in ("hidden", "combined") and lacking:
            warnings.warn(f"prefetch={prefetch!r} applies each MoE layer's router to the residual stream in front "
                          f"of its norm, and {lacking[0]} has no router or norm moeoffload can find "
                          "(models/adapters.py): prefetching from the activation history instead", stacklevel=3)
            prefetch = "activation"
        if prefetch is not None:
            k = int(getattr(model.config, "num_experts_per_tok", 2) or 2)
            # bench/cache_policies.py's tuned plan: twice top-k per layer, three layers ahead (the hidden
            # state predicts the next layer only)
            cfg = PrefetchConfig(source=prefetch, depth=1 if prefetch == "hidden" else 3, per_layer=2 * k,
                                 min_probability=0.02, recency=0.5)
        backend = "cuda" if self.device.type == "cuda" else "cpu"
        self.cache = ExpertCache(table, _budget_bytes(gpu_budget, table), policy=cache_policy, prefetch=cfg,
                                 backend=backend)
        self.prefetch = None if cfg is None else cfg.source
        self._residual: dict[int, torch.Tensor] = {}
        # per layer, what predicts the next layer's routing: the next router folded for the experts' input
        # (next_router_on_input), else that router on the hooked residual stream
        self._input_routers: list = [None] * len(self.layers)
        self._residual_routers: list = [None] * len(self.layers)
        self._warned_compiled = False
        self._starts_sequence: bool | None = None  # set by the model's call: an empty KV cache starts one
        self._hooks = []
        self._in_sequence = False
        self._tokens = 0
        self._stalls = Stalls(device_ordered=self.device.type == "cuda")
        self.expert_bytes_freed = 0
        try:
            if cfg is not None and cfg.source != "activation":
                L = len(self.layers)
                # the next router scores the experts' own input where both norms are plain RMSNorms;
                # elsewhere it needs the residual stream in front of this layer's norm: hooked
                self._input_routers = [next_router_on_input(ml, self.layers[(ml.index + 1) % L]) for ml in self.layers]
                for ml in self.layers:
                    if ml.norm is not None and self._input_routers[ml.index] is None:
                        self._residual_routers[ml.index] = router_weights(self.layers[(ml.index + 1) % L])
                        self._hooks.append(ml.norm.register_forward_pre_hook(
                            lambda mod, args, i=ml.index: self._residual.__setitem__(i, args[0].detach())))
            self._hooks.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._free_dense_experts()
            register()
            self.key = next(_keys)
            _LIVE[self.key] = weakref.ref(self)  # kept after close (the op then says closed), dropped with self
            weakref.finalize(self, _LIVE.pop, self.key, None)
            for ml in self.layers:
                ml.experts._moeoffload = (self, ml.index)
                ml.experts._moeoffload_key = (self.key, ml.index)
            model.set_experts_implementation(IMPLEMENTATION)
        except BaseException:
            self.close()
            raise

    def _free_dense_experts(self) -> None:
        for ml in self.layers:
            for name in expert_matrix_names(ml.experts):
                p = getattr(ml.experts, name)
                if p.device.type != "meta":
                    self.expert_bytes_freed += p.numel() * p.element_size()
                setattr(ml.experts, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=False))

    # ---- the forward ----
    def begin_sequence(self) -> None:
        if self._in_sequence:
            self.cache.end_sequence()
        self.cache.begin_sequence()
        self._in_sequence = True

    @torch.compiler.disable  # a flag for the experts' op: set now, not when a compiled graph ends
    def _on_model_call(self, module, args, kwargs) -> None:
        """A forward with no KV cache, or an empty one, starts a sequence; one that extends a cache does
        not, however many tokens it carries (a batch's decode step has one a sequence)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        length = getattr(cache, "get_seq_length", None)
        self._starts_sequence = True if cache is None else (int(length()) == 0 if callable(length) else None)

    def _next_scores(self, layer: int, hidden: torch.Tensor, compiled: bool = False) -> torch.Tensor | np.ndarray | None:
        """The next MoE layer's mean routing scores [E], predicted from this layer's hidden state, as a host
        tensor: from cuda a non-blocking copy, to be read once the stream has synchronised (_forward queues
        it with the routing's copy, and one wait brings both). None when prefetch does not predict from the
        hidden state, _NO_PREDICTION when there is nothing to predict from."""
        if self.prefetch in (None, "activation"):
            return None
        folded = self._input_routers[layer]
        if folded is not None:  # from the experts' input: one small matmul, compiled or not
            probs = router_scores(hidden.detach(), folded)
        else:
            nxt = self.layers[(layer + 1) % len(self.layers)]
            residual = None if compiled else self._residual.get(layer)
            if residual is None:  # no norm to hook in front of this layer's router, or a compiled graph's stale one
                return _NO_PREDICTION
            probs = router_probabilities(nxt, residual, self._residual_routers[layer])
        return (probs[0] if probs.shape[0] == 1 else probs.mean(0)).to("cpu", non_blocking=probs.is_cuda)

    @staticmethod
    def _hidden_next(scores: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
        """_next_scores' scores for the decision step (read after the stream's synchronisation); an empty
        array when there is no prediction (the decision step then plans from the activation alone, or
        nothing)."""
        if scores is None or isinstance(scores, np.ndarray):
            return scores
        p = scores.numpy()
        if not np.isfinite(p).all():  # an overflowed hidden state: a prediction is advice, the forward goes on
            return _NO_PREDICTION
        return p

    def _forward(self, layer: int, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        if self.cache.closed:
            raise ClosedError("this offload is closed: its experts are gone, load the model again")
        if compiled and not self._warned_compiled:
            self._warned_compiled = True
            if self.prefetch in ("hidden", "combined") and any(r is None for r in self._input_routers):
                warnings.warn(f"prefetch={self.prefetch!r} under torch.compile: this model's router norms are not "
                              "plain RMSNorms, so the prediction needs the residual stream from the norms' hooks, "
                              "which a compiled graph hands over only after it ends: no hidden-state prefetch "
                              "(use prefetch='activation' with torch.compile)", stacklevel=2)
        if layer == 0:
            starts, self._starts_sequence = self._starts_sequence, None
            if starts is None:  # the model's own call was not seen (an inner module called directly)
                starts = hidden.shape[0] > 1
            if starts or not self._in_sequence:
                self.begin_sequence()
            self._tokens += hidden.shape[0]
        on_cuda = hidden.device.type == "cuda"
        if on_cuda:  # the next layer's prediction and the routing go to the host together: one wait, not two
            scores = self._next_scores(layer, hidden, compiled)
            ids = top_k_index.reshape(-1).to("cpu", non_blocking=True)
            torch.cuda.current_stream(hidden.device).synchronize()
            ids = ids.numpy()
        else:  # on the cpu the prediction is computed after the layer's own fetches have started
            scores, ids = None, top_k_index.reshape(-1).cpu().numpy()
        experts = sorted(set(ids.tolist()))  # np.unique costs 40 µs on eight values
        held: dict[int, object] = {}
        try:
            self._acquire_ahead(layer, experts, held)  # the layer's own fetches go first, and stay pinned
            if not on_cuda:
                scores = self._next_scores(layer, hidden, compiled)
            self.cache.record(layer, ids, hidden_next=self._hidden_next(scores))  # then the decision step prefetches
            kind = self.kinds[layer]
            if kind is not None and self.codec in _table.FUSED_CODECS and len(held) == len(experts) and (
                    hidden.device.type == "cpu" or ids.size <= _ops.MAX_CUDA_ASSIGNMENTS):
                return self._forward_layer(layer, module, kind, held, hidden, ids, top_k_weights)  # checks routing
            _check_each_token_routes_an_expert_once(ids, top_k_index.shape[-1])  # as moe_experts does
            if kind is None or self.codec not in _table.FUSED_CODECS:
                return self._forward_eager(layer, module, held, hidden, top_k_index, top_k_weights)
            return self._forward_fused(layer, module, kind, experts, held, hidden, ids.reshape(top_k_index.shape),
                                       top_k_weights)
        finally:
            self._release_all(layer, held)

    def _forward_layer(self, layer, module, kind, held, hidden, ids, top_k_weights):
        """Every routed expert is held: the whole layer in one native call (moe_experts)."""
        self._ready(held.values())
        gu, down = self._matrix_indices(layer, module)
        ids_of_layer = self._ids_of_layer[layer]
        gu_bias = module.gate_up_proj_bias.to(hidden.dtype) if module.has_bias else None
        down_bias = module.down_proj_bias.to(hidden.dtype) if module.has_bias else None
        return _ops.moe_experts_call(hidden, torch.from_numpy(ids).view(top_k_weights.shape), top_k_weights,
                                     self.cache.handle, ids_of_layer, gu, ids_of_layer, down, gu_bias, down_bias,
                                     kind.act, _ops.GATE_LAYOUTS[kind.layout], kind.alpha, kind.limit)

    def _forward_fused(self, layer, module, kind, experts, held, hidden, routing, top_k_weights):
        """Expert by expert, as room frees up: when the budget cannot hold all of a layer's experts at once.
        routing: the top-k ids on the host (an expert's tokens are found there: no device sync an expert)."""
        out = torch.zeros_like(hidden)
        gu, down = self._matrix_indices(layer, module)
        handle = self.cache.handle

        def run(e: int, slot) -> None:
            token_idx, pos = (torch.from_numpy(i).to(hidden.device, non_blocking=True)
                              for i in np.nonzero(routing == e))
            self._ready([slot])
            eid = self.table.expert_id(layer, e)
            gu_bias = module.gate_up_proj_bias[e].to(hidden.dtype) if module.has_bias else None
            down_bias = module.down_proj_bias[e].to(hidden.dtype) if module.has_bias else None
            y = torch.ops.moeoffload.expert_mlp(hidden[token_idx], handle, eid, gu, handle, eid, down, gu_bias,
                                                down_bias, kind.act, _ops.GATE_LAYOUTS[kind.layout],
                                                kind.alpha, kind.limit)
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))

        self._each_acquired(layer, experts, held, run)
        return out

    def _matrix_indices(self, layer: int, module: nn.Module) -> tuple[int, int]:
        """The table's indices of the layer's gate_up and down matrices (looked up once a layer)."""
        found = self._gate_up_down[layer]
        if found is None:
            found = self._gate_up_down[layer] = tuple(self.names.index(n) for n in expert_matrix_names(module))
        return found

    def _acquire_ahead(self, layer: int, experts: list[int], held: dict) -> None:
        """Pins `experts` in order into `held` (their copies start now and overlap compute) until the budget
        has no free slot; only the first acquire may wait for room (while this thread holds pins, waiting
        would wait for itself)."""
        todo = [e for e in experts if e not in held]
        if todo:
            held.update(zip(todo, self.cache.acquire_ahead(layer, todo, holding_pins=bool(held))))

    def _release_all(self, layer: int, held: dict) -> None:
        if held:  # the fused paths release as they go: usually nothing is left
            experts = list(held)
            held.clear()
            self.cache.release_all(layer, experts, self._compute_stream())

    def _compute_stream(self) -> int | None:
        """Where the kernels reading the slots are queued (cuda): a release names it, so that no fetch
        overwrites a slot under them (DeviceCache::release); None on the cpu backend."""
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None

    def _each_acquired(self, layer: int, experts: list[int], held: dict, fn) -> None:
        """fn(expert, slot) for every expert in order, releasing each after its fn; the slots `held` holds
        were acquired ahead, the rest as room frees up (held is always a run of `experts` from the current)."""
        for i, e in enumerate(experts):
            if e not in held:
                self._acquire_ahead(layer, experts[i:], held)
            slot = held[e]
            try:
                fn(e, slot)
            finally:
                del held[e]
                self.cache.release(layer, e, self._compute_stream())  # fn's kernels may still be queued

    def _forward_eager(self, layer, module, held, hidden, top_k_index, top_k_weights):
        """The family's own eager forward, its expert weights read from the slots (views of raw bytes, or
        decoded): exact for codec "none"; the unfused variant for gates the fused kernel does not know."""
        weights = _SlotWeights(self, layer, held, hidden.dtype)
        proxy = _ExpertsView(module, weights)
        try:
            return type(module).forward.__wrapped__(proxy, hidden, top_k_index, top_k_weights)
        finally:
            weights.release()

    def _matrix_tensor(self, layer: int, expert: int, slot, name: str, device, dtype: torch.dtype) -> torch.Tensor:
        """The matrix as the model reads it, in the hidden state's dtype (a model cast after offload(): .half())."""
        m = self.table.matrix_entry(layer, expert, name)
        eid = self.table.expert_id(layer, expert)
        if self.codec == "none":
            w = _view(slot.data_ptr + m["offset"], m["bytes"], device).view(_CODE_DTYPES[m["dtype"]]).reshape(m["shape"])
        else:
            w = torch.ops.moeoffload.szp_decode(self.cache.handle, eid, self.names.index(name), device)
        if w.dtype != dtype:
            w = w.to(dtype)
        return w.T if m.get("transposed") else w

    def _ready(self, slots) -> None:
        """The slots' bytes made visible to the compute queued next: waited for on the cpu, the compute
        stream ordered after their copies on cuda (stalls.py); the stall is counted either way."""
        self._stalls.ready(slots, self._compute_stream())

    # ---- the handle ----
    def stats(self) -> dict:
        """The cache's counters, the bytes the dense experts held, the table's coding, tokens seen."""
        # bytes_loaded: what landed in the cache; bus_bytes: what crossed (less for szpe, transcoded on arrival)
        return {**self.cache.stats(), "bus_bytes": self.cache.engine.stats()["bytes"], "codec": self.codec,
                "bits_per_weight": self.table.bits_per_weight(),
                "expert_bytes_freed": self.expert_bytes_freed, "tokens": self._tokens, "prefetch": self.prefetch,
                "stall_s": self._stalls.seconds(),
                "fused_layers": sum(k is not None for k in self.kinds) if self.codec in _table.FUSED_CODECS else 0}

    @property
    def closed(self) -> bool:
        return self.cache.closed if hasattr(self, "cache") else True

    def close(self) -> None:
        """Stop serving: the model's experts are gone (meta tensors); load the model again to use it."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if hasattr(self, "cache"):
            if self._in_sequence and not self.cache.closed:
                self.cache.end_sequence()
                self._in_sequence = False
            self.cache.close()
        if getattr(self, "_owns_table", False) and hasattr(self, "table"):
            self.table.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _SlotWeights:
    """gate_up_proj / down_proj / up_proj of one experts module as the eager code indexes them: [e] reads
    expert e's matrix from its slot (`held`: the slots acquired ahead; others are acquired here, once per
    forward); all released at the end."""

    def __init__(self, off: Offload, layer: int, held: dict, dtype: torch.dtype):
        self.off, self.layer, self.device, self.dtype = off, layer, off.device, dtype
        self.held = held
        self.landed: set[int] = set()

    def matrix(self, name: str, e) -> torch.Tensor:
        e = int(e)
        if e not in self.held:
            self.off._acquire_ahead(self.layer, [e], self.held)
            if e not in self.held:  # no room: the eager code is done with the experts it indexed before
                self.release()
                self.off._acquire_ahead(self.layer, [e], self.held)
        slot = self.held[e]
        if e not in self.landed:
            self.off._ready([slot])
            self.landed.add(e)
        return self.off._matrix_tensor(self.layer, e, slot, name, self.device, self.dtype)

    def release(self) -> None:
        self.landed.clear()
        self.off._release_all(self.layer, self.held)


class _Matrices:
    def __init__(self, weights: _SlotWeights, name: str):
        self.weights, self.name = weights, name

    def __getitem__(self, e) -> torch.Tensor:
        return self.weights.matrix(self.name, e)


class _ExpertsView:
    """The experts module as its eager forward sees it, with the expert matrices served from the cache."""

    def __init__(self, module: nn.Module, weights: _SlotWeights):
        object.__setattr__(self, "_module", module)
        for name in expert_matrix_names(module):
            object.__setattr__(self, name, _Matrices(weights, name))

    def __getattr__(self, name):
        return getattr(self._module, name)


def _check_table_fits(table, layers, kinds) -> None:
    """TableMismatchError unless every expert of the table holds the model's expert matrices: by name; by
    shape as the model keeps them (a matrix stored transposed, shape reversed); stored [out, in] where the
    fused kernels read it (kinds[i] not None); in the model's dtype where the family's own code reads it
    (raw weights, or decoded ones of a gate the kernels do not know)."""
    fused_codec = table.manifest["codec"] in _table.FUSED_CODECS
    for ml, kind in zip(layers, kinds):
        fused = fused_codec and kind is not None
        want = {}
        for name in expert_matrix_names(ml.experts):
            p = getattr(ml.experts, name)
            want[name] = (tuple(p.shape[1:]), str(p.dtype).removeprefix("torch."))
        as_model = bool(getattr(ml.experts, "is_transposed", False))  # the model keeps [in, out] (GPT-OSS)
        for e in range(table.experts_per_layer):
            try:
                entry = table.entry(ml.index, e)
            except MissingExpertError:
                raise TableMismatchError(f"the table has no layer {ml.index} expert {e}: rebuild it from this "
                                         "model") from None
            have = {m["name"]: m for m in entry["matrices"]}
            for name, (shape, dtype) in want.items():
                m = have.get(name)
                flipped = m is not None and bool(m.get("transposed"))
                stored = None if m is None else tuple(m["shape"])[::-1] if flipped else tuple(m["shape"])
                if stored != shape:
                    advice = ": build the table from this model, or let offload() build it"
                elif fused and flipped != as_model:
                    advice = f"; the fused kernels read [out, in]: build it with transpose={as_model}"
                elif not fused and m["dtype"] != dtype:
                    advice = ("; the model's own code computes with these weights, so their dtypes must agree: load "
                              f"the model as {m['dtype']} (dtype=) or build the table from it as it is")
                else:
                    continue
                found = "no such matrix" if m is None else \
                    f"{list(m['shape'])} {m['dtype']}" + (" stored transposed" if flipped else "")
                raise TableMismatchError(f"the table does not fit this model: layer {ml.index} expert {e}'s {name} is "
                                         f"{list(shape)} {dtype} in the model, {found} in the table (its matrices: "
                                         f"{sorted(have)}){advice}")


def _check_each_token_routes_an_expert_once(ids: np.ndarray, k: int) -> None:
    """The paths that do not go through moe_experts refuse what it refuses (cpp/kernels/moe_experts.cpp):
    an expert routed twice for one token (top-k never does; the grouped kernel writes a row once an expert)."""
    if k < 2 or ids.size == 0:
        return
    rows = np.sort(ids.reshape(-1, k), axis=1)
    same = rows[:, 1:] == rows[:, :-1]
    if same.any():
        token, at = map(int, np.argwhere(same)[0])
        raise InvalidArgumentError(f"expert {int(rows[token, at])} is routed twice for token {token}")


def _view(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over `nbytes` at `ptr` (a slot of the cache), without a copy."""
    if device.type == "cuda":
        class _Iface:
            __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}
        return torch.as_tensor(_Iface(), device=device)
    return torch.from_numpy(np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr)))


def parse_budget_spec(budget) -> tuple[str, float]:
    """("share", fraction) for "25%", else ("bytes", n) (parse_budget); BudgetError otherwise."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        try:
            share = float(budget.strip()[:-1]) / 100
        except ValueError:
            share = float("nan")
        if not 0 < share <= 1:
            raise BudgetError(f"a budget share must be in (0%, 100%], got {budget!r}")
        return "share", share
    return "bytes", parse_budget(budget)


def _budget_bytes(budget, table) -> int:
    """A size, or a share of the experts: "25%" holds a quarter of them (at least one)."""
    kind, value = parse_budget_spec(budget)
    if kind == "bytes":
        return int(value)
    return max(1, round(value * table.num_layers * table.experts_per_layer)) * slot_bytes(table)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


OFFLOAD_CODECS = ("szp", "szpe", "none")  # what the cache lands and the experts read: sz3 has neither


def _check_offload_codec(codec, what: str) -> None:
    """Before anything of the model is touched: an sz3 table would load, free the dense experts, and fail
    at the first forward pass."""
    if codec not in _table.TABLE_CODECS:  # a name no codec has (as codec.compress says it)
        raise UnsupportedDtypeError(f"unknown codec {codec!r}: the offload path serves 'szp', 'szpe' or 'none'")
    if codec not in OFFLOAD_CODECS:
        raise InvalidArgumentError(f"the offload path serves codec 'szp', 'szpe' or 'none' (no kernel reads "
                                   f"{codec}); the {what} is {codec!r}")


def offload(model: nn.Module, table=None, gpu_budget="6GiB", error_bound=0.3, codec: str = "szp",
            cache_policy: str = "activation", prefetch: str | None = "hidden", *, error_mode: str = "meanabs",
            progress: bool = False) -> Offload:
    """Serve a transformers 5 MoE model's experts from moeoffload; returns the handle (stats(), close()).

    table: an ExpertTable of this model, or its directory (built from the model's experts when None, with codec and
    error_bound: a float, {layer: bound}, a policy file, in error_mode units: "meanabs" = x mean|w|).
    codec "none" keeps raw weights through the same cache and transfers (exact logits).
    gpu_budget: device memory for the expert cache ("6GiB"; on the CPU backend, host memory), or a share
    of the experts it holds ("25%").
    cache_policy: "activation", "lru" or "lfu". prefetch: "hidden" (the next layer's router on the
    current hidden state), "activation", "combined" or None.
    """
    owned = isinstance(table, (str, os.PathLike))  # a table directory: loaded here, closed with the Offload
    if owned:
        table = _table.load(table)
    try:
        off = Offload(model, table, gpu_budget, error_bound, codec, cache_policy, prefetch, error_mode=error_mode,
                      progress=progress)
    except BaseException:
        if owned:
            table.close()
        raise
    off._owns_table = owned
    return off


def from_pretrained(checkpoint_dir, table=None, gpu_budget="6GiB", device="cpu", dtype=torch.bfloat16, *,
                    error_bound=0.3, codec: str = "szp", table_dir=None, **offload_kwargs):
    """Load a checkpoint's non-expert weights only and serve its experts from a compressed table:
    the dense experts are never materialised (they stay meta tensors), so a model whose bf16 experts
    exceed host memory runs. Returns (model, Offload).

    table: an ExpertTable (or a table directory) of this checkpoint; when None one is built from the
    checkpoint tensor by tensor (error_bound, codec), streamed to ``table_dir`` when given.
    Checkpoint names are mapped to the model's as transformers maps them (its conversion mapping:
    legacy per-expert keys, renamed blocks)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from safetensors import safe_open

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError(f"device {device!r} is not a torch device ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"from_pretrained runs the model on the CPU or a CUDA device, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CudaError(f"device {device} needs a CUDA GPU and a CUDA build of torch; none is available")
    if table is None:
        _check_offload_codec(codec, "codec")  # before a table is built for nothing
        if table_dir is not None and Path(table_dir).exists() and not Path(table_dir).is_dir():
            raise TableError(f"table_dir {table_dir} is a file, not a directory")
        if table_dir is not None and (Path(table_dir) / _table.MANIFEST_FILE).exists():
            raise TableError(f"table_dir {table_dir} holds a table already: pass table={str(table_dir)!r} to serve it "
                             "(it is checked against this checkpoint), or choose another table_dir")
    elif table_dir is not None:
        raise InvalidArgumentError("table_dir is where a table built from the checkpoint goes: give it or table=, "
                                   "not both")
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise TableError(f"{checkpoint_dir} has no .safetensors files")
    stored = _table.checkpoint_shapes(checkpoint_dir)  # every file's header whole (TableError), before any read
    config = AutoConfig.from_pretrained(checkpoint_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = moe_layers(model)
    expert_keys = {f"{ml.name}.{n}" for ml in layers for n in expert_matrix_names(ml.experts)}
    meta_state = model.state_dict()

    # Every parameter and buffer but the experts' on the device; non-persistent buffers (rotary
    # frequencies) initialised by the model's own rule, then the checkpoint's tensors loaded over them.
    persistent = set(meta_state)
    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, t in own:
            key = f"{mname}.{pname}" if mname else pname
            if key in expert_keys:
                continue
            fresh = torch.empty_like(t, device=device)
            if isinstance(t, nn.Parameter):
                setattr(module, pname, nn.Parameter(fresh, requires_grad=False))
            else:
                module._buffers[pname] = fresh
        if any((f"{mname}.{b}" if mname else b) not in persistent for b, _ in module.named_buffers(recurse=False)):
            model._init_weights(module)

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    loaded = set()
    params = dict(model.named_parameters())  # the device tensors allocated above
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
                    if converter is not None or name in expert_keys or name not in meta_state:
                        continue  # experts come from the table; unknown keys are not the model's
                    target = params[name] if name in params else model.get_buffer(name)
                    if tuple(target.shape) != stored[key]:
                        raise UnsupportedModelError(f"{checkpoint_dir}: {key} is {list(stored[key])} in the checkpoint "
                                                    f"and {list(target.shape)} in the model its config.json describes")
                    target.copy_(st.get_tensor(key))
                    loaded.add(name)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded |= {k for k in meta_state if k.endswith("lm_head.weight")}
    missing = sorted(k for k in meta_state if k not in loaded and k not in expert_keys)
    if missing:
        raise UnsupportedModelError(f"{checkpoint_dir}: the checkpoint lacks {len(missing)} non-expert tensors the model "
                                    f"needs (first: {missing[:3]}); transformers' conversion of this family is not "
                                    "a renaming moeoffload can follow")
    model.eval()
    owned = not isinstance(table, _table.ExpertTable)  # built or loaded here: the Offload closes it
    built = table is None
    if built:
        table = _table.build(checkpoint_dir, error_bound, codec, mode=offload_kwargs.pop("error_mode", "meanabs"),
                             fuse=True, transpose=codec != "none" and layers[0].experts.is_transposed,
                             out=table_dir, progress=offload_kwargs.pop("progress", False))
    elif not isinstance(table, _table.ExpertTable):
        table = _table.load(table)
    try:
        if not built:
            table.check_matches(checkpoint_dir)  # TableMismatchError: built from another model
        off = Offload(model, table, gpu_budget, **offload_kwargs)
    except BaseException:
        if owned:
            table.close()
        raise
    off._owns_table = owned
    return model, off
