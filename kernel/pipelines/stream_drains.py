"""Ending open DecideStreams when the kernel stops: what a stream took is answered, what it did not is not read.

Left to gRPC's stop, a stream goes on taking and deciding requests for the whole grace period and is then cut
(UNAVAILABLE "Cancelling all calls", a status that invites sending again) with answers of recorded decisions
unsent: a streams audit counted 4,087. So when the drain begins each open stream stops taking requests,
answers those it took, and ends with ``DRAINED``. The stream pump (threaded front end) and the reader-thread
path (``stream.decide_stream``: grpc.aio, or the pump off) both end this way.
"""

from __future__ import annotations

import threading

DRAINED = ("the kernel is shutting down: every request this stream answered was decided; the requests it did not "
           "answer were not read, so not decided: send them again, elsewhere or later")


class StreamDrains:
    """The open streams of one decision engine, each registered with a callback that starts its end."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[int, object] = {}
        self.draining = False

    def open(self, on_drain) -> int | None:
        """Register a stream; None (start its end at once) when the drain has begun. Returns its token."""
        with self._lock:
            if self.draining:
                return None
            token = id(on_drain)
            self._open[token] = on_drain
            return token

    def close(self, token: int | None) -> None:
        with self._lock:
            self._open.pop(token, None)

    def drain(self) -> None:
        with self._lock:
            self.draining = True
            callbacks = list(self._open.values())
        for on_drain in callbacks:
            on_drain()
