"""What one ModelStreamInfer call has queued: its deadlines watched, and taken out of the queue when the call ends.

Both front ends queue a stream's requests as they arrive and answer them in
request order (``frontends.InOrder``). Unary calls had two things a stream's
requests lacked (stream audit, 2026-11-27):

* the expiry timer: a queued request's deadline was noticed only when a
  batch formed, so behind a 300 ms static window a request with a 100 ms
  ``timeout`` was answered DEADLINE_EXCEEDED after 334 ms (a unary call: at
  its deadline), and every later answer of the stream waited for it;
* cancellation: a stream the client cancelled left its requests queued; all
  of them still ran, held the model's queue against other callers and, on
  the threaded front end, the stream's handler thread until the last one.

The bound on what a stream may have in flight (``MAX_IN_FLIGHT``, the same
as DecideStream's) is taken by each front end's reader before it prepares a
request and given back once the request's answer is sent, so a client that
sends without reading is pushed back by its own transport.
"""

from __future__ import annotations

import threading

from ..pipelines.stream import MAX_IN_FLIGHT

__all__ = ["MAX_IN_FLIGHT", "StreamWindow"]


class StreamWindow:
    """The stream's queued requests (``WorkItem``), each with its deadline watch."""

    __slots__ = ("_service", "_lock", "_queued")

    def __init__(self, service):
        self._service = service  # kernel.api.inference.InferenceService
        self._lock = threading.Lock()
        self._queued: dict[int, object] = {}  # id(item) -> item, from submit until its on_done

    def submit(self, item, on_done) -> None:
        """Queue ``item``; ``on_done(item)`` once it finished, expired at its deadline, or was cancelled.
        A refusal at admission raises (``on_done`` is then never called)."""
        service, queued, lock = self._service, self._queued, self._lock
        watch = service.watch_deadline(item)
        key = id(item)

        def done(finished) -> None:
            with lock:
                queued.pop(key, None)
            if watch is not None:
                service.expiry.forget(watch)
            on_done(finished)

        item.on_done = done
        with lock:  # (before the submit: the item may finish on a lane thread before submit returns)
            queued[key] = item
        try:
            service.submit(item, watch)
        except BaseException:
            with lock:
                queued.pop(key, None)
            raise

    def cancel_all(self) -> int:
        """Take every still-queued request of the stream out of its queue (the call ended: cancelled,
        or gone). Each is answered through its ``on_done`` as cancelled; returns how many were asked."""
        with self._lock:
            items = list(self._queued.values())
        for item in items:
            self._service.cancel(item)
        return len(items)
