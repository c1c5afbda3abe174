import threading
import time

import numpy as np
import pytest

from moeoffload import _native
from moeoffload.errors import ClosedError, InvalidArgumentError, ShapeError


def test_copies_land_and_callbacks_run_on_two_streams():
    eng = _native.TransferEngine("cpu", 2)
    assert eng.num_streams == 2
    rng = np.random.default_rng(0)
    srcs = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in rng.integers(1, 200_000, 40)]
    dsts = [np.zeros_like(s) for s in srcs]
    landed = []
    issued = time.monotonic_ns()
    handles = [eng.copy(s, d, tag=i, callback=lambda tag, failed: landed.append((tag, failed)))
               for i, (s, d) in enumerate(zip(srcs, dsts))]
    for h in handles:
        h.wait(timeout=10)
        assert h.done() and not h.failed()
        assert issued <= h.done_ns <= time.monotonic_ns()  # when it landed, on Python's monotonic clock
    eng.synchronize()
    assert sorted(landed) == [(i, False) for i in range(40)]
    assert {h.stream_index for h in handles} == {0, 1}
    for s, d in zip(srcs, dsts):
        np.testing.assert_array_equal(s, d)
    st = eng.stats()
    assert st["copies"] == 40 and st["in_flight"] == 0 and st["bytes"] == sum(s.size for s in srcs)
    late = []
    handles[0].add_callback(lambda tag, failed: late.append(tag))  # already done: runs at once
    assert late == [0]
    eng.close()
    with pytest.raises(ClosedError):
        eng.copy(srcs[0], dsts[0])


def test_order_on_the_cpu_backend_waits_for_the_copy():
    # Transfer.order(stream) orders a CUDA stream after the copy's event; on cpu it is a wait. (On the
    # cuda path tests/cuda_emulation's arrival check orders a stream after copies still queued.)
    eng = _native.TransferEngine("cpu", 1)
    src = np.arange(64 * 2**20, dtype=np.uint8)
    dsts = [np.zeros_like(src) for _ in range(3)]
    handles = [eng.copy(src, d) for d in dsts]
    handles[-1].order(0)
    assert handles[-1].done()
    np.testing.assert_array_equal(dsts[-1], src)
    eng.close()


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        _native.TransferEngine("cpu", 0)
    for ahead in (0, 9):
        with pytest.raises(InvalidArgumentError, match="issue_ahead"):
            _native.TransferEngine("cpu", 1, ahead)
    assert _native.TransferEngine("cpu", 1).issue_ahead == 8
    eng = _native.TransferEngine("cpu", 1)
    with pytest.raises(ShapeError):
        eng.copy(np.zeros(10, np.uint8), np.zeros(5, np.uint8))
    eng.close()


def test_wait_releases_the_gil():
    eng = _native.TransferEngine("cpu", 1)
    src = np.ones(256 * 2**20, np.uint8)
    dst = np.empty_like(src)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.01)
    # Queue several big copies, then wait: the spinning thread must keep running meanwhile.
    handles = [eng.copy(src, dst) for _ in range(4)]
    before = counter[0]
    start = time.perf_counter()
    for h in handles:
        h.wait()
    waited = time.perf_counter() - start
    during = counter[0] - before
    stop.set()
    t.join()
    eng.close()
    assert waited > 0.01
    assert during > 1000, f"the waiting thread held the GIL ({during} increments in {waited:.3f} s)"
