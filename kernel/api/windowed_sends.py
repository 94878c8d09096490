"""Server-streaming calls on the threaded front end whose messages go out without a thread switch each.

grpc's synchronous server sends each message of a response stream from the
handler's thread and puts that thread to sleep until gRPC has sent it: the
poller wakes it, it takes the GIL back, starts the next send, sleeps again.
Under load every wake waits for the GIL (up to its 5 ms switch interval), so
a StreamAudit follower of a busy kernel got ~90 records/s while the kernel
wrote ~2,900/s (a race audit: the tail fell further behind the longer the load
lasted; ~4,250/s on an idle kernel).

Here the handler's thread only produces: it serializes each message and
queues it, and waits only when ``WINDOW`` messages, or ``WINDOW_BYTES`` of
them, are queued and not yet sent (the count alone let a StreamAuditBatches
follower that stopped reading hold 256 messages of up to 4,096 records
each: the whole log, or ~1 GB, per call). gRPC's poller starts each next
send from the previous one's completion (one send in flight per call, as
gRPC requires), and wakes the producer once the queue is down to half. After the last message the producer waits for the
queue to empty and sends the status, as grpc's own path does. It follows
grpc's response path step for step with the private helpers
``stream_pump.py`` already relies on; where those are missing the method
keeps grpc's standard path.
"""

from __future__ import annotations

import logging
from collections import deque

from .stream_pump import AVAILABLE, TakeOverPool, start_send

log = logging.getLogger("aios.api")

WINDOW = 256  # messages queued for one call before its producer waits (~0.3 MB of audit records)
WINDOW_BYTES = 2 << 20  # bytes queued for one call before its producer waits (~7 StreamAuditBatches messages of 256)

if AVAILABLE:
    import grpc._server as _gs
    from grpc._cython import cygrpc as _cygrpc


class WindowedSends(TakeOverPool):
    """The "thread pool" grpc picks for one server-streaming method: runs each call's handler on the server's
    pool with the windowed sender in place of grpc's send-and-wait."""

    method = "a response stream"

    def submit(self, *args, **kwargs):
        if not self.follows(args, kwargs):
            return self._pool.submit(*args, **kwargs)
        run, _respond, *call = args  # (a unary request: the thunk receives it)
        return self._pool.submit(run, _respond_windowed, *call)


def _respond_windowed(rpc_event, state, behavior, argument_thunk, request_deserializer, response_serializer) -> None:
    """grpc's ``_stream_response_in_pool`` for a blocking handler, with ``_Sender`` sending its messages."""
    _cygrpc.install_context_from_request_call_event(rpc_event)
    try:
        argument = argument_thunk()
        if argument is None:
            return
        responses, proceed = _gs._call_behavior(rpc_event, state, behavior, argument, request_deserializer)
        if not proceed:
            return
        sender = _Sender(rpc_event, state)
        while True:
            try:
                response = next(responses)
            except StopIteration:  # the iterator's end: the status once everything queued is sent
                sender.finish()
                return
            except Exception as exc:  # its error status too goes after what was queued (as grpc's path sends it)
                sender.drain()
                _gs._take_response_from_response_iterator(rpc_event, state, _raising(exc))
                return
            data = _gs._serialize_response(rpc_event, state, response, response_serializer)
            if data is None or not sender.send(data):  # serializing failed (the call aborted), or the call ended
                getattr(responses, "close", lambda: None)()  # (a generator: its finally blocks run now)
                return
    except Exception:  # as grpc's own path: nothing a handler raises may kill the pool's thread
        log.exception("a windowed response stream failed")
    finally:
        _cygrpc.uninstall_context()


def _raising(exc: Exception):
    """An iterator that raises ``exc``: grpc's own response-iterator helper then ends the call as it would have."""
    raise exc
    yield  # (a generator)


class _Sender:
    """One call's queued messages; every field is guarded by the call's ``state.condition``."""

    __slots__ = ("_rpc_event", "_state", "_queue", "_queued_bytes", "_sending")

    def __init__(self, rpc_event, state):
        self._rpc_event = rpc_event
        self._state = state
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0  # of the messages in _queue
        self._sending = False

    def send(self, data: bytes) -> bool:
        """Queue ``data`` after the messages before it; False once the call is over (nothing more to send)."""
        state = self._state
        with state.condition:
            while self._full() and _gs._is_rpc_state_active(state):
                state.condition.wait()
            if not _gs._is_rpc_state_active(state):
                return False
            if self._sending:
                self._queue.append(data)
                self._queued_bytes += len(data)
            else:
                self._send_locked(data)
            return True

    def drain(self) -> None:
        """Wait until every queued message is sent (or the call ended)."""
        state = self._state
        with state.condition:
            while (self._sending or self._queue) and _gs._is_rpc_state_active(state):
                state.condition.wait()

    def finish(self) -> None:
        """The OK status, after every queued message is sent (or nothing, if the call ended meanwhile)."""
        state = self._state
        with state.condition:  # (re-entrant: drain and _status take it too)
            self.drain()
            if _gs._is_rpc_state_active(state):
                _gs._status(self._rpc_event, state, None)

    def _full(self) -> bool:
        return len(self._queue) >= WINDOW or self._queued_bytes >= WINDOW_BYTES

    def _send_locked(self, data: bytes) -> None:
        start_send(self._rpc_event.call, self._state, data, self._after_send)
        self._sending = True

    def _after_send(self, token: str):
        """gRPC's poller, a send done: start the next one, and wake the producer when it may queue again."""
        state = self._state
        with state.condition:
            self._sending = False
            outcome = _gs._possibly_finish_call(state, token)
            if self._queue and _gs._is_rpc_state_active(state):
                data = self._queue.popleft()
                self._queued_bytes -= len(data)
                self._send_locked(data)
            if (len(self._queue) <= WINDOW // 2 and self._queued_bytes <= WINDOW_BYTES // 2
                    or not _gs._is_rpc_state_active(state)):
                state.condition.notify_all()  # (a producer waits for room, or finish for the last send)
            return outcome


def attach(handlers, pool, methods: tuple[tuple[str, str], ...]) -> int:
    """Give each of ``methods`` ((service, method) of a server-streaming method among ``handlers``) the windowed
    sender; returns how many took it (0 where this grpcio lacks the internals followed, said once in the log)."""
    if not AVAILABLE:
        log.warning("response streams take grpc's standard path: this grpcio lacks the internals windowed_sends.py "
                    "follows")
        return 0
    attached = 0
    for service in handlers:
        for service_name, method in methods:
            if getattr(service, "service_name", None) != service_name:
                continue
            handler = service.methods.get(method)
            if handler is not None and handler.unary_stream is not None:
                handler.unary_stream.experimental_thread_pool = WindowedSends(pool)
                attached += 1
    return attached
