"""What one stream call (ModelStreamInfer, DecideStream) has queued: its deadlines watched, and taken out of
the queue when the call ends.

Streams queue their requests as they arrive, without waiting for answers.
Unary calls had two things a ModelStreamInfer's requests lacked (stream
audit, 2026-11-27; DecideStream kept its own copy of the second and lacked
the first on the asyncio front end):

* the expiry timer: a queued request's deadline was noticed only when a
  batch formed, so behind a 300 ms static window a request with a 100 ms
  ``timeout`` was answered DEADLINE_EXCEEDED after 334 ms (a unary call: at
  its deadline), and every later answer of the stream waited for it;
* cancellation: a stream the client cancelled left its requests queued; all
  of them still ran, held the model's queue against other callers and, on
  the threaded front end, the stream's handler thread until the last one.

The bound on what a stream may have in flight (``MAX_IN_FLIGHT``) is taken
by each stream's reader before it prepares a request and given back once the
request's answer is sent, so a client that sends without reading is pushed
back by its own transport.
"""

from __future__ import annotations

import threading

MAX_IN_FLIGHT = 1024  # unanswered requests per stream; its reader stops taking requests beyond it (back-pressure)

__all__ = ["MAX_IN_FLIGHT", "StreamWindow"]


class StreamWindow:
    """The stream's queued requests (``WorkItem``), each with its deadline watch."""

    __slots__ = ("_service", "_lock", "_queued")

    def __init__(self, service):
        self._service = service  # kernel.api.inference.InferenceService (watch_deadline, expiry, submit, cancel)
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
