"""DeviceCache on the cpu backend: fetch on miss, hits, prefetch, budget, concurrency."""

import threading
import time

import numpy as np
import pytest

from moeoffload import _native
from moeoffload.errors import BudgetError, CacheFullError, ClosedError

L, E = 4, 6


@pytest.fixture
def store():
    rng = np.random.default_rng(3)
    pool = _native.PinnedPool("cpu")
    s = _native.ExpertStore(pool, L, E)
    payloads = {}
    for i in range(L * E):
        payloads[i] = rng.integers(0, 256, int(rng.integers(2000, 6000)), dtype=np.uint8)
        s.add_copy(i, payloads[i])
    yield s, payloads
    s.close()
    pool.close()


def test_miss_then_hit_and_bytes_equal(store):
    s, payloads = store
    eng = _native.TransferEngine("cpu", 2)
    cache = _native.DeviceCache(20_000, "lru", s, eng)
    slot = cache.acquire(5)
    assert slot.lookup == "miss" and slot.bytes == payloads[5].size
    slot.wait()
    np.testing.assert_array_equal(cache.read(slot), payloads[5])
    cache.release(5)
    again = cache.acquire(5)
    assert again.lookup == "hit" and again.data_ptr == slot.data_ptr
    cache.release(5)
    assert cache.prefetch(7, 1.0) and 7 in cache
    cache.synchronize()
    assert cache.ready(7)
    st = cache.stats()
    assert st["misses"] == 1 and st["hits"] == 1 and st["prefetches"] == 1
    cache.close()
    with pytest.raises(ClosedError):
        cache.acquire(1)
    eng.close()


def test_budget_below_largest_expert_is_an_error(store):
    s, payloads = store
    eng = _native.TransferEngine("cpu", 2)
    with pytest.raises(BudgetError, match="largest expert"):
        _native.DeviceCache(max(p.size for p in payloads.values()) - 1, "lru", s, eng)
    eng.close()


def test_a_full_cache_refuses_at_once_with_timeout_zero_and_counts_nothing(store):
    s, payloads = store
    eng = _native.TransferEngine("cpu", 2)
    cache = _native.DeviceCache(6144, "lru", s, eng)  # room for one expert
    cache.acquire(0).wait()
    before = cache.stats()
    start = time.monotonic()
    with pytest.raises(CacheFullError):
        cache.acquire(1, timeout=0.0)  # the only slot is pinned by this thread
    assert time.monotonic() - start < 1.0
    after = cache.stats()
    assert (after["accesses"], after["misses"], after["bytes_loaded"]) == (
        before["accesses"], before["misses"], before["bytes_loaded"])  # a failed acquire is not an access
    assert 1 not in cache
    cache.release(0)
    cache.acquire(1).wait()  # room now
    cache.release(1)
    cache.close()
    eng.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation"])
def test_concurrent_fetch_evict_lookup(store, policy):
    """Several threads acquire, read, release and prefetch; no slot is lost or doubled."""
    s, payloads = store
    eng = _native.TransferEngine("cpu", 2)
    cache = _native.DeviceCache(30_000, policy, s, eng)  # about 7 of 24 experts
    errors = []
    stop_at = time.monotonic() + 3.0

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            n = 0
            while time.monotonic() < stop_at and n < 400:
                i = int(rng.integers(L * E))
                slot = cache.acquire(i)
                slot.wait(timeout=5)
                data = cache.read(slot)
                if not np.array_equal(data, payloads[i]):
                    errors.append(f"expert {i}: slot bytes differ from the store")
                cache.release(i)
                if rng.random() < 0.3:
                    cache.prefetch(int(rng.integers(L * E)), float(rng.random()))
                if rng.random() < 0.2:
                    cache.set_current_layer(int(rng.integers(L)))
                cache.check_invariants()
                n += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    assert errors == []
    cache.synchronize()
    cache.check_invariants()
    assert cache.used_bytes <= cache.budget
    resident = cache.resident()
    assert len(resident) == len(set(resident))
    cache.close()
    eng.close()
