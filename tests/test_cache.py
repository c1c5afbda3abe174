import numpy as np
import pytest
import torch

from moeoffload import table
from moeoffload.cache import ExpertCache, parse_budget, slot_bytes
from moeoffload.errors import BudgetError, InvalidArgumentError
from moeoffload.prefetch import PrefetchConfig
from conftest import E, mixtral_state_dict


def test_parse_budget():
    assert parse_budget("6GiB") == 6 * 2**30
    assert parse_budget("512 MiB") == 512 * 2**20
    assert parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget(4096) == 4096 and parse_budget("4096") == 4096
    assert parse_budget("1 PiB") == 2**50  # the largest budget, in its own unit
    for bad in ("6 parsecs", "", "-1GiB", 0, True, float("nan"), "1.01 PiB"):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_config_mistakes_are_named(tmp_path):
    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    t = table.load(tmp_path / "t")
    for kw, says in ((dict(prefetch="hidden"), "PrefetchConfig or None"), (dict(backend=""), "backend"),
                     (dict(backend="gpu"), "backend"), (dict(policy=None), "policy"),
                     (dict(num_streams=2.0), "num_streams"), (dict(num_streams=2**40), "num_streams"),
                     (dict(num_streams=True), "num_streams"), (dict(history="junk"), "ActivationHistory"),
                     (dict(history=np.ones((2, 3, E), np.uint32)), "ActivationHistory")):
        with pytest.raises(InvalidArgumentError, match=says):
            ExpertCache(t, "1MiB", **kw)
    for kw in (dict(min_probability=float("nan")), dict(min_probability=2.0), dict(depth=2.5), dict(per_layer=0),
               dict(top_matches=True), dict(source="bogus"), dict(depth=-1)):
        with pytest.raises(InvalidArgumentError):
            PrefetchConfig(**kw)
    with ExpertCache(t, "1MiB") as cache:
        for timeout in ("1", None, True, -1, float("nan"), float("inf")):
            with pytest.raises(InvalidArgumentError, match="timeout"):
                cache.acquire(0, 0, timeout=timeout)
            with pytest.raises(InvalidArgumentError, match="timeout"):
                cache.acquire_ahead(0, [0], timeout=timeout)
        assert cache.stats()["hits"] + cache.stats()["misses"] == 0  # nothing was acquired
    t.close()


def test_a_budget_past_every_expert_reserves_only_their_slots(tmp_path):
    # 6 GiB for a table of a few MiB took 6 GiB (a cudaMalloc of it on a GPU), and 1 TiB a traceback
    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    with table.load(tmp_path / "t") as t:
        every = t.num_layers * t.experts_per_layer * slot_bytes(t)
        for budget in ("1TiB", "6GiB", every):
            with ExpertCache(t, budget) as cache:
                assert cache.stats()["budget"] == every
        with ExpertCache(t, every - 1) as cache:
            assert cache.stats()["budget"] == every - 1


def test_the_ops_are_there_with_the_cache_alone():
    # The README's ExpertCache example calls torch.ops.moeoffload.* having imported only the cache.
    import subprocess
    import sys

    code = ("import torch\nfrom moeoffload.cache import ExpertCache\n"
            "print(all(hasattr(torch.ops.moeoffload, op) for op in ('szp_linear', 'expert_mlp', 'moe_experts')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr


def test_expert_cache_serves_a_forward_pass(tmp_path):
    sd = mixtral_state_dict()
    table.build(sd, policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    t = table.load(tmp_path / "t")
    size = int(t.expert_bytes().max())
    with pytest.raises(BudgetError):
        ExpertCache(t, size - 1)
    rng = np.random.default_rng(0)
    with ExpertCache(t, f"{6 * size}B") as cache:
        # every other release names the stream that may still read the slot: on cuda its bytes keep a fence
        # that the next fetch into them waits for; on cpu (no queued kernels) a stream means nothing
        on_cuda = cache.engine.backend == "cuda"
        stream = torch.cuda.current_stream().cuda_stream if on_cuda else 0x1234
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
                        cache.release(layer, int(e), stream if e % 2 else None)
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
        assert cache.record(1, [0, 2], hidden_next=np.empty(0, np.float32)) == []  # no prediction: nothing planned
    for source in ("combined", "activation"):  # combined without a prediction plans as the activation alone
        with ExpertCache(t, 6 * size, prefetch=PrefetchConfig(source=source, depth=1, per_layer=2)) as cache:
            cache.begin_sequence()
            assert sorted(cache.record(0, [0, 2], hidden_next=np.empty(0, np.float32))) == [1 * E + 0, 1 * E + 1]
    with ExpertCache(t, 6 * size, prefetch=PrefetchConfig(source="activation", depth=1, per_layer=2)) as cache:
        cache.begin_sequence()
        started = cache.record(0, [0, 2], hidden_next=hidden)  # no history: layer 1 uniform, ties by index
        assert sorted(started) == [1 * E + 0, 1 * E + 1]  # the activation prediction, not the hidden state


def test_szpe_experts_cross_as_szpe_and_land_as_their_szp_buffers():
    # Host memory and the bus carry the entropy-coded bytes; the slot holds the szp buffers the kernels
    # read, byte for byte those of the szp table, so every op gives the same result.
    import torch

    from moeoffload import _native, ops

    sd = mixtral_state_dict()
    fixed = table.build(sd, policy=0.3, mode="meanabs", progress=False)
    coded = table.build(sd, policy=0.3, mode="meanabs", codec="szpe", progress=False)
    assert coded.expert_bytes().sum() < fixed.expert_bytes().sum()
    assert (coded.resident_bytes() >= fixed.expert_bytes() - 256 * len(fixed.matrix_names)).all()
    with ExpertCache(coded, 4 * slot_bytes(coded)) as cache:
        copied = 0
        for layer in range(coded.num_layers):
            for e in range(coded.experts_per_layer):
                slot = cache.acquire(layer, e)
                slot.wait()
                copied += int(coded.expert_bytes()[coded.expert_id(layer, e)])
                landed = cache.cache.read(slot)
                assert landed.size == coded.resident_bytes()[coded.expert_id(layer, e)]
                end = 0
                for k, name in enumerate(coded.matrix_names):
                    szp = fixed.compressed(layer, e, name).buffer
                    at = -(-end // _native.RESIDENT_ALIGN) * _native.RESIDENT_ALIGN
                    np.testing.assert_array_equal(landed[at:at + szp.size], szp)
                    end = at + szp.size
                    w = ops._szp_decode_op(cache.handle, coded.expert_id(layer, e), k,
                                           torch.device(cache.engine.backend))  # the slots' device ("auto")
                    assert torch.equal(w.cpu(), fixed.decompress(layer, e, name))
                cache.release(layer, e)
        assert cache.engine.stats()["bytes"] == copied  # the coded bytes crossed, not the szp ones


def _table_with_an_expert_that_does_not_decode():
    """An szpe table whose expert (0, 0) has a stream byte changed and its CRCs forged after: it passes the
    load checks, and its arrival fails."""
    from moeoffload import _native
    from moeoffload.errors import CorruptDataError

    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", codec="szpe", progress=False)
    blob = t.payload(0, 0).copy()
    m = t.matrix_entry(0, 0, t.matrix_names[0])
    buf = blob[m["offset"]:m["offset"] + m["bytes"]]
    info = _native.szpe_inspect(buf)
    pos = buf.size - 4 - info["payload_bytes"] + 20  # a byte of the first stream's words
    for flip in range(1, 256):  # find a change the stream check catches
        trial = buf.copy()
        trial[pos] ^= flip
        trial[-4:] = np.frombuffer(np.uint32(_native.crc32(trial[:-4])).tobytes(), np.uint8)
        try:
            _native.szpe_to_szp(trial, True)
        except CorruptDataError as e:
            if "stream" in str(e):
                break
    blob[m["offset"]:m["offset"] + m["bytes"]] = trial
    t._payloads[t.entry(0, 0)["tensor"]] = blob  # an in-memory table: its bytes as the store will copy them
    t.entry(0, 0)["crc32"] = int(_native.crc32(blob))
    return t


def test_szpe_expert_that_does_not_decode_fails_its_fetch_with_corrupt_data():
    # Its arrival fails as CorruptDataError (named, not a crash), and the cache stays consistent.
    from moeoffload.errors import CorruptDataError

    t = _table_with_an_expert_that_does_not_decode()
    with ExpertCache(t, 4 * slot_bytes(t)) as cache:
        slot = cache.acquire(0, 0)
        with pytest.raises(CorruptDataError, match="stream"):
            slot.wait()
        cache.release(0, 0)
        cache.cache.synchronize()
        cache.cache.check_invariants()
        assert t.expert_id(0, 0) not in cache.cache
        slot = cache.acquire(0, 1)  # the others still land
        slot.wait()
        cache.release(0, 1)




def test_a_failed_fetch_stays_held_until_its_holders_release_it():
    # Once, the next call that looked at the copies dropped a failed expert while its caller still held it:
    # the caller's release then raised "not cached", and a layer's release_all left its other experts
    # pinned for good. Now a failed fetch keeps its slot, and its error for whoever acquires it, until the
    # last holder releases; the next acquire fetches it again.
    from moeoffload.errors import CorruptDataError

    t = _table_with_an_expert_that_does_not_decode()
    with ExpertCache(t, 4 * slot_bytes(t), prefetch=None) as cache:
        slots = cache.acquire_ahead(0, [0, 1])
        with pytest.raises(CorruptDataError):
            slots[0].wait()
        slots[1].wait()
        cache.acquire(0, 2).wait()  # looks at the copies: the failed one is still held
        with pytest.raises(CorruptDataError):
            cache.acquire(0, 0).wait()  # a second holder gets the same error, no fetch
        assert cache.stats()["misses"] == 3
        cache.release(0, 0)
        cache.release_all(0, [0, 1])
        cache.release(0, 2)
        cache.cache.check_invariants()
        assert t.expert_id(0, 0) not in cache.cache.resident()
        with pytest.raises(CorruptDataError):
            cache.acquire(0, 0).wait()  # fetched again (and fails again: the payload is what it is)
        assert cache.stats()["misses"] == 4
        cache.release(0, 0)
        cache.cache.synchronize()  # returns: a failed copy is not one to wait for
        for e in (1, 2, 3):
            cache.acquire(0, e).wait()
            cache.release(0, e)
        cache.cache.check_invariants()
        before = cache.stats()
    after = cache.stats()  # readable after close
    assert after["misses"] == before["misses"] and after["host_pinned"] is before["host_pinned"] is True


def test_table_with_an_older_szpe_payload_says_to_rebuild():
    # szpe version 2 (before per-stream exceptions and 13-bit frequencies): the store refuses it when it
    # loads the table, with FormatVersionError saying how to rebuild, and nothing is half loaded.
    from moeoffload import _native
    from moeoffload.errors import FormatVersionError

    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", codec="szpe", progress=False)
    blob = t.payload(0, 0).copy()
    m = t.matrix_entry(0, 0, t.matrix_names[0])
    buf = blob[m["offset"]:m["offset"] + m["bytes"]]
    buf[4] = 2
    buf[-4:] = np.frombuffer(np.uint32(_native.crc32(buf[:-4])).tobytes(), np.uint8)
    t._payloads[t.entry(0, 0)["tensor"]] = blob
    t.entry(0, 0)["crc32"] = int(_native.crc32(blob))
    with pytest.raises(FormatVersionError, match="version 2 is older.*build it again"):
        ExpertCache(t, 4 * slot_bytes(t))


def test_a_layers_experts_are_acquired_and_released_in_one_call():
    from moeoffload.errors import CacheFullError, InvalidArgumentError

    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False)
    with ExpertCache(t, 3 * slot_bytes(t)) as cache:  # room for three experts
        slots = cache.acquire_ahead(0, [3, 1, 0, 2])
        assert [s.id for s in slots] == [3, 1, 0]  # the prefix that fits: the fourth would wait for itself
        for s in slots:
            s.wait()
        assert cache.acquire_ahead(1, [0], holding_pins=True) == []  # holding pins: never waits, takes nothing
        with pytest.raises(CacheFullError):
            cache.acquire_ahead(1, [0], timeout=0.0)  # holding none (as far as it knows): the first must fit
        with pytest.raises(InvalidArgumentError, match="not in use"):
            cache.release_all(0, [3, 1, 2])  # 2 is not held: nothing is released
        with pytest.raises(InvalidArgumentError):
            cache.acquire_ahead(0, [E])
        cache.release_all(0, [3, 1, 0])
        assert [s.id for s in cache.acquire_ahead(1, [0, 1, 2])] == [E, E + 1, E + 2]
        cache.release_all(1, [0, 1, 2])
        with pytest.raises(InvalidArgumentError, match="not in use"):
            cache.release_all(1, [0])


def test_a_layers_expert_indices_are_checked_before_anything_is_pinned():
    # The per-layer calls check their indices in one pass (a decode step's hot path): integers of either
    # kind pass, and a bool, a float, a negative, one past the end or a bad layer is a named error.
    from moeoffload.errors import InvalidArgumentError

    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False)
    with ExpertCache(t, 4 * slot_bytes(t)) as cache:
        def pinned(layer, experts):  # the slots pinned, their copies waited for (a loading slot is not evictable)
            slots = cache.acquire_ahead(layer, experts)
            for s in slots:
                s.wait()
            return slots

        room = len(pinned(0, [0, 1, 2, 3]))  # what the budget pins at once
        cache.release_all(0, [0, 1, 2, 3][:room])
        assert [s.id for s in pinned(1, [np.int64(2), 0])] == [E + 2, E]
        cache.release_all(1, np.array([2, 0]))
        for bad in ([True], [1.0], [-1], [E], [0, E + 3], ["0"]):
            with pytest.raises(InvalidArgumentError, match="out of range"):
                cache.acquire_ahead(0, bad)
            with pytest.raises(InvalidArgumentError, match="out of range"):
                cache.record(0, bad)
        for layer in (-1, t.num_layers, True, 0.0):
            with pytest.raises(InvalidArgumentError, match="out of range|not an integer"):
                cache.acquire_ahead(layer, [0])
        assert cache.acquire_ahead(0, []) == []
        assert len(pinned(0, [0, 1, 2, 3])) == room  # the refused calls left nothing pinned


def test_an_acquire_ahead_that_fails_midway_leaves_nothing_pinned(tmp_path):
    # The first expert is a hit (pinned at once); fetching the second fails (the mapped table file changed):
    # the caller gets no slots, so the hit must not stay pinned either.
    import os

    from moeoffload.errors import InvalidArgumentError, TableChangedError

    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    t = table.load(tmp_path / "t")
    with ExpertCache(t, 8 * slot_bytes(t)) as cache:
        cache.acquire_ahead(0, [1])[0].wait()
        cache.release_all(0, [1])
        payload = next(p for p in (tmp_path / "t").iterdir() if p.suffix == ".safetensors")
        st = os.stat(payload)
        os.utime(payload, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(TableChangedError):
            cache.acquire_ahead(0, [1, 2])
        with pytest.raises(InvalidArgumentError, match="not in use"):
            cache.release(0, 1)
        cache.cache.check_invariants()
    t.close()


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_a_cache_refuses_a_table_file_that_changed_after_the_table_was_loaded(tmp_path, how):
    # The cache maps the payload file again by its path: a file replaced (another table's, same layout)
    # or rewritten in place since table.load would be served as this table's experts, silently.
    import os

    from moeoffload.errors import ChecksumError, TableChangedError

    for name, seed in (("a", 0), ("b", 1)):
        table.build(mixtral_state_dict(seed), codec="none", progress=False).save(tmp_path / name)
    t = table.load(tmp_path / "a")
    payload = next(p for p in (tmp_path / "a").iterdir() if p.suffix == ".safetensors")
    other = tmp_path / "b" / payload.name
    if how == "replaced":
        os.replace(other, payload)
    else:
        st = os.stat(payload)
        payload.write_bytes(other.read_bytes())
        os.utime(payload, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(TableChangedError, match="changed on disk"):
        ExpertCache(t, 4 * slot_bytes(t))
    if how == "replaced":  # the table reads the file it opened, which a rename over its name leaves alone
        np.testing.assert_array_equal(t.payload(0, 0), table.build(mixtral_state_dict(0), codec="none",
                                                                   progress=False).payload(0, 0))
    else:
        with pytest.raises(TableChangedError):
            t.payload(0, 0)  # the table says so too
    t.close()
    with pytest.raises(ChecksumError):  # loaded again, the file is found not to be what its manifest says
        table.load(tmp_path / "a")


def test_a_table_file_from_before_1970_or_a_chdir_still_caches(tmp_path, monkeypatch):
    # The file's identity is handed to the native store: st_mtime_ns is negative before 1970 (it met
    # nanobind's TypeError), and a relative table path must not name another file after a chdir.
    import os

    table.build(mixtral_state_dict(), codec="none", progress=False).save(tmp_path / "t")
    payload = next(p for p in (tmp_path / "t").iterdir() if p.suffix == ".safetensors")
    os.utime(payload, ns=(0, -5 * 10**9))
    monkeypatch.chdir(tmp_path)
    t = table.load("t")
    monkeypatch.chdir(tmp_path / "t")
    with ExpertCache(t, 4 * slot_bytes(t)) as cache:
        slot = cache.acquire(1, 2)
        slot.wait()
        assert np.array_equal(cache.cache.read(slot), t.payload(1, 2))
        cache.release(1, 2)
    t.close()


@pytest.mark.parametrize("mode", ["map", "copy"])
def test_a_payload_file_replaced_while_the_table_loads_is_refused(tmp_path, monkeypatch, mode):
    # load() read the payload file's header by its path, then opened it (or read it) again by the path:
    # a file replaced in between gave spans of one file over the bytes of another.
    import os

    from moeoffload.errors import TableChangedError

    for name, seed in (("a", 0), ("b", 1)):
        table.build(mixtral_state_dict(seed), codec="none", progress=False).save(tmp_path / name)
    parse = table._safetensors_header

    def parse_then_replace(path):
        out = parse(path)
        os.replace(tmp_path / "b" / path.name, path)
        return out

    monkeypatch.setattr(table, "_safetensors_header", parse_then_replace)
    with pytest.raises(TableChangedError, match="while it was loaded"):
        table.load(tmp_path / "a", mode=mode, verify=False)


def test_release_takes_a_stream_or_its_handle_and_names_anything_else():
    t = table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False)

    class FakeStream:  # what a torch.cuda.Stream offers: its handle
        cuda_stream = 0

    with ExpertCache(t, 4 * slot_bytes(t), backend="cpu") as cache:
        for stream in (None, 0, 0x1234, FakeStream()):
            cache.acquire(0, 1).wait()
            cache.release(0, 1, stream)
        cache.acquire_ahead(1, [0, 1])
        cache.release_all(1, [0, 1], FakeStream())
        for bad in ("x", -1, 1.5, True):
            cache.acquire(0, 2).wait()
            with pytest.raises(InvalidArgumentError, match="stream must be"):
                cache.release(0, 2, bad)
            cache.release(0, 2)  # still held after the refused release: nothing was unpinned



_RECORDERS = """
import sys, threading, time, numpy as np
from moeoffload import table
from moeoffload.cache import ExpertCache, slot_bytes
from moeoffload.prefetch import PrefetchConfig
t = table.load(sys.argv[1])
L, E = t.num_layers, t.experts_per_layer
c = ExpertCache(t, budget=3 * slot_bytes(t), prefetch=PrefetchConfig(depth=3, per_layer=E, min_probability=0.0))
for s in range(20):  # a history, so every step plans prefetches
    c.begin_sequence()
    for l in range(L):
        c.record(l, [s % E, (s + 1) % E])
    c.end_sequence()
errors, stop = [], time.monotonic() + float(sys.argv[2])
def recorder(seed):
    rng = np.random.default_rng(seed)
    while time.monotonic() < stop:
        try:
            c.record(int(rng.integers(L)), [int(rng.integers(E))])
        except Exception as e:
            errors.append(repr(e))
def sequences():
    while time.monotonic() < stop:
        time.sleep(0.05)
        c.end_sequence(); c.begin_sequence()
        c.decisions.matrix(); c.decisions.prediction()
threads = [threading.Thread(target=recorder, args=(i,)) for i in range(3)] + [threading.Thread(target=sequences)]
[th.start() for th in threads]; [th.join() for th in threads]
c.close()
print(len(errors), errors[:3])
"""


def test_records_from_several_threads_interleave_whole(tmp_path):
    """record() steps the cache's one decision step with the GIL released: steps from several threads
    (and sequences begun and ended beside them) must serialise. Unserialised, two threads rewrote the
    plan one was applying: garbage expert ids, double frees, segfaults within seconds."""
    import subprocess
    import sys

    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    r = subprocess.run([sys.executable, "-c", _RECORDERS, str(tmp_path / "t"), "4"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0 []", (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
