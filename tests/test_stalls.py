"""Slots made ready for compute and the stall counted (integrations/stalls.py): a host wait on the cpu,
the compute stream ordered after the copies on cuda with the stall counted once they land."""

import time

import pytest
import torch

import moeoffload
from moeoffload.cache import slot_bytes
from conftest import mixtral_model
from moeoffload.integrations.stalls import Stalls


class FakeTransfer:
    def __init__(self, lands_in_s: float):
        self.lands_at = time.monotonic_ns() + int(lands_in_s * 1e9)
        self.ordered_on = []

    def done(self) -> bool:
        return time.monotonic_ns() >= self.lands_at

    @property
    def done_ns(self) -> int:
        return self.lands_at if self.done() else 0

    def wait(self, timeout: float = -1.0) -> None:
        while not self.done():
            time.sleep(0.001)

    def order(self, stream: int) -> None:  # cuda: no host wait
        self.ordered_on.append(stream)


class FakeSlot:
    def __init__(self, lookup: str, transfer=None):
        self.lookup, self.transfer = lookup, transfer


def test_device_ordered_slots_are_not_waited_for_and_their_stall_is_counted_once_they_land():
    stalls = Stalls(device_ordered=True)
    late, later = FakeTransfer(0.05), FakeTransfer(0.10)
    start = time.perf_counter()
    stalls.ready([FakeSlot("hit"), FakeSlot("miss", late), FakeSlot("in_flight", later)], stream=7)
    assert time.perf_counter() - start < 0.04  # the host went on
    assert late.ordered_on == [7] and later.ordered_on == [7]
    # one call's copies overlap: its stall is the last one's, not the sum (0.15 s)
    assert stalls.seconds() == pytest.approx(0.10, abs=0.03)
    assert stalls.seconds() == pytest.approx(0.10, abs=0.03)  # counted once
    stalls.ready([FakeSlot("miss", FakeTransfer(-1.0))], stream=7)  # landed before its compute was queued
    assert stalls.seconds() == pytest.approx(0.10, abs=0.03)


def test_calls_whose_waits_overlap_count_the_time_once():
    # two calls queued a moment apart on copies landing together: 0.1 s of stall, not 0.2
    stalls = Stalls(device_ordered=True)
    a, b = FakeTransfer(0.10), FakeTransfer(0.10)
    stalls.ready([FakeSlot("miss", a)], stream=0)
    stalls.ready([FakeSlot("miss", b)], stream=0)
    assert stalls.seconds() == pytest.approx(0.10, abs=0.03)


def test_host_waited_slots_count_the_wait():
    stalls = Stalls(device_ordered=False)
    t = FakeTransfer(0.05)
    stalls.ready([FakeSlot("miss", t), FakeSlot("hit")], stream=None)
    assert t.done() and t.ordered_on == []
    assert stalls.seconds() == pytest.approx(0.05, abs=0.03)


@pytest.mark.parametrize("codec", ["none", "szp"])
def test_the_device_ordered_path_gives_the_host_waited_paths_logits(codec):
    # The cuda path's code, run on the cpu backend, where Transfer.order waits: the same logits through
    # every path (moe_experts, expert by expert, the eager view of codec "none"), the stall counted.
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    probe = moeoffload.offload(mixtral_model(), codec=codec, gpu_budget=10**8, prefetch=None)
    one = slot_bytes(probe.table)
    probe.close()
    out = {}
    for ordered in (False, True):
        for budget in (one, 10**8):  # expert by expert, and a layer at a time
            model = mixtral_model()
            with moeoffload.offload(model, codec=codec, gpu_budget=budget, prefetch="activation") as off:
                off._stalls.device_ordered = ordered
                with torch.no_grad():
                    out[ordered, budget] = model(ids).logits
                st = off.stats()
            assert st["misses"] > 0 and st["stall_s"] >= 0 and not off._stalls._pending
    for budget in (one, 10**8):
        assert torch.equal(out[True, budget], out[False, budget])
