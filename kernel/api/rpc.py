"""Run the kernel's own service handlers (``aios.kernel.v1``) on either front end.

Handlers are written once, as plain blocking Python, against ``CallContext``:

- unary:          ``handler(request, ctx) -> response``
- server stream:  ``handler(request, ctx) -> Iterator[response]``
- bidi stream:    ``handler(requests: Iterator[request], ctx) -> Iterator[response]``

They raise ``kernel.errors.KernelError`` subclasses for every non-OK answer;
this module turns those into gRPC statuses (with trailers; details bounded and
escaped by ``frontends.details_of``), the environment running out (descriptors,
memory, disk: kernel/os_faults.py) into UNAVAILABLE, and anything else
into INTERNAL with a request id that is also in the log. A request whose
bytes do not parse is refused with INVALID_ARGUMENT before the handler runs.
On a client stream one bad message must not end the call, so there it
reaches the handler as a ``registration.Unparsable`` stand-in, in its place
among the messages, for the handler to answer (DecideStream answers it with
an error and goes on).

On the sync front end the handler runs on gRPC's handler thread. On the
asyncio front end it runs on a worker thread, because these handlers wait
(on the scheduler, the audit writer, SQLite) and must never block the loop;
stream messages cross between the loop and that thread one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from ..errors import KernelError
from ..os_faults import answerable
from ..at_send import AtSend
from ..scheduling.stream_window import StreamHold
from .frontends import details_of, internal_message, status_of
from .payload_budget import hold_call
from .registration import Received, ensure_parsed

log = logging.getLogger("aios.api")

_END = object()


class CallContext:
    """What a handler may know about its call, independent of the front end.

    Built on every call, so it does as little as it can up front: metadata
    and peer are read from the gRPC context when first asked for, and the
    call's end is hooked only once a handler registers ``on_done`` (most unary
    calls never do, or only when they have to wait).
    """

    __slots__ = ("deadline_ns", "arrived_ns", "_source", "_metadata", "_peer", "_done", "_callbacks", "_lock",
                 "_hooked")

    def __init__(self, deadline_ns: int | None, metadata: dict[str, str] | None = None, peer: str = "",
                 arrived_ns: int | None = None, source=None):
        self.deadline_ns = deadline_ns  # absolute time.monotonic_ns(), or None without a gRPC deadline
        self.arrived_ns = arrived_ns  # when the call came in (unary calls; see registration.py), else None
        # source: the gRPC context, when given: metadata, peer and the call's end come from it on demand.
        self._source = source
        self._metadata = metadata
        self._peer = peer
        self._done = False
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._hooked = source is None  # without a source, the front end calls _finish itself

    @property
    def metadata(self) -> dict[str, str]:
        """Invocation metadata, last value per key."""
        if self._metadata is None:
            source = self._source
            self._metadata = {key: value for key, value in ((source.invocation_metadata() if source else None) or ())}
        return self._metadata

    @property
    def peer(self) -> str:
        if not self._peer and self._source is not None:
            try:
                self._peer = self._source.peer()
            except Exception:  # not every context knows its peer
                self._peer = ""
        return self._peer

    def is_active(self) -> bool:
        """False once the client has gone away, the deadline passed or the call ended."""
        if self._done:
            return False
        if not self._hooked:  # nobody asked to hear of the end: ask gRPC directly
            return self._source.is_active()
        return True

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (once, from any thread) when the call ends for any reason."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                hook = not self._hooked
                self._hooked = True
            else:
                hook = None
        if hook is None:
            callback()
        elif hook and not self._source.add_callback(self._finish):
            self._finish()  # the RPC already ended

    def _finish(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("call-done callback failed")


def _deadline_ns(remaining_s: float | None) -> int | None:
    if remaining_s is None:
        return None
    return time.monotonic_ns() + int(max(remaining_s, 0.0) * 1e9)


def _context_from(grpc_context, arrived_ns: int | None = None) -> CallContext:
    metadata = {key: value for key, value in (grpc_context.invocation_metadata() or ())}
    try:
        peer = grpc_context.peer()
    except Exception:  # not every context knows its peer
        peer = ""
    return CallContext(_deadline_ns(grpc_context.time_remaining()), metadata, peer, arrived_ns)


def _lazy_context(grpc_context, arrived_ns: int | None = None) -> CallContext:
    """The sync front end's context: reads the gRPC context only for what a handler asks."""
    return CallContext(_deadline_ns(grpc_context.time_remaining()), arrived_ns=arrived_ns, source=grpc_context)


# --------------------------------------------------------------------------- sync
def _code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, KernelError) else "INTERNAL"


def _sync_fail(rpc: str, exc: BaseException, context, refusals) -> None:
    exc = answerable(exc, rpc)  # the environment running out (descriptors, memory, disk): UNAVAILABLE, not a bug
    if refusals is not None:
        refusals.count(rpc, _code(exc))
    if isinstance(exc, KernelError):
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        context.abort(status_of(exc), details_of(exc))
    context.abort(grpc.StatusCode.INTERNAL, internal_message(rpc))


def _held(request, ctx: CallContext, rpc: str, payload):
    """A large request (``Received``) charged against ``payload`` until its call ends (payload_budget.py);
    anything else as it is."""
    if type(request) is not Received:
        return request
    message, _ = hold_call(payload, request, rpc.rpartition(".")[2], _ends_with(ctx))
    return message


def _ends_with(ctx: CallContext):
    def on_end(release) -> bool:
        ctx.on_done(release)  # (called at once if the call has ended)
        return True
    return on_end


def sync_handler(rpc: str, handler: Callable, client_streaming: bool, server_streaming: bool,
                 refusals=None, payload=None) -> Callable:
    """``handler`` as gRPC's threaded server calls it; each error status it answers is counted in ``refusals``
    (``observability.refusals.CallRefusals``) under ``rpc`` ("Service.Method"); a large request is held against
    ``payload`` (a ``PayloadBudget``, or None: not counted) while its call lasts."""
    def prepare(request_or_iterator, context, arrived_ns=None):
        ctx = _lazy_context(context, arrived_ns)
        if client_streaming:
            return request_or_iterator, ctx  # messages that did not parse come as Unparsable (see above)
        ensure_parsed(request_or_iterator)
        return _held(request_or_iterator, ctx, rpc, payload), ctx

    if server_streaming:
        def call(request_or_iterator, context):
            try:
                request, ctx = prepare(request_or_iterator, context)
                for response in handler(request, ctx):
                    # (gRPC sends it from this thread as the generator yields it: the last moment)
                    yield response.make() if type(response) is AtSend else response
            except Exception as exc:
                _sync_fail(rpc, exc, context, refusals)

        return call

    def call(request_or_iterator, context, arrived_ns=None):
        try:
            request, ctx = prepare(request_or_iterator, context, arrived_ns)
            return handler(request, ctx)
        except Exception as exc:
            _sync_fail(rpc, exc, context, refusals)

    call.wants_arrival = True
    return call


# --------------------------------------------------------------------------- asyncio
async def _aio_fail(rpc: str, exc: BaseException, context, refusals) -> None:
    exc = answerable(exc, rpc)  # (as _sync_fail)
    if refusals is not None:
        refusals.count(rpc, _code(exc))
    if isinstance(exc, KernelError):
        await context.abort(status_of(exc), details_of(exc), trailing_metadata=exc.trailers)
    await context.abort(grpc.StatusCode.INTERNAL, internal_message(rpc))


def _bridge_requests(requests, loop: asyncio.AbstractEventLoop) -> Iterator:
    """A blocking iterator over an async request iterator, for use on a worker thread."""
    iterator = requests.__aiter__()

    async def next_or_end():
        try:
            return await iterator.__anext__()
        except StopAsyncIteration:
            return _END

    while True:
        request = asyncio.run_coroutine_threadsafe(next_or_end(), loop).result()
        if request is _END:
            return
        yield request  # an Unparsable stand-in too: the handler answers it (see above)


AIO_STREAM_WINDOW = 64  # a server stream's answers on their way to the asyncio loop (aio_handler)
# A handler whose answers are large names a smaller window as ``handler.stream_window`` (StreamAuditBatches: 64
# batches of up to ~1 MiB held ~64 MiB per call of a follower that stopped reading).
AIO_STREAM_WINDOW_BYTES = 2 << 20  # and their bytes (the count alone let a follower of a log of 64 MiB
# records hold 64 of them: 4 GiB a call); the threaded front end's windowed_sends.WINDOW_BYTES


def _message_bytes(response) -> int:
    """What ``response`` will take serialized (0 for what is not a message yet: an ``AtSend``, bounded where
    it was made)."""
    try:
        return response.ByteSize()
    except AttributeError:
        return len(response) if type(response) is bytes else 0


def aio_handler(rpc: str, handler: Callable, client_streaming: bool, server_streaming: bool,
                refusals=None, payload=None) -> Callable:
    """``handler`` as grpc.aio calls it (see ``sync_handler``)."""
    def start(request_or_iterator, context, loop, arrived_ns=None):
        ctx = _context_from(context, arrived_ns)
        context.add_done_callback(lambda _call: ctx._finish())
        if client_streaming:
            return _bridge_requests(request_or_iterator, loop), ctx
        ensure_parsed(request_or_iterator)
        return _held(request_or_iterator, ctx, rpc, payload), ctx

    if not server_streaming:
        on_loop = getattr(handler, "on_loop", None)  # a coroutine version that never blocks the loop

        async def call(request_or_iterator, context, arrived_ns=None):
            loop = asyncio.get_running_loop()
            try:
                request, ctx = start(request_or_iterator, context, loop, arrived_ns)
                if on_loop is not None:
                    return await on_loop(request, ctx)
                return await asyncio.to_thread(handler, request, ctx)
            except Exception as exc:
                await _aio_fail(rpc, exc, context, refusals)

        call.wants_arrival = True
        return call

    stream_window = getattr(handler, "stream_window", AIO_STREAM_WINDOW)

    async def call(request_or_iterator, context):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        # Answers handed to the loop and not sent yet: at most stream_window of them and about
        # AIO_STREAM_WINDOW_BYTES, so a client that does not read holds the handler at its next answer (and a
        # DecideStream's reader at its in-flight limit) instead of filling this queue without end. The loop
        # frees a place once gRPC has sent an answer: grpc.aio asks this generator for the next one only then.
        window = StreamHold(stream_window, AIO_STREAM_WINDOW_BYTES)

        def produce(request, ctx) -> None:
            try:
                for response in handler(request, ctx):
                    nbytes = _message_bytes(response)
                    if not window.take(nbytes, ctx.is_active):
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, (response, nbytes))
                    if not ctx.is_active():
                        return
            except BaseException as exc:  # handed to the loop, which answers with a status
                loop.call_soon_threadsafe(queue.put_nowait, (_END, exc))
                return
            loop.call_soon_threadsafe(queue.put_nowait, (_END, None))

        try:
            request, ctx = start(request_or_iterator, context, loop)
        except Exception as exc:
            await _aio_fail(rpc, exc, context, refusals)
            return
        worker = threading.Thread(target=produce, args=(request, ctx), name=f"aio-{rpc}", daemon=True)
        try:
            worker.start()
        except Exception as exc:  # no thread to be had (the limit on threads): its status, not gRPC's UNKNOWN
            ctx._finish()
            await _aio_fail(rpc, exc, context, refusals)
            return
        try:
            while True:
                response, nbytes = await queue.get()
                if response is _END:
                    error = nbytes  # (the end carries the handler's error, or None)
                    if error is not None:
                        await _aio_fail(rpc, error, context, refusals)
                    return
                if type(response) is AtSend:  # its last check, after its wait in this queue (at_send.py)
                    response = response.make()
                yield response
                window.give_back(nbytes)
        finally:
            ctx._finish()

    return call
