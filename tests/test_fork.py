"""fork() with the runtime alive (cpp/runtime/fork.cpp): a child has only the thread that forked, so
it must never wait on a lock or a condition variable a copy thread held, whenever the fork lands. Each
child runs in its own interpreter (subprocess) with a deadline: a hang fails the test instead of the
suite."""

import os
import subprocess
import sys

import pytest
from conftest import mixtral_state_dict

from moeoffload import table

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _run(code: str, timeout: float = 120) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)


def _reap(hung: str, failed: str | None = None) -> str:
    """Parent-side code for a _run script: wait up to 20 s for child `pid`, else kill it and fail with
    `hung`; with `failed`, also fail with it when the child's exit status is not 0."""
    code = f"""
deadline = time.time() + 20
while not (reaped := os.waitpid(pid, os.WNOHANG))[0]:
    if time.time() > deadline:
        os.kill(pid, 9)
        sys.exit({hung!r})
    time.sleep(0.01)
"""
    if failed is not None:
        code += f"if os.waitstatus_to_exitcode(reaped[1]):\n    sys.exit({failed!r})\n"
    return code


def test_a_child_drops_the_runtime_and_exits_normally(tmp_path):
    # Once a hang in every child: destroying the engine's condition variable waits for the copy
    # threads that waited on it, which do not exist in the child.
    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    _run(f"""
import gc, os, sys, time
from moeoffload import _native, table
from moeoffload.cache import ExpertCache
eng = _native.TransferEngine("cpu", 2)
cache = ExpertCache(table.load({str(tmp_path / "t")!r}), 10**7)
cache.acquire(0, 0).wait(); cache.release(0, 0)
time.sleep(0.05)  # every copy thread is waiting for work
pid = os.fork()
if pid == 0:
    del eng, cache
    gc.collect()
    sys.exit(0)  # and the interpreter's own teardown
""" + _reap("the child hung dropping the runtime"))


def test_forks_landing_while_copies_flow(tmp_path):
    # A fork could land while a copy thread held the engine's lock, or a caller the cache's or the
    # decision step's, or an op the runtime's: the child's close() (or record) then waited forever
    # (about one fork in twenty). Each child must
    # find an expert either resident or orphaned (ForkedError), get ForkedError from an op, never time
    # out, and get through close and exit.
    # (Driven through ExpertCache, which runs no Python on its copy threads: the engine's own Python
    # API drops its callbacks there, and CPython 3.11 can hang a child forked while another thread
    # makes its thread state, python/cpython#112275, whatever this project does.)
    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    _run(f"""
import os, sys, threading, time
import torch
from moeoffload import ops, table
from moeoffload.cache import ExpertCache, slot_bytes
from moeoffload.errors import CacheFullError, ForkedError
t = table.load({str(tmp_path / "t")!r})
cache = ExpertCache(t, 3 * slot_bytes(t), prefetch=None)  # fewer slots than experts: every pass misses
experts = [(layer, e) for layer in range(t.num_layers) for e in range(t.experts_per_layer)]
cpu = torch.device("cpu")
stop = threading.Event()
def feed():
    while not stop.is_set():
        for layer, e in experts:
            cache.acquire(layer, e).wait()
            ops._szp_decode_op(cache.handle, t.expert_id(layer, e), 0, cpu)  # holds the runtime's op lock
            cache.release(layer, e)
def records():  # most of its time in a step: holding the decision step's lock, then the cache's
    while not stop.is_set():
        for layer, e in experts:
            cache.record(layer, [e])
feeder, recorder = threading.Thread(target=feed), threading.Thread(target=records)
feeder.start()
recorder.start()
hung = bad = 0
for _ in range(60):
    time.sleep(0.002)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ops._szp_decode_op(cache.handle, 0, 0, cpu)
            code = 4
        except ForkedError:
            pass
        try:  # the decision step: its lock was taken whole across the fork
            cache.begin_sequence()
            cache.record(0, [0])
            cache.end_sequence()
        except ForkedError:
            pass
        except Exception:
            code = 5
        for layer, e in experts:
            try:
                cache.acquire(layer, e).wait(timeout=2)
                cache.release(layer, e)
            except ForkedError:
                pass
            except Exception as err:
                code = 3  # say, a timeout: neither resident nor orphaned
        cache.close()
        os._exit(code)  # (a normal exit would join the feeder, which the child does not have)
    deadline = time.time() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            bad += os.waitstatus_to_exitcode(status) != 0
            break
        if time.time() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.001)
stop.set()
feeder.join()
recorder.join()
cache.close()
assert (hung, bad) == (0, 0), (hung, bad)
""")


def test_a_miss_in_a_child_whose_cache_is_full_is_forked_not_full(tmp_path):
    # With every slot pinned, a miss in the child said CacheFullError ("raise the budget"); it needs a
    # copy, which a child never gets: ForkedError, whether or not there is room.
    table.build(mixtral_state_dict(), policy=0.3, mode="meanabs", progress=False).save(tmp_path / "t")
    _run(f"""
import os, sys
from moeoffload import table
from moeoffload.cache import ExpertCache, slot_bytes
from moeoffload.errors import CacheFullError, ForkedError
t = table.load({str(tmp_path / "t")!r})
cache = ExpertCache(t, 3 * slot_bytes(t), prefetch=None)
for e in range(3):
    cache.acquire(0, e).wait()
try:
    cache.acquire(1, 0, timeout=0.0)
    sys.exit("the cache had room: the test does not reach a full cache's miss")
except CacheFullError:
    pass
pid = os.fork()
if pid == 0:
    code = 3
    try:
        cache.acquire(1, 0, timeout=0.0)
    except ForkedError:
        code = 0
    except BaseException as e:
        print(type(e).__name__, e, file=sys.stderr)
    os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(f"the child's miss raised something else: {{status}}" if os.waitstatus_to_exitcode(status) else 0)
""")


def test_a_child_forked_while_another_thread_registers_a_tensor_registers_its_own():
    # The ops' registry lock is held while HostMatrices.add copies a buffer (GIL released): a fork then
    # left the child a lock no thread of its would release, and its first new tensor hung.
    _run("""
import os, sys, threading, time
import torch
from moeoffload import codec, ops
ops.matrix_handle(codec.compress(torch.randn(2, 2), 0.1))  # the registry exists
holding, done = threading.Event(), threading.Event()
def hold():  # as a thread inside matrix_handle's add would
    with ops._registry_lock:
        holding.set()
        done.wait()
t = threading.Thread(target=hold, daemon=True); t.start(); holding.wait()
pid = os.fork()
if pid == 0:
    ct = codec.compress(torch.randn(4, 8), 0.1)
    ops.szp_linear(torch.randn(2, 8), ct)
    os._exit(0)
""" + _reap("the child hung on the registry's lock") + """
done.set(); t.join()
""")


def test_a_child_forked_while_another_thread_computes_on_a_tensor_adds_and_frees_its_own():
    # An op holds the host matrices' read lock while it computes (GIL released): a fork then left the
    # child a lock held by a thread it does not have, and its first new tensor (add takes the lock
    # exclusively) or freed one (remove) hung. fork() now waits for the reading ops.
    _run("""
import gc, os, sys, threading, time
import torch
from moeoffload import codec, ops
ct = codec.compress(torch.randn(1024, 1024), 0.05)
x = torch.randn(64, 1024)
# every lazy import done first: a fork landing inside another thread's import hangs the child in it
ops.szp_linear(x, ct); ops.szp_linear(torch.randn(2, 8), codec.compress(torch.randn(4, 8), 0.1))
stop = threading.Event()
def compute():
    while not stop.is_set():
        ops.szp_linear(x, ct)
t = threading.Thread(target=compute, daemon=True); t.start()
time.sleep(0.1)
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        mine = codec.compress(torch.randn(4, 8), 0.1)
        ops.szp_linear(torch.randn(2, 8), mine)
        del mine
        gc.collect()
        os._exit(0)
""" + _reap("the child hung on the host matrices' lock", "the child failed").replace("\n", "\n    ") + """
    time.sleep(0.02)
stop.set(); t.join()
""")
