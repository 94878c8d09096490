"""A stop's last step before gRPC's own: every new call is refused at its entry, UNAVAILABLE and not run.

gRPC's stop cancels (CANCELLED) every call it has received but not yet handed to a handler, and a client
cannot tell such a call from one cut mid-way: it does not retry it, and it cannot know whether it was
decided. Measured before this gate (bench/RESULTS.md, "Calls cut CANCELLED at a stop"): 35-45 calls per
stop on the asyncio front end, 1-12 on the threaded one, with 48 clients sending. So before gRPC stops,
the kernel closes this gate: a call handed to a handler from then on gets UNAVAILABLE with
``aios-not-decided`` (a retry, on another instance or after the restart, cannot decide twice) before it
touches anything, whatever its service, while calls already in progress finish; gRPC's queue of received
calls empties at the rate of a refusal, and gRPC stops once no call has been refused for a short while.
(An earlier try refused at the lanes instead: it also refused durable tasks' own attempts and requests
an open DecideStream had taken, and left every RPC that never reaches a lane to be cut CANCELLED.)

The check is where gRPC reads a handler's behaviour for each call (a property on the handler tuple,
``guard``), so an open gate costs one Python property call per call and changes nothing else: the
behaviour gRPC gets is the very function the kernel registered (the threaded front end's per-behaviour
thread pools, ``experimental_thread_pool``, stay on it). Health and reflection are not gated: a probe
during the stop hears NOT_SERVING.
"""

from __future__ import annotations

import threading
import time

import grpc

from ..errors import NOT_DECIDED
from .registration import ServiceHandlers, _RpcMethodHandler

REFUSAL = "the kernel is stopping: this call was not run (send it again to another instance, or after the restart)"
# The hint with it: a client that sends again at once to the same address would meet the gate again and again
# (and keep its quiet window from ever coming); one that waits meets the restarted kernel or another instance.
RETRY_AFTER_MS = 1000
TRAILERS = (*NOT_DECIDED, ("retry-after-ms", str(RETRY_AFTER_MS)))
_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class EntryGate:
    """Open until ``close``; counts the calls it refused and when it last refused one."""

    def __init__(self, asynchronous: bool):
        self.closed = False
        self.refused = 0
        self.last_refusal_ns = 0
        self._count = threading.Lock()  # (threaded front end: handler threads refuse at once)
        self.refuse = self._refuse_async if asynchronous else self._refuse_sync

    def close(self) -> None:
        self.last_refusal_ns = time.monotonic_ns()  # the quiet window counts from the close
        self.closed = True

    def counted(self) -> None:
        with self._count:
            self.refused += 1
            self.last_refusal_ns = time.monotonic_ns()

    def _refuse_sync(self, request_or_iterator, context) -> None:
        self.counted()
        context.set_trailing_metadata(TRAILERS)
        context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL)

    async def _refuse_async(self, request_or_iterator, context) -> None:
        self.counted()
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL, trailing_metadata=TRAILERS)


def _gated_class(base: type, gate: EntryGate) -> type:
    """``base`` (a handler tuple type) whose non-empty behaviour is ``gate.refuse`` once the gate is closed."""

    def guarded(name: str):
        read = getattr(base, name)  # the tuple's own field getter, or _ArrivalStamped's property

        def behaviour(handler):
            value = read.__get__(handler, type(handler))
            return gate.refuse if gate.closed and value is not None else value

        return property(behaviour)

    return type(f"Gated{base.__name__}", (base,), {"__slots__": (), **{name: guarded(name) for name in _BEHAVIOURS}})


def guard(services, gate: EntryGate) -> None:
    """Put every method handler of ``services`` (``registration.ServiceHandlers``) behind ``gate``, in place,
    before they are added to a server (the threaded server registers the handler objects themselves)."""
    classes: dict[type, type] = {}
    for service in services:
        if not isinstance(service, ServiceHandlers):
            continue
        for name, handler in list(service.methods.items()):
            base = type(handler)
            if not issubclass(base, _RpcMethodHandler):
                continue
            gated = classes.get(base) or classes.setdefault(base, _gated_class(base, gate))
            service.replace(name, gated._make(handler))
