"""The runtime owner (cpp/runtime/runtime.cpp through ExpertCache): every close order with work in
flight, interpreter exit with copies in flight, fork, id ranges, failed copies, and the ops reaching
acquired experts through the runtime's integer handle."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import E, H, I, L, mixtral_state_dict

from moeoffload import ClosedError, codec, ops, table
from moeoffload.cache import ExpertCache, slot_bytes
from moeoffload.errors import InvalidArgumentError


@pytest.fixture
def saved(tmp_path):
    sd = mixtral_state_dict()
    table.build(sd, policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    return tmp_path / "t", sd


def _budget(t, n):
    return n * slot_bytes(t)


def _prefetch_everything(cache, t):
    cache.begin_sequence()
    for layer in range(t.num_layers):
        cache.record(layer, [0, 1])


def test_table_closed_while_the_cache_copies(saved):
    # Once a segmentation fault: the store unmapped the file under the copy workers.
    path, _ = saved
    t = table.load(path)
    cache = ExpertCache(t, _budget(t, 8), num_streams=1)
    _prefetch_everything(cache, t)
    t.close()
    slot = cache.acquire(1, 2)
    slot.wait()
    assert cache.cache.read(slot).size == slot.bytes
    cache.release(1, 2)
    cache.close()


@pytest.mark.parametrize("order", ["cache-table", "table-cache", "cache-twice"])
def test_every_close_order(saved, order):
    path, _ = saved
    t = table.load(path)
    cache = ExpertCache(t, _budget(t, 6))
    _prefetch_everything(cache, t)
    slot = cache.acquire(0, 3)
    handle = cache.handle
    closers = {"cache-table": (cache.close, t.close), "table-cache": (t.close, cache.close),
               "cache-twice": (cache.close, cache.close, t.close)}[order]
    for c in closers:
        c()
    assert cache.closed
    with pytest.raises(ClosedError):
        cache.acquire(0, 1)
    with pytest.raises(ClosedError):
        cache.cache.read(slot)  # a slot read after its cache closed: ClosedError, not a crash
    with pytest.raises(ClosedError):
        torch.ops.moeoffload.szp_linear(torch.randn(1, H), handle, 3, 0)  # an op on a closed runtime


def test_slot_and_payload_outlive_their_owner(saved):
    path, _ = saved
    t = table.load(path)
    view = t.payload(0, 0)
    expected = view.copy()
    cache = ExpertCache(t, _budget(t, 4))
    slot = cache.acquire(0, 0)
    t.close()
    cache.close()
    np.testing.assert_array_equal(view, expected)  # the payload is the caller's own copy
    slot.wait()  # the transfer object keeps itself alive; nothing to read any more
    assert slot.bytes == expected.size


def test_interpreter_exit_with_copies_in_flight(saved):
    path, _ = saved
    code = f"""
import moeoffload
from moeoffload import table
from moeoffload.cache import ExpertCache
t = table.load({str(path)!r})
c = ExpertCache(t, 10**7, num_streams=2)
c.begin_sequence()
for layer in range(t.num_layers):
    c.record(layer, [0, 1, 2])
c2 = ExpertCache(t, 10**7)
c2.acquire(0, 0)
t.close()
"""  # no close(): exit with prefetches queued and a slot pinned
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_gets_a_named_error_at_once(saved):
    path, _ = saved
    code = f"""
import os, sys
from moeoffload import table
from moeoffload.cache import ExpertCache
from moeoffload.errors import ForkedError
t = table.load({str(path)!r})
c = ExpertCache(t, 10**7)
slot = c.acquire(0, 0); slot.wait(); c.release(0, 0)
pid = os.fork()
if pid == 0:
    try:
        c.acquire(1, 1).wait(timeout=5)
        os._exit(3)
    except ForkedError:
        pass
    # and a new runtime works in the child
    c2 = ExpertCache(table.load({str(path)!r}), 10**7, backend="cpu")  # CUDA does not survive fork() either
    s = c2.acquire(1, 1); s.wait(timeout=5); c2.release(1, 1); c2.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)


def test_ids_are_range_checked(saved):
    path, _ = saved
    t = table.load(path)
    with ExpertCache(t, _budget(t, 4)) as cache:
        for layer, expert in ((0, E), (L, 0), (-1, 0), (0, -1), (0, 1.5), (True, 0)):
            with pytest.raises(InvalidArgumentError):
                cache.acquire(layer, expert)
            with pytest.raises(InvalidArgumentError):
                cache.release(layer, expert)
        with pytest.raises(InvalidArgumentError):
            cache.record(0, [-1])
        with pytest.raises(InvalidArgumentError):
            cache.record(0, [E])
        with pytest.raises(InvalidArgumentError):
            cache.record(0, [1.5])  # not an expert id (once silently truncated to 1)
        with pytest.raises(InvalidArgumentError):
            cache.record(L, [0])
        assert cache.cache.resident() == []
        cache.record(0, np.array([0, 1, 1, 3], dtype=np.int64))  # a whole prefill's choices at once


def test_a_copy_that_cannot_start_rolls_back(saved):
    path, _ = saved
    t = table.load(path)
    cache = ExpertCache(t, _budget(t, 4))
    cache.engine.close()  # the engine dies under the cache
    with pytest.raises(ClosedError):
        cache.acquire(0, 0)
    assert cache.cache.resident() == [] and cache.cache.used_bytes == 0  # no zero-filled slot, no budget eaten
    cache.close()


def test_manifest_shape_against_buffer_is_checked(saved):
    import json

    path, _ = saved
    m = json.loads((path / "manifest.json").read_text())
    m["experts"][2]["matrices"][0]["shape"] = m["experts"][2]["matrices"][0]["shape"][::-1]
    (path / "manifest.json").write_text(json.dumps(m))
    t = table.load(path)
    from moeoffload.errors import TableError

    with pytest.raises(TableError, match="expert 2 matrix 0"):
        ExpertCache(t, _budget(t, 4))


def test_mapped_file_changed_on_disk_is_detected(saved):
    from moeoffload.errors import TableChangedError

    path, _ = saved
    t = table.load(path)
    cache = ExpertCache(t, _budget(t, 4))
    f = path / "experts.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)  # once a SIGBUS at the next fetch
    with pytest.raises(TableChangedError):
        cache.acquire(2, 3)
    cache.close()


def test_copy_mode_cache_survives_any_change_to_the_file(saved):
    path, _ = saved
    t = table.load(path, mode="copy")
    expected = t.payload(2, 3).copy()
    cache = ExpertCache(t, _budget(t, 4))
    t.close()
    f = path / "experts.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(0)
    slot = cache.acquire(2, 3)
    slot.wait(timeout=10)
    np.testing.assert_array_equal(cache.cache.read(slot), expected)
    cache.release(2, 3)
    cache.close()


# ---- ops through the runtime's handle ------------------------------------------------------------


def test_ops_read_acquired_experts_through_the_handle(saved):
    path, sd = saved
    t = table.load(path)
    names = t.matrix_names  # w1 (gate) [I, H], w2 (down) [H, I], w3 (up) [I, H]
    with ExpertCache(t, _budget(t, 3)) as cache:  # "auto": the cuda backend where a GPU is
        dev = torch.device(cache.engine.backend)  # where the slots are, and the ops' inputs must be
        x = torch.randn(5, H).to(torch.bfloat16)
        slot = cache.acquire(1, 2)
        eid = cache.expert_id(1, 2)
        w1 = names.index("w1")
        y = torch.ops.moeoffload.szp_linear(x.to(dev), cache.handle, eid, w1).cpu()
        ref = ops.szp_linear(x, t.compressed(1, 2, "w1"))
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(torch.ops.moeoffload.szp_decode(cache.handle, eid, w1, dev).cpu(),
                                   t.decompress(1, 2, "w1"))
        cache.release(1, 2)
        with pytest.raises(InvalidArgumentError, match="not acquired"):
            torch.ops.moeoffload.szp_linear(x.to(dev), cache.handle, eid, w1)  # released
        with pytest.raises(InvalidArgumentError):
            torch.ops.moeoffload.szp_linear(x.to(dev), cache.handle, 10**6, 0)  # unknown expert
        assert slot.bytes > 0
        handle = cache.handle
    with pytest.raises(ClosedError):
        torch.ops.moeoffload.szp_linear(x.to(dev), handle, eid, w1)  # a closed runtime


def test_compressed_tensor_outside_a_runtime_needs_no_table():
    w = torch.randn(I, H) * 0.02
    ct = codec.compress(w, 1e-4)
    x = torch.randn(3, H)
    torch.testing.assert_close(ops.szp_linear(x, ct), x @ ct.decompress().T, rtol=1e-4, atol=1e-5)
