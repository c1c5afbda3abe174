import numpy as np
import pytest

from moeoffload import table
from moeoffload.cache import ExpertCache, parse_budget, slot_bytes
from moeoffload.errors import BudgetError
from moeoffload.prefetch import PrefetchConfig
from conftest import E, mixtral_state_dict


def test_parse_budget():
    assert parse_budget("6GiB") == 6 * 2**30
    assert parse_budget("512 MiB") == 512 * 2**20
    assert parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget(4096) == 4096 and parse_budget("4096") == 4096
    for bad in ("6 parsecs", "", "-1GiB", 0, True, float("nan")):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_expert_cache_serves_a_forward_pass(tmp_path):
    sd = mixtral_state_dict()
    table.build(sd, policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    t = table.load(tmp_path / "t")
    size = int(t.expert_bytes().max())
    with pytest.raises(BudgetError):
        ExpertCache(t, size - 1)
    rng = np.random.default_rng(0)
    with ExpertCache(t, f"{6 * size}B") as cache:
        for _ in range(3):
            cache.begin_sequence()
            for token in range(8):
                for layer in range(t.num_layers):
                    experts = rng.choice(t.experts_per_layer, 2, replace=False)
                    cache.record(layer, experts)
                    for e in experts:
                        slot = cache.acquire(layer, int(e))
                        slot.wait()
                        np.testing.assert_array_equal(cache.cache.read(slot), t.payload(layer, int(e)))
                        cache.release(layer, int(e))
                    cache.cache.check_invariants()
            cache.end_sequence()
        st = cache.stats()
        assert st["accesses"] == 3 * 8 * t.num_layers * 2 and st["used_bytes"] <= st["budget"]
        assert len(cache.history) == 3
    t.close()


def test_prefetch_source_is_honoured(tmp_path):
    from moeoffload.errors import InvalidArgumentError

    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False)
    size = slot_bytes(t)
    hidden = np.zeros(E, np.float32)
    hidden[[1, 3]] = [0.7, 0.3]
    with ExpertCache(t, 6 * size, prefetch=PrefetchConfig(source="hidden", depth=1, per_layer=2)) as cache:
        cache.begin_sequence()
        with pytest.raises(InvalidArgumentError, match="hidden"):
            cache.record(0, [0, 2])  # "hidden" without the hidden-state prediction
        started = cache.record(0, [0, 2], hidden_next=hidden)
        assert sorted(started) == [1 * E + 1, 1 * E + 3]  # layer 1's experts the hidden state points at
    with ExpertCache(t, 6 * size, prefetch=PrefetchConfig(source="activation", depth=1, per_layer=2)) as cache:
        cache.begin_sequence()
        started = cache.record(0, [0, 2], hidden_next=hidden)  # no history: layer 1 uniform, ties by index
        assert sorted(started) == [1 * E + 0, 1 * E + 1]  # the activation prediction, not the hidden state
