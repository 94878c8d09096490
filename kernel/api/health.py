"""grpc.health.v1.Health for both front ends, with watches that end when the kernel drains.

grpc's own servicers (``grpc_health.v1.health``) keep a ``Watch`` open until
the client leaves: at a drain it is sent NOT_SERVING and then holds the stop
for the whole grace period before gRPC cuts it off with "Cancelling all
calls". Here ``end_watches()`` ends every open watch with UNAVAILABLE "the
kernel is shutting down", like the kernel's other watches, after it has been
sent the NOT_SERVING that tells a load balancer to stop; a watch opened later
gets the status and ends at once. ``Check`` answers as grpc's servicer does,
with NOT_FOUND naming an unknown service.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..errors import shutting_down

Response = health_pb2.HealthCheckResponse
UNKNOWN = Response.SERVICE_UNKNOWN  # what a watch of a name with no status is sent (grpc's servicer does the same)


def _listing(statuses: dict) -> health_pb2.HealthListResponse:
    listing = health_pb2.HealthListResponse()
    for service, status in statuses.items():
        listing.statuses[service].status = status
    return listing


def _not_found(service: str) -> str:
    return f"no health status for service '{service}': ask for '' (the whole kernel) or a served service's full name"


class ThreadedHealth(health_pb2_grpc.HealthServicer):
    """The threaded front end's servicer. ``Watch`` holds no thread: gRPC calls it with a callback that
    sends (``experimental_non_blocking``), and ``set`` sends each change from the caller's thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._status = {"": Response.SERVING}
        self._watchers: dict[int, tuple[str, object, object]] = {}  # id -> (service, context, send)
        self._next_id = 0
        self._ended = False

    def Check(self, request, context):
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, _not_found(request.service))
        return Response(status=status)

    def List(self, request, context):
        """Every service's status (grpc.health.v1; reflection listed it, and it answered UNIMPLEMENTED)."""
        with self._lock:
            return _listing(self._status)

    def Watch(self, request, context, send_response_callback=None):
        send = send_response_callback
        with self._lock:
            send(Response(status=self._status.get(request.service, UNKNOWN)))
            if self._ended:
                _end(context, send)
                return None
            watch_id, self._next_id = self._next_id, self._next_id + 1
            self._watchers[watch_id] = (request.service, context, send)
        context.add_callback(lambda: self._forget(watch_id))  # the call ended (client left, deadline)
        return None

    # gRPC hands Watch a send callback instead of holding a thread for a generator.
    Watch.experimental_non_blocking = True
    Watch.experimental_thread_pool = None

    def _forget(self, watch_id: int) -> None:
        with self._lock:
            self._watchers.pop(watch_id, None)

    def set(self, service: str, status) -> None:
        with self._lock:
            if self._status.get(service) == status:  # a watch hears of changes only (grpc.health.v1)
                return
            self._status[service] = status
            for name, _, send in self._watchers.values():
                if name == service:
                    send(Response(status=status))

    def end_watches(self) -> None:
        with self._lock:
            self._ended = True
            watchers, self._watchers = list(self._watchers.values()), {}
            for _, context, send in watchers:
                _end(context, send)


def _end(context, send) -> None:
    """End a non-blocking watch with the drain's status (``send(None)`` sends the context's status)."""
    error = shutting_down()
    context.set_code(grpc.StatusCode[error.code])
    context.set_details(error.message)
    send(None)


class AsyncHealth(health_pb2_grpc.HealthServicer):
    """The asyncio front end's servicer; ``set`` and ``end_watches`` run on the server's loop."""

    def __init__(self):
        self._status = {"": Response.SERVING}
        self._changed = asyncio.Event()  # replaced after each change: every watch waits on the current one
        self._ended = False

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(request.service))
        return Response(status=status)

    async def List(self, request, context):
        return _listing(self._status)

    async def Watch(self, request, context):
        sent = None
        while True:
            # Take the event before reading the status: a change made while ``write`` is awaited below
            # replaces ``self._changed``, and waiting on the replacement would miss that change for good.
            changed = self._changed
            status = self._status.get(request.service, UNKNOWN)
            if status != sent:
                await context.write(Response(status=status))
                sent = status
                continue  # look again: a change, or the drain's end, may have come while this was written,
                #           and the watch must hear the last status (NOT_SERVING) before it is ended
            if self._ended:
                error = shutting_down()
                await context.abort(grpc.StatusCode[error.code], error.message)
            await changed.wait()

    async def set(self, service: str, status) -> None:
        if self._status.get(service) == status:  # a watch hears of changes only (grpc.health.v1)
            return
        self._status[service] = status
        self._wake()

    async def end_watches(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
