"""ExpertCache: the object an MoE forward pass calls.

    cache = ExpertCache(table, budget="6GiB", policy="activation")
    cache.begin_sequence()
    for layer ...:
        experts = router top-k of this layer
        cache.record(layer, experts)              # trace it, predict, prefetch ahead
        for e in experts:
            slot = cache.acquire(layer, e)        # compressed bytes, on the device
            slot.wait()                           # or order the compute stream after slot.transfer
            ... fused decode + GEMM on slot.data_ptr ...
            cache.release(layer, e)
    cache.end_sequence()                          # the sequence's matrix joins the history

It ties together a loaded ExpertTable (pinned payloads), a TransferEngine, a
DeviceCache and the per-layer decision step (prefetch.decision_step): one
native call per layer records, predicts, plans and starts the prefetches.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

from . import _native
from . import ops as _ops  # noqa: F401 - registers torch.ops.moeoffload.*, which take this cache's handle
from .errors import BudgetError, ClosedError, InvalidArgumentError, TableError
from .prefetch import PrefetchConfig, decision_step
from .table import FUSED_CODECS, PAYLOAD_FILE

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "pb": 10**15, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


MAX_BUDGET = 2**50  # 1 PiB: beyond any device; a larger budget is a mistake (and would not fit the native size type)


def parse_budget(budget) -> int:
    """Bytes from a number or a string such as "6GiB", "512 MiB", "1.5GB" (1 byte to MAX_BUDGET, 1 PiB)."""
    def shown(x) -> str:  # a short repr: a 5000-digit int has none (ValueError), a long string is cut
        try:
            s = repr(x)
        except ValueError:
            return f"an integer of {x.bit_length()} bits"
        return s if len(s) <= 60 else s[:45] + "..." + s[-10:]

    if isinstance(budget, (bool, np.bool_)):
        raise BudgetError(f"not a budget: {shown(budget)}")
    if isinstance(budget, numbers.Integral):
        value = int(budget)  # exact, however large
    elif isinstance(budget, numbers.Real):
        try:
            value = float(budget)
        except OverflowError:  # a Fraction or similar beyond float64
            value = math.inf
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(budget))
        if not m or m[2].lower() not in _UNITS:
            raise BudgetError(f"cannot read the budget {shown(budget)}: use bytes or a size like '6GiB' or '512MB'")
        value = float(m[1]) * _UNITS[m[2].lower()]  # "1e400" is inf here, never an exception
    if isinstance(value, float) and not math.isfinite(value):
        raise BudgetError(f"the budget must be a finite size, got {shown(budget)}")
    if value < 1:
        raise BudgetError(f"the budget must be at least one byte, got {shown(budget)}")
    if value > MAX_BUDGET:
        raise BudgetError(f"the budget {shown(budget)} is more than {MAX_BUDGET} bytes (1 PiB), the most moeoffload "
                          "accepts; give the device memory to use, such as '6GiB'")
    return int(value)


SLOT_ALIGN = 256  # the device cache's arena rounds every slot up to this (cpp/include/moeoffload/arena.h)


def slot_bytes(table) -> int:
    """The cache slot the table's largest expert takes: budgets of n slots hold at least n experts."""
    return -(-int(table.resident_bytes().max()) // SLOT_ALIGN) * SLOT_ALIGN


class ExpertCache:
    """The Python face of the native Runtime: it owns the pinned store of the table's experts (its
    own mapping or copy, so closing the table never pulls bytes from under a copy), the transfer
    engine, the device cache and the predictor, and closes them in order. ``handle`` addresses
    its experts in the ops (``torch.ops.moeoffload.*``, matrix indices in ``table.matrix_names``
    order) while they are acquired."""

    def __init__(self, table, budget, policy: str = "activation", prefetch: PrefetchConfig | None = PrefetchConfig(),
                 num_streams: int = 2, history=None, backend: str | None = None):
        self.table = table
        L, E = table.num_layers, table.experts_per_layer
        if table.closed:
            raise ClosedError("the table is closed: make the cache before closing it")
        if backend is not None and backend not in ("auto", "cpu", "cuda"):
            raise InvalidArgumentError(f"backend must be 'auto', 'cpu', 'cuda' or None, got {backend!r}")
        if isinstance(num_streams, bool) or not isinstance(num_streams, numbers.Integral) or \
                not 0 < num_streams < 2**31:
            raise InvalidArgumentError(f"num_streams must be a positive integer, got {num_streams!r}")
        self.decisions = decision_step(L, E, prefetch, policy, history)  # checks the config before anything opens
        self.runtime = _native.Runtime(backend or "auto", L, E, num_streams)
        try:
            self._fill_store(table)
            self._host_pinned = self.runtime.store.pinned  # fixed once filled; readable after close
            # a budget past every expert's slot buys nothing: it is not reserved (6 GiB for a 4 MiB table was)
            size = min(parse_budget(budget), L * E * slot_bytes(table))
            try:
                self.runtime.start(size, policy)
            except MemoryError:
                raise BudgetError(f"the device cache's {size} bytes (budget {budget!r}) could not be allocated: "
                                  "give a smaller budget") from None
        except BaseException:
            self.runtime.close()
            raise
        self.policy = policy
        self.cache = self.runtime.cache
        self.engine = self.runtime.engine

    def _fill_store(self, table) -> None:
        store = self.runtime.store
        codes = {"float32": 1, "bfloat16": 2, "float16": 3}
        mapped = table.mode == "map"
        if mapped:  # the payloads stay in the file: map it (pinned in place), parsed once below
            store.map_file(str(table.path / PAYLOAD_FILE), table.file_identity)  # the file the table read
        for x in table.manifest["experts"]:
            eid = table.expert_id(x["layer"], x["expert"])
            if mapped:
                begin, _ = table.spans[x["tensor"]]
                store.add_mapped(eid, begin, x["bytes"])
            else:
                store.add_copy(eid, np.ascontiguousarray(table.payload(x["layer"], x["expert"])))
            if table.manifest["codec"] in FUSED_CODECS:  # szpe lands in the slot as szp (transcoded)
                store.set_matrices(eid, [(m["offset"], m["bytes"], codes[m["dtype"]], list(m["shape"]))
                                         for m in x["matrices"]], table.manifest["codec"])
                if store.resident_bytes(eid) != x.get("resident_bytes", x["bytes"]):
                    raise TableError(f"layer {x['layer']} expert {x['expert']}: the manifest says its slot takes "
                                     f"{x.get('resident_bytes', x['bytes'])} bytes, its buffers need "
                                     f"{store.resident_bytes(eid)}; the manifest does not describe this table "
                                     "file: rebuild the table")

    @property
    def handle(self) -> int:
        """The integer the ops take to reach this runtime's (acquired) experts."""
        return self.runtime.handle

    def expert_id(self, layer: int, expert: int) -> int:
        """The flat id of (layer, expert), range-checked (negative too)."""
        return self.table.expert_id(layer, expert)

    @property
    def history(self):
        """The ActivationHistory the predictions match against; each ended sequence joins it."""
        return self.decisions.history

    def begin_sequence(self) -> None:
        self.decisions.begin_sequence()

    def end_sequence(self) -> bool:
        return self.decisions.end_sequence()

    def record(self, layer: int, experts, hidden_next=None) -> list[int]:
        """The router chose `experts` at `layer`: one native decision step (record, predict, plan from
        the source ``prefetch.source`` names, prefetch; prefetch.decision_step). ``hidden_next``: the
        next layer's router probabilities [E] on the current hidden state, needed by "hidden" and
        "combined". Call it after acquiring the layer's experts, so a prefetch cannot evict them.
        Returns the expert ids whose fetch started."""
        ids = np.asarray(experts).reshape(-1)
        self._layer_ids(layer, ids.tolist())
        hidden = None if hidden_next is None else np.ascontiguousarray(hidden_next, dtype=np.float32).reshape(-1)
        return self.cache.decide(self.decisions, layer, ids.astype(np.uint32), hidden)

    def acquire(self, layer: int, expert: int, timeout: float = 10.0):
        """The expert's slot, pinned (fetched on a miss). When every slot is pinned or loading it waits
        up to `timeout` seconds for room, then raises CacheFullError (0: at once). When the fetch fails,
        the slot's wait() raises its error, and so does the slot of every acquire of the expert until each
        holder has released it; the next acquire then fetches it again."""
        return self.cache.acquire(self.expert_id(layer, expert), _seconds(timeout))

    def release(self, layer: int, expert: int, stream=None) -> None:
        """Unpins the expert. On cuda, `stream` (a torch.cuda.Stream, or its cudaStream_t as an int such
        as ``torch.cuda.current_stream().cuda_stream``; 0 is the default stream) names where kernels
        reading the slot may still be queued: a later fetch into its bytes waits for them on the device
        (no host wait). Without it the caller must know those kernels are done."""
        self.cache.release(self.expert_id(layer, expert), _stream_handle(stream))

    def _layer_ids(self, layer: int, experts) -> list[int]:
        """The flat ids of a layer's experts, range-checked: a decode step's handful, three times a layer, so
        the checks are one pass keeping the integers (not bools) and a min and a max (a third of the time
        of a check of each value)."""
        E = self.table.experts_per_layer
        base = layer * E if type(layer) is int and 0 <= layer < self.table.num_layers else self.expert_id(layer, 0)
        ints = [e for e in experts if type(e) is int or isinstance(e, np.integer)]
        if len(ints) != len(experts) or (ints and not (0 <= min(ints) and max(ints) < E)):
            bad = next(e for e in experts if isinstance(e, bool) or not isinstance(e, (int, np.integer))
                       or not 0 <= e < E)
            raise InvalidArgumentError(f"expert {bad!r} is out of range: the table has {E} experts per layer "
                                       "(integers 0..E-1)")
        return [base + int(e) for e in ints]

    def acquire_ahead(self, layer: int, experts, holding_pins: bool = False, timeout: float = 10.0) -> list:
        """A layer's experts in one native call: pins them in order while the budget has room and returns the
        slots of those pinned (a prefix). Only the first may wait (up to `timeout` s), and only when the caller
        holds no pins; CacheFullError when not even the first fits."""
        return self.cache.acquire_ahead(self._layer_ids(layer, experts), holding_pins, _seconds(timeout))

    def release_all(self, layer: int, experts, stream=None) -> None:
        """release() of each, in one native call; all or nothing."""
        self.cache.release_all(self._layer_ids(layer, experts), _stream_handle(stream))

    def stats(self) -> dict:
        """The native cache's counters, its bytes used and budget, and host_pinned: False when the mapped
        table file could not be pinned (copies then go from pageable memory)."""
        return {**self.cache.stats(), "used_bytes": self.cache.used_bytes, "budget": self.cache.budget,
                "host_pinned": self._host_pinned}

    @property
    def closed(self) -> bool:
        return self.runtime.closed

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _seconds(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 <= timeout < math.inf:
        raise InvalidArgumentError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    return timeout


def _stream_handle(stream) -> int | None:
    """None, or the cudaStream_t of a torch.cuda.Stream or of an int."""
    if stream is None or (type(stream) is int and stream >= 0):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if type(handle) is int:
        return handle
    raise InvalidArgumentError(f"stream must be a torch.cuda.Stream or its cuda_stream (an int >= 0), got {stream!r}")
