"""Slots made ready for the compute that reads them, and the stall: the time that compute waited for
copies the cache did not hide.

On the cpu backend the host waits for a slot's copy and that wait is the stall. On cuda the host does
not wait: the compute stream is ordered after the copy's event (``Transfer.order``) and the host goes on
queueing work until it next reads the device (the next layer's routing). A host wait there cost a
thread wake-up and a launch after every miss, with the GPU idle meanwhile, and kept the host from queueing
the next layer's work during the copy. The stall of a layer is then counted after the fact: how long
after its compute was queued its last copy landed (``Transfer.done_ns``, seen by the copy's completer
thread within microseconds). Right after a routing's synchronisation the stream is empty, so a layer's
compute starts about when it is queued; the eager path queues expert by expert behind earlier experts'
compute, so there the figure is an upper bound.
"""

from __future__ import annotations

import threading
import time

_SETTLE_TIMEOUT_S = 10.0  # seconds() waits this long a copy; one not landed by then is counted later


class Stalls:
    def __init__(self, device_ordered: bool):
        self.device_ordered = device_ordered  # cuda: no host wait (tests set it on the cpu, where order() waits)
        self._seconds = 0.0
        self._pending: list[tuple[int, list]] = []  # (queued_ns, transfers) of calls not yet counted, in order
        self._counted_to = 0  # ns: stall before this is counted (overlapping calls' waits count once)
        self._lock = threading.Lock()  # stats() may run in another thread than the forward

    def ready(self, slots, stream: int | None) -> None:
        """Make the slots' bytes visible to the work queued next on `stream` (a cudaStream_t as an int;
        None on the cpu), counting the stall. Raises a copy's error."""
        missed = [s.transfer for s in slots if s.lookup != "hit" and s.transfer is not None]
        if not missed:
            return
        if not self.device_ordered:
            start = time.perf_counter()
            for t in missed:
                t.wait()
            with self._lock:
                self._seconds += time.perf_counter() - start
            return
        queued = time.monotonic_ns()  # (before ordering: on the cpu, where order() waits, that wait counts)
        for t in missed:
            t.order(stream or 0)
        with self._lock:
            self._pending.append((queued, missed))
            self._count(block=False)

    def seconds(self) -> float:
        """The stall so far, once the copies it waits on have landed (each waited for up to 10 s)."""
        with self._lock:
            self._count(block=True)
            return self._seconds

    def _count(self, block: bool) -> None:
        """Counts the pending calls in the order they were queued, up to the first whose copies are not
        all done: a call's stall is from when it was queued (or the last counted stall's end, when
        they overlap) to when its last copy landed."""
        counted = 0
        for queued, transfers in self._pending:
            if block:
                for t in transfers:
                    try:
                        t.wait(_SETTLE_TIMEOUT_S)
                    except Exception:  # failed (raised where it was ordered, or by the next CUDA call), or late
                        pass
            if not all(t.done() for t in transfers):
                break
            landed = max(t.done_ns for t in transfers)
            self._seconds += max(0, landed - max(queued, self._counted_to)) / 1e9
            self._counted_to = max(self._counted_to, landed)
            counted += 1
        del self._pending[:counted]
