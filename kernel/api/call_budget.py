"""Calls in progress on the threaded front end, with room kept for the most urgent priority.

The sync front end runs each call on one of ``workers`` handler threads,
and gRPC refuses every call beyond that many at once ("Concurrent RPC limit
exceeded!") before any of our code can read the call's priority. Under a
flood of low-priority work that means priority-1 calls are refused as often
as the flood's. ``CallBudget`` refuses lower-priority calls a little
earlier, once ``workers - reserve`` are in progress, with RESOURCE_EXHAUSTED
and a ``retry-after-ms`` hint, so the last ``reserve`` threads are there for
priority-1 calls. Calls in progress are counted as gRPC counts them, from
their arrival: those in the handler pool (submitted, not yet finished, so
calls still waiting for a thread count too) and those whose request has not
arrived yet (``eager_receive``: such a call holds no thread yet) or that
were handed on to be answered later (``answer_later``: they hold none any
more), read without a lock.

Calls are admitted on their handler threads, each counting the others in
progress, so two calls that arrive together when one slot is left both count
each other and both may be refused: the retry hint covers that, and the next
try finds the slot (a lock here would order admissions, not arrivals).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import ResourceExhausted
from .watch_budget import OpenBudget

URGENT = 1  # the priority level the reserve is kept for
RETRY_AFTER_MS = 20  # a hint: a handler thread frees up about as often as a batch finishes


def default_reserve(workers: int) -> int:
    return max(1, min(128, workers // 8))


STREAM_ADVICE = "end a stream you no longer use, send more on the ones you have"


class StreamBudget:
    """``max_streams`` alone, for grpc.aio's DecideStream: no handler threads there to keep for priority 1, but
    each stream still takes two threads (its requests are read and answered through them): 3,000 idle streams
    made 6,001 threads with nothing refused (a streams audit)."""

    __slots__ = ("_streams",)

    def __init__(self, max_streams: int):
        self._streams = OpenBudget(max_streams, "streams", "DecideStream", "max_streams", STREAM_ADVICE)

    @property
    def streams_open(self) -> int:
        return self._streams.open

    def admit_stream(self) -> None:
        self._streams.hold()  # (given back by stream_ended, when the call ends)

    def stream_ended(self) -> None:
        self._streams._release()


class CallBudget:
    __slots__ = ("limit", "reserve", "_soft", "_in_progress", "refused", "streams_admitted", "_lock", "_streams")

    def __init__(self, limit: int, in_progress: Callable[[], int], reserve: int | None = None,
                 max_streams: int | None = None):
        self.limit = limit
        self.reserve = default_reserve(limit) if reserve is None else reserve
        self._soft = limit - self.reserve
        self._in_progress = in_progress  # calls in progress, the asking one included
        self.refused = 0  # lower-priority calls turned away to keep the reserve
        self.streams_admitted = 0  # streams let in (tests wait on it: admission runs on the handler thread)
        self._lock = threading.Lock()  # (for the stream counts: several handler threads admit at once)
        # Open client streams, capped: idle ones hold call slots, and the reserve alone kept only priority 1 in.
        self._streams = OpenBudget(limit if max_streams is None else max_streams, "streams",
                                   "DecideStream and ModelStreamInfer", "max_streams", STREAM_ADVICE)

    @property
    def streams_open(self) -> int:
        return self._streams.open

    def admit_stream(self) -> None:
        """Refuse a stream that would eat the reserve, or one beyond ``max_streams``. A stream holds its call slot
        for as long as it is open, whatever its messages' priorities: twenty idle streams took every slot, and
        then gRPC's own limit refused priority-1 calls with no retry hint; 448 from one client left only
        priority 1 a way in."""
        self.admit(URGENT + 1)
        try:
            self._streams.hold()  # (given back by stream_ended, when the call ends)
        except ResourceExhausted:
            self.refused += 1
            raise
        with self._lock:
            self.streams_admitted += 1

    def stream_ended(self) -> None:
        """An admitted stream's call ended (call once per ``admit_stream`` that returned)."""
        self._streams._release()

    def admit_item(self, item) -> None:
        """``admit`` for a prepared request (a WorkItem): a refusal is counted in its model's statistics too
        (``rejected_busy``: a statistics audit found these, the overload signal, in no counter)."""
        try:
            self.admit(item.priority)
        except ResourceExhausted:
            item.model.stats.record_refused("rejected_busy")
            raise

    def admit(self, priority: int) -> None:
        """Refuse a call of ``priority`` if it would eat the reserve."""
        if priority <= URGENT:
            return
        in_flight = self._in_progress()
        if in_flight > self._soft:
            self.refused += 1
            raise ResourceExhausted(
                f"{in_flight - 1} calls are in progress (limit {self.limit}, the last {self.reserve} kept for "
                f"priority {URGENT}); retry after {RETRY_AFTER_MS} ms",
                trailers=(("retry-after-ms", str(RETRY_AFTER_MS)),),
            )
