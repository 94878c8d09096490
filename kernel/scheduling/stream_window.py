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

What a stream may hold unanswered is bounded twice (``has_room``): in
requests (``MAX_IN_FLIGHT``) and in their bytes (``MAX_HELD_BYTES``: on the wire, or what a ModelStreamInfer
request's decoded inputs hold when that is more, ``grow``). Each
stream's reader counts a request in before it prepares it and out once its
answer is sent, so a client that sends without reading is pushed back by its
own transport. The byte bound came from a streams audit (2026-11-27): 1,024
requests of up to ``max_message_bytes`` (64 MiB) each let one stream hold
64 GiB; a DecideStream of 0.9 MiB text fields took the server from 100 MiB
to 1.7 GiB.
"""

from __future__ import annotations

import asyncio
import threading

MAX_IN_FLIGHT = 1024  # unanswered requests per stream; its reader stops taking requests beyond it (back-pressure)
MAX_HELD_BYTES = 64 * 1024 * 1024  # and their bytes (serialized, or decoded when more): beyond these, too

__all__ = ["MAX_HELD_BYTES", "MAX_IN_FLIGHT", "AsyncStreamHold", "StreamHold", "StreamWindow", "has_room"]


def has_room(requests: int, nbytes: int, max_requests: int | None = None, max_bytes: int | None = None) -> bool:
    """Whether a stream holding ``requests`` unanswered requests of ``nbytes`` in all may take another.
    One is always taken, however large: a single message is already bounded by ``max_message_bytes``,
    so a stream holds at most ``MAX_HELD_BYTES`` plus one message. (The limits are read here, at the
    call, so that tests can lower them; ``max_requests``/``max_bytes``: other limits than these.)"""
    if requests == 0:
        return True
    return (requests < (MAX_IN_FLIGHT if max_requests is None else max_requests)
            and nbytes < (MAX_HELD_BYTES if max_bytes is None else max_bytes))


class StreamHold:
    """One stream's unanswered requests and their bytes, for a reader thread that waits for room. Also what a
    producer thread has handed on and not seen sent (rpc.aio_handler), with limits of its own."""

    __slots__ = ("_room", "requests", "nbytes", "_limits")

    def __init__(self, max_requests: int | None = None, max_bytes: int | None = None):
        self._room = threading.Condition(threading.Lock())
        self.requests = 0
        self.nbytes = 0
        self._limits = (max_requests, max_bytes)  # (None: has_room's own)

    def take(self, nbytes: int, still_wanted) -> bool:
        """Count in a request of ``nbytes`` once there is room; False (nothing counted) if ``still_wanted()``
        turns false meanwhile (the call ended), looked at every half second while waiting."""
        with self._room:
            while not has_room(self.requests, self.nbytes, *self._limits):
                if not self._room.wait(0.5) and not still_wanted():
                    return False
            self.requests += 1
            self.nbytes += nbytes
        return True

    def grow(self, nbytes: int) -> None:
        """Count ``nbytes`` more for the request taken last, without waiting: what decoding it made beyond its
        bytes on the wire (the next ``take`` waits for room)."""
        with self._room:
            self.nbytes += nbytes

    def give_back(self, nbytes: int) -> None:
        """Count out a request of ``nbytes`` (its answer is sent)."""
        with self._room:
            self.requests -= 1
            self.nbytes -= nbytes
            self._room.notify()


class AsyncStreamHold:
    """``StreamHold`` for a reader coroutine on the event loop."""

    __slots__ = ("_room", "requests", "nbytes")

    def __init__(self):
        self._room = asyncio.Condition()
        self.requests = 0
        self.nbytes = 0

    async def take(self, nbytes: int) -> None:
        async with self._room:
            await self._room.wait_for(lambda: has_room(self.requests, self.nbytes))
            self.requests += 1
            self.nbytes += nbytes

    def grow(self, nbytes: int) -> None:
        """``StreamHold.grow``, on the event loop (nothing to wait for: only a take waits)."""
        self.nbytes += nbytes

    async def give_back(self, nbytes: int) -> None:
        async with self._room:
            self.requests -= 1
            self.nbytes -= nbytes
            self._room.notify()


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
