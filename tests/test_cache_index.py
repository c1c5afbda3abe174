"""CacheIndex: each policy on crafted traces with known answers, and its guarantees."""

import numpy as np
import pytest

from moeoffload import _native
from moeoffload.errors import BudgetError, CacheFullError, InvalidArgumentError, ShapeError

HIT, IN_FLIGHT, MISS = 0, 1, 2
SLOT = 1024  # 1000-byte experts take 1024-byte slots


def run(cache, ids):
    """Access each id; on a miss insert it and mark it ready. Returns the lookups."""
    out = []
    for i in ids:
        r = cache.access(i)
        if r == MISS:
            cache.insert_demand(i, 1000)
            cache.mark_ready(i)
        out.append(r)
        cache.check_invariants()
    return out


def test_lru_evicts_least_recently_used():
    c = _native.CacheIndex(2 * SLOT, "lru", 1, 4, 1000)
    assert run(c, [0, 1, 0, 2, 1, 0]) == [MISS, MISS, HIT, MISS, MISS, MISS]
    # 2 evicted 1 (0 was used more recently); then 1 evicted 0; then 0 evicted 2.
    assert c.resident() == [0, 1]


def test_lfu_evicts_least_frequently_used():
    c = _native.CacheIndex(2 * SLOT, "lfu", 1, 4, 1000)
    assert run(c, [0, 0, 0, 1, 2, 0]) == [MISS, HIT, HIT, MISS, MISS, HIT]
    assert c.resident() == [0, 2]
    # 3 evicts 2 (one use), not 0 (four uses).
    assert run(c, [3]) == [MISS] and c.resident() == [0, 3]


def test_activation_priority_formula_and_victim():
    L, E = 4, 2
    c = _native.CacheIndex(3 * SLOT, "activation", L, E, 1000)
    act = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]], np.float32)
    c.set_activation(act.ravel())
    c.set_current_layer(1)
    for lid in range(L * E):
        layer, e = divmod(lid, E)
        d = (layer - 1) % L
        assert c.activation_priority(lid) == pytest.approx(act[layer, e] * (1 - d / L))
    # Cache layer0/e0 (d=3: 0.9*0.25=0.225), layer2/e0 (d=1: 0.2*0.75=0.15), layer3/e0 (d=2: 0.6*0.5=0.3).
    run(c, [0, 4, 6])
    run(c, [3])  # layer1/e1: evicts the lowest priority, layer2/e0
    assert c.resident() == [0, 3, 6]


def test_pinned_and_loading_entries_are_never_evicted():
    c = _native.CacheIndex(2 * SLOT, "lru", 1, 4, 1000)
    c.access(0)
    c.insert_demand(0, 1000)  # loading
    c.access(1)
    c.insert_demand(1, 1000)
    c.mark_ready(1)
    c.pin(1)
    c.access(2)
    with pytest.raises(CacheFullError):
        c.insert_demand(2, 1000)
    assert c.resident() == [0, 1]
    c.unpin(1)
    _, evicted = c.insert_demand(2, 1000)
    assert evicted == [1]  # 0 is still loading
    c.check_invariants()
    with pytest.raises(InvalidArgumentError):
        c.unpin(2)


def test_prefetch_never_displaces_more_valuable_entries():
    L, E = 2, 2
    c = _native.CacheIndex(SLOT, "lru", L, E, 1000)
    c.set_activation(np.array([0.9, 0.1, 0.5, 0.5], np.float32))
    c.set_current_layer(0)
    run(c, [0])  # priority 0.9
    assert c.insert_prefetch(2, 1000, 0.2) is None  # would evict a 0.9 entry
    assert c.resident() == [0]
    c.set_activation(np.array([0.1, 0.1, 0.5, 0.5], np.float32))
    off, evicted = c.insert_prefetch(2, 1000, 0.2)
    assert evicted == [0] and c.loading(2)
    assert c.access(2) == IN_FLIGHT
    st = c.stats()
    assert st["prefetches"] == 1 and st["prefetch_hits"] == 1 and st["inflight_hits"] == 1


def test_budget_errors_and_bad_arguments():
    with pytest.raises(BudgetError, match="cannot hold the largest expert"):
        _native.CacheIndex(1000, "lru", 2, 2, 1001)
    with pytest.raises(InvalidArgumentError, match="unknown cache policy"):
        _native.CacheIndex(4096, "fifo", 2, 2, 100)
    c = _native.CacheIndex(4096, "lru", 2, 2, 100)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        c.access(4)
    with pytest.raises(InvalidArgumentError):
        c.set_current_layer(2)
    with pytest.raises(ShapeError):
        c.set_activation(np.ones(3, np.float32))
    bad = np.full(2 * 2, 0.5, np.float32)
    bad[1] = np.nan
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        c.set_activation(bad)
    with pytest.raises(BudgetError):
        c.insert_demand(0, 5000)


def test_budget_holds_on_every_step_of_a_random_workload():
    rng = np.random.default_rng(7)
    L, E = 6, 8
    sizes = rng.integers(300, 3000, L * E)
    for policy in ("lru", "lfu", "activation"):
        c = _native.CacheIndex(12_000, policy, L, E, int(sizes.max()))
        loading = []
        for step in range(3000):
            c.set_current_layer(step % L)
            if policy == "activation" and step % 50 == 0:
                c.set_activation(rng.random(L * E).astype(np.float32))
            i = int(rng.integers(L * E))
            if c.access(i) == MISS:
                try:
                    c.insert_demand(i, int(sizes[i]))
                    loading.append(i)
                except CacheFullError:
                    pass
            elif rng.random() < 0.3:
                j = int(rng.integers(L * E))
                if j not in c and c.insert_prefetch(j, int(sizes[j]), float(rng.random())) is not None:
                    loading.append(j)
            if loading and rng.random() < 0.7:
                c.mark_ready(loading.pop(0))
            assert c.used_bytes <= c.budget
            c.check_invariants()


class _ReferenceIndex:
    """The eviction rules of CacheIndex written plainly (equal-size slots): the victim is the evictable
    (ready, unpinned) entry of the smallest key, ties to the smaller id; a prefetch displaces only
    entries of lower activation priority."""

    def __init__(self, slots, policy, L, E):
        self.slots, self.policy, self.L, self.E = slots, policy, L, E
        self.entries, self.clock, self.layer = {}, 0, 0
        self.act = np.full(L * E, 1.0 / E, np.float32)

    def priority(self, i):
        d = (i // self.E - self.layer) % self.L
        return float(self.act[i]) * (1.0 - d / self.L)

    def key(self, i):
        e = self.entries[i]
        return {"lru": (e["last"], 0), "lfu": (e["uses"], e["last"]),
                "activation": (self.priority(i), e["last"])}[self.policy]

    def victims(self, below=None):
        ok = [i for i, e in self.entries.items() if not e["pins"] and not e["loading"]
              and (below is None or self.priority(i) < below)]
        return sorted(ok, key=lambda i: (self.key(i), i))

    def access(self, i):
        self.layer = i // self.E
        e = self.entries.get(i)
        if e is None:
            return MISS
        self.clock += 1
        e["last"], e["uses"] = self.clock, e["uses"] + 1
        return IN_FLIGHT if e["loading"] else HIT

    def place(self, i, prefetched):
        self.clock += 1
        self.entries[i] = {"last": self.clock, "uses": 0 if prefetched else 1, "pins": 0, "loading": True}

    def insert_demand(self, i):
        evicted = []
        while len(self.entries) >= self.slots:
            v = self.victims()
            if not v:
                raise CacheFullError("full")
            evicted.append(v[0])
            del self.entries[v[0]]
        self.place(i, False)
        return evicted

    def insert_prefetch(self, i, p):
        if i in self.entries:
            return None
        evicted = []
        if len(self.entries) >= self.slots:
            v = self.victims(below=p)
            if not v:
                return None
            evicted.append(v[0])
            del self.entries[v[0]]
        self.place(i, True)
        return evicted


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation"])
def test_victims_match_the_plain_rules_on_a_random_workload(policy):
    """The smallest entry CacheIndex keeps per layer between changes picks what a full scan would, on
    a random mix of accesses, demand and prefetch inserts, pins, landings, layer changes and priority
    changes (of every layer, or of one)."""
    rng = np.random.default_rng({"lru": 1, "lfu": 2, "activation": 3}[policy])
    L, E, slots = 4, 24, 20
    c = _native.CacheIndex(slots * SLOT, policy, L, E, 1000)
    ref = _ReferenceIndex(slots, policy, L, E)
    pinned = []
    for step in range(4000):
        op = rng.random()
        if op < 0.05:
            a = rng.random(L * E).astype(np.float32)
            a[rng.random(L * E) < 0.3] = 0.25  # equal priorities: the last use decides
            if rng.random() < 0.5:  # one layer's row only: the others keep their order
                row = int(rng.integers(L))
                a = np.concatenate([ref.act[: row * E], a[row * E:(row + 1) * E], ref.act[(row + 1) * E:]])
            c.set_activation(a)
            ref.act = a
        elif op < 0.08:
            layer = int(rng.integers(L))
            c.set_current_layer(layer)
            ref.layer = layer
        elif op < 0.55:
            i = int(rng.integers(L * E))
            r = c.access(i)
            assert r == ref.access(i)
            if r == MISS:
                try:
                    want = ref.insert_demand(i)
                except CacheFullError:
                    with pytest.raises(CacheFullError):
                        c.insert_demand(i, 1000)
                    continue
                assert c.insert_demand(i, 1000)[1] == want
            if rng.random() < 0.3:
                c.pin(i)
                ref.entries[i]["pins"] += 1
                pinned.append(i)
        elif op < 0.8:
            i, p = int(rng.integers(L * E)), float(rng.random())
            got, want = c.insert_prefetch(i, 1000, p), ref.insert_prefetch(i, p)
            assert (got is None) == (want is None) and (got is None or got[1] == want)
        elif op < 0.92:
            loading = [i for i, e in ref.entries.items() if e["loading"]]
            if loading:
                i = loading[int(rng.integers(len(loading)))]
                c.mark_ready(i)
                ref.entries[i]["loading"] = False
        elif pinned:
            i = pinned.pop(int(rng.integers(len(pinned))))
            c.unpin(i)
            ref.entries[i]["pins"] -= 1
        assert c.resident() == sorted(ref.entries)
    c.check_invariants()


def test_prefetch_of_a_large_expert_evicts_the_lowest_priorities_or_changes_nothing():
    """Experts of different sizes: a prefetch that needs several victims takes the entries of lowest
    activation priority below its own, across layers, and one that cannot make room changes nothing
    (residents, bytes, stats)."""
    rng = np.random.default_rng(5)
    L, E = 6, 10
    for trial in range(200):
        sizes = rng.integers(200, 2000, L * E)
        c = _native.CacheIndex(8_000, "activation", L, E, int(sizes.max()))
        act = rng.random(L * E).astype(np.float32)
        c.set_activation(act)
        c.set_current_layer(int(rng.integers(L)))
        for i in rng.permutation(L * E):
            if c.used_bytes + SLOT * (int(sizes[i]) // SLOT + 2) > c.budget:
                continue
            c.insert_demand(int(i), int(sizes[i]))
            if rng.random() < 0.8:
                c.mark_ready(int(i))
            if rng.random() < 0.1:
                c.pin(int(i))
        absent = [i for i in range(L * E) if i not in c]
        new, p = int(rng.choice(absent)), float(rng.random())
        before = (c.resident(), c.used_bytes, c.stats())
        evictable = sorted((c.activation_priority(i), i) for i in c.resident()
                           if c.ready(i) and c.pins(i) == 0 and c.activation_priority(i) < p)
        got = c.insert_prefetch(new, int(sizes[new]), p)
        if got is None:
            assert (c.resident(), c.used_bytes, c.stats()) == before
        else:
            evicted = got[1]
            assert evicted == [i for _, i in evictable[: len(evicted)]]  # lowest priorities first
            assert new in c and not set(evicted) & set(c.resident())
        c.check_invariants()
