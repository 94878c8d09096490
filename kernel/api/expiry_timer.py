"""Expire queued work items at their deadline for callers that do not wait for them (calls answered later).

A lane looks at deadlines only when it picks the next batch, and a caller
that blocks on its item wakes itself at the deadline (``Lane.run_blocking``);
the event loop keeps a timer per call (``aio_wait``). A call answered later
(``answer_later.py``) has neither: behind a long batch its item would be
answered DEADLINE_EXCEEDED only when the lane came free. This one thread
keeps every such deadline in a heap and, when one passes, hands the item to
``expire`` (``InferenceService.expire``: a no-op for an item that already
left the queue), which answers it through the item's ``on_done``.

Entries are cells (``[item]``) that the caller clears once the item is
answered, so a long deadline does not keep a finished request's tensors
alive; the heap is rebuilt without cleared cells when they outnumber the
live ones. The thread starts with the first deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from ..threads import name_native_thread

log = logging.getLogger("aios.api")

_COMPACT_MIN = 1024  # below this many entries the heap is never rebuilt


class ExpiryTimer:
    def __init__(self, expire: Callable[[object], bool], name: str = "aios-expiry"):
        self._expire = expire
        self._name = name
        self._heap: list = []
        self._live = 0  # cells not yet cleared
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.expired = 0  # items handed to ``expire`` (tests)

    def watch(self, item, deadline_ns: int) -> list:
        """Expire ``item`` at ``deadline_ns`` unless ``forget`` is called with the returned cell first."""
        cell = [item]
        with self._lock:
            if self._closed:
                return cell
            heap = self._heap
            earliest = heap[0][0] if heap else None
            heapq.heappush(heap, (deadline_ns, next(self._seq), cell))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif earliest is None or deadline_ns < earliest:
                self._wake.notify()  # the thread sleeps until a later instant
        return cell

    def forget(self, cell: list) -> None:
        """The item was answered: drop it from the watch (cheap; the heap entry goes later)."""
        if cell[0] is not None:
            with self._lock:
                if cell[0] is not None:
                    cell[0] = None
                    self._live -= 1
                    if len(self._heap) > _COMPACT_MIN and len(self._heap) > 4 * self._live:
                        self._heap = [entry for entry in self._heap if entry[2][0] is not None]
                        heapq.heapify(self._heap)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._heap.clear()
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        name_native_thread()
        with self._lock:
            while not self._closed:
                heap = self._heap
                while heap and heap[0][2][0] is None:  # forgotten (answered) at the top: no reason to wake
                    heapq.heappop(heap)
                if not heap:
                    self._wake.wait()
                    continue
                now = time.monotonic_ns()
                if heap[0][0] > now:
                    self._wake.wait((heap[0][0] - now) / 1e9)
                    continue
                due = []
                while heap and heap[0][0] <= now:
                    cell = heapq.heappop(heap)[2]
                    if cell[0] is not None:
                        due.append(cell[0])
                        cell[0] = None
                        self._live -= 1
                self._lock.release()
                try:
                    for item in due:
                        self.expired += 1
                        try:
                            self._expire(item)
                        except Exception:  # one item's fault must not stop the clock for the others
                            log.exception("expiring a request at its deadline failed")
                finally:
                    self._lock.acquire()
