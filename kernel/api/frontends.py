"""The two gRPC front ends over one ``InferenceService``: threaded sync and grpc.aio.

Which one serves is chosen by measurement (bench/RESULTS.md); both stay so
the choice can be re-measured. Everything here only adapts calling
conventions and maps ``KernelError`` to gRPC status codes.

``status_of`` and ``details_of`` are how a ``KernelError`` becomes a status,
here and for the kernel's own services (``rpc.py``): the details are its
message, bounded and escaped (kernel/errors.py ``clamp``; the error bounded
it when it was made, so the check here costs a length and two flags).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque

import grpc

from .._proto.inference import grpc_service_pb2 as pb
from ..errors import Internal, KernelError, clamp
from ..ids import random_hex
from ..origin import requested_by
from ..os_faults import answerable, environment_fault
from .inference import NOT_OFFERED, InferenceService, not_offered
from ..scheduling.stream_window import AsyncStreamHold, StreamHold, StreamWindow
from ..scheduling.types import ITEM_EXPIRED, ITEM_QUEUED
from . import answer_later
from .aio_wait import attach, wait_finished
from .call_budget import CallBudget
from .payload_budget import CHARGE_ABOVE, StreamCharges, charge_decoded, hold_call
from .registration import Received, Unparsable, ensure_parsed, generic_handler

log = logging.getLogger("aios.api")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

# The event loop runs a lone request's batch itself, with no thread hop, when
# its lane is idle and the batch is predicted to take at most this long: the
# loop stalls that long, as a server that runs its model inline always does.
# Longer batches go to the lane's threads, so that requests arriving
# meanwhile are read and batched.
INLINE_MAX_NS = 200_000
# Threaded front end: a ModelInfer is answered later (its handler thread handed free, the batch's
# thread answering it) only for a model whose lone-request batch is predicted to take at least this
# long. Below it a caller waits about a thread switch for its answer; answered later, tiny-model calls
# at 16 in flight served 0.93x and p99 rose 10 -> 15 ms, while on a 1.2 ms model at 64 in flight
# answering later served 1.23x (bench/RESULTS.md, "Answers sent by the batch's thread").
ANSWER_LATER_MIN_NS = 200_000

# RPC name -> InferenceService method, for the plain request/response calls.
UNARY = {
    "ServerLive": "server_live",
    "ServerReady": "server_ready",
    "ServerMetadata": "server_metadata",
    "ModelReady": "model_ready",
    "ModelMetadata": "model_metadata",
    "ModelConfig": "model_config",
    "ModelStatistics": "model_statistics",
    "RepositoryIndex": "repository_index",
    "RepositoryModelLoad": "repository_model_load",
    "RepositoryModelUnload": "repository_model_unload",
}
# (And the RPCs in NOT_OFFERED: UNIMPLEMENTED saying what to do instead, on both front ends.)


def status_of(exc: KernelError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.code]


def details_of(exc: KernelError) -> str:
    """The status details for ``exc``: its message, at most MAX_DETAILS_BYTES and escaped (they travel in a
    header: a longer one reached the client as RESOURCE_EXHAUSTED instead of the error)."""
    return clamp(exc.message)


def internal_message(rpc: str) -> str:
    """Log the active exception with a fresh request id; the caller gets the id, not the trace."""
    request_id = random_hex()
    log.exception("internal error in %s (request id %s)", rpc, request_id)
    return f"internal error (request id {request_id}); the kernel keeps serving"


# Triton marks each ModelStreamInfer answer with whether it is the request's last; a non-decoupled model's one
# answer always is. Clients that ask for ``triton_enable_empty_final_response`` wait for this flag.
FINAL_RESPONSE = "triton_final_response"


def stream_error(request, exc: BaseException, refusals=None) -> pb.ModelStreamInferResponse:
    """A failed request inside ModelStreamInfer: the stream stays open, the error names the request (and is
    counted in ``refusals``, as a call's status would be)."""
    exc = answerable(exc, "ModelStreamInfer")  # the environment running out: UNAVAILABLE (kernel/os_faults.py)
    if refusals is not None:
        refusals.count(STREAM_RPC, exc.code if isinstance(exc, KernelError) else "INTERNAL")
    if isinstance(exc, KernelError):
        message = f"{exc.code}: {details_of(exc)}"
    else:
        message = internal_message("ModelStreamInfer")
    response = pb.ModelStreamInferResponse(error_message=message)
    response.infer_response.id = request.id
    response.infer_response.model_name = request.model_name
    response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
    return response


def stream_response(service: InferenceService, request, result) -> pb.ModelStreamInferResponse:
    """One ModelStreamInfer answer: the finished item's outputs, or its error. Checked against its deadline
    as it goes out, as a unary answer is (``InferenceService.answer``): in request order, a short request's
    answer may wait for a long one ahead of it past its own deadline."""
    if isinstance(result, BaseException):
        return stream_error(request, result, service.refusals)
    try:
        answer = service.answer(request, result)
    except Exception as exc:
        return stream_error(request, exc, service.refusals)
    answer.parameters[FINAL_RESPONSE].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=answer)


class InOrder:
    """A stream's answers released in the order of its requests.

    Triton answers a (non-decoupled) model's ModelStreamInfer in request
    order, and tritonclient's stream callback gets no request id with an
    error, so an answer out of order could not be matched to its request.
    Requests still run as they arrive and share batches; only the sending
    waits for the ones before.
    """

    __slots__ = ("_held", "_next")

    def __init__(self):
        self._held: dict[int, tuple] = {}
        self._next = 0

    def add(self, seq: int, request, result) -> list[tuple]:
        """The answer of request ``seq``; every (request, result) now due, in order."""
        self._held[seq] = (request, result)
        due = []
        while self._next in self._held:
            due.append(self._held.pop(self._next))
            self._next += 1
        return due


def _at_call_end(context):
    """``hold_call``'s ``on_end`` on grpc.aio: the charge is given back once the call has ended, its answer sent
    (the call's task done, however it ended: answered, failed, cancelled, the server stopped), as the threaded
    front end's ``add_callback`` does; given back as the handler returned, an answer as large as its request was
    serialized and sent uncounted."""
    def on_end(release) -> bool:
        context.add_done_callback(lambda _context: release())
        return True
    return on_end


# --------------------------------------------------------------------------- sync
def _sync_call(rpc: str, call, context, refusals):
    """Run ``call()``; a KernelError becomes its status, anything else INTERNAL with a request id (either counted
    in ``refusals``)."""
    try:
        return call()
    except Exception as exc:
        exc = answerable(exc, rpc)  # the environment running out: UNAVAILABLE (kernel/os_faults.py)
        counted(refusals, rpc, exc)
        _sync_abort(rpc, exc, context)


def _sync_abort(rpc: str, exc: BaseException, context):
    if isinstance(exc, KernelError):
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        context.abort(status_of(exc), details_of(exc))
    context.abort(grpc.StatusCode.INTERNAL, internal_message(rpc))


def _checked(method):
    def call(request):
        ensure_parsed(request)
        return method(request)

    return call


# The method label of aios_calls_failed_total for this service's calls (kernel/observability/refusals.py).
SERVICE_LABEL = "GRPCInferenceService"
STREAM_RPC = f"{SERVICE_LABEL}.ModelStreamInfer"


def counted(refusals, rpc: str, exc: BaseException) -> None:
    """``exc``, about to be ``rpc``'s status, counted by its code (INTERNAL for anything not a KernelError)."""
    refusals.count(f"{SERVICE_LABEL}.{rpc}", exc.code if isinstance(exc, KernelError) else "INTERNAL")


# The calls that change what is served: the audit record of the change names who asked (kernel/origin.py).
_REQUESTED = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


def _requested(rpc: str, method):
    """``method`` as ``called(request, context)``, naming its caller to the change's audit record if it makes one."""
    if rpc not in _REQUESTED:
        return lambda request, context: method(request)

    def called(request, context):
        with requested_by(f"{rpc} from {context.peer()}"):
            return method(request)
    return called


def _sync_unary(rpc: str, method, refusals):
    called = _requested(rpc, _checked(method))

    def handler(request, context):
        return _sync_call(rpc, lambda: called(request, context), context, refusals)

    handler.__name__ = rpc
    return handler


def count_decoded(hold, sizes: deque, item, nbytes: int, charges=None, charged: deque | None = None) -> None:
    """Count a stream's request, just prepared and not yet queued, by what its decoded inputs hold when that is
    more than its ``nbytes`` on the wire (``sizes[-1]``: its answer, sent only once it is queued, gives it back),
    and so its charge against the payload budget (``charged[-1]``, of the stream's ``charges``), if it has one.
    A stream of 5-byte BYTES elements held 64 MiB of requests counted and 1.7 GB of memory."""
    extra = item.decoded_bytes - nbytes  # (0 on the raw fast path: views of its bytes)
    if extra > 0:
        if charges is not None:  # (first: a refusal leaves the stream's own counts as they were)
            charged[-1] = charges.grow(charged[-1], nbytes, extra)
        hold.grow(extra)
        sizes[-1] += extra


class _SyncStream:
    """ModelStreamInfer on the threaded server: a reader thread submits, this thread writes.

    Requests are pipelined: the reader never waits for a response, so many
    requests of one stream share batches. Responses go back in request order
    (``InOrder``), each carrying its request id, as Triton's do.
    """

    _END = object()

    def __init__(self, service: InferenceService, requests, context):
        self.service = service
        self.requests = requests
        self.context = context
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.window = StreamWindow(service)
        self.hold = StreamHold()  # unanswered requests and their bytes, bounded: the reader waits for room
        self.sizes: deque[int] = deque()  # the bytes of each request not yet answered, in request order
        self.charges = StreamCharges(service.payload, "ModelStreamInfer request")  # large ones, kernel-wide
        self.charged: deque[int] = deque()  # what each of them holds of it, as ``sizes``

    def _read(self) -> None:
        count = 0
        try:
            for request, nbytes in self.requests:  # (registration.Received)
                if not self.hold.take(nbytes, self.context.is_active):  # full: wait for the client to read
                    return
                seq, count = count, count + 1
                self.sizes.append(nbytes)  # (before its answer can be due: the sender pops them in order)
                self.charged.append(0)
                try:
                    # (refused: its answer says so; one that did not parse is answered at once, not charged)
                    self.charged[-1] = self.charges.take(0 if type(request) is Unparsable else nbytes)
                    item = self.service.prepare(request, self.context.time_remaining())
                    count_decoded(self.hold, self.sizes, item, nbytes, self.charges, self.charged)
                    self.window.submit(item, lambda it, req=request, n=seq: self.out.put((n, req, it)))
                except Exception as exc:  # one bad request must not end the stream
                    self.out.put((seq, request, exc))
        except Exception:  # the client went away mid-stream
            log.debug("ModelStreamInfer reader ended early", exc_info=True)
        finally:
            self.out.put((-1, self._END, count))

    def __iter__(self):
        if not self.context.add_callback(self.window.cancel_all):  # the call ended, however: nothing stays queued
            return
        if not self.context.add_callback(self.charges.close):  # ...and what it held of the payload budget comes back
            self.charges.close()
            return
        threading.Thread(target=self._read, name="aios-stream-reader", daemon=True).start()
        sent, total, order = 0, None, InOrder()
        while total is None or sent < total:
            seq, request, result = self.out.get()
            if request is self._END:
                total = result
                continue
            for request, result in order.add(seq, request, result):
                sent += 1
                yield stream_response(self.service, request, result)
                self.hold.give_back(self.sizes.popleft())  # (after the yield: once gRPC took the answer to send)
                self.charges.give_back(self.charged.popleft())


def sync_servicer(service: InferenceService, budget: CallBudget | None = None) -> grpc.GenericRpcHandler:
    """Handlers for ``grpc.server`` (thread pool): they block on the lane.

    ``budget`` (the server's ``workers``): lower-priority ModelInfer calls are
    refused before they take the threads kept for priority 1 (call_budget.py).
    """
    timer = service.expiry
    refusals = service.refusals
    methods = {rpc: _sync_unary(rpc, getattr(service, name), refusals) for rpc, name in UNARY.items()}
    methods.update((rpc, _sync_unary(rpc, not_offered(rpc), refusals)) for rpc in NOT_OFFERED)

    admit = None if budget is None else budget.admit_item
    payload = service.payload

    def answer_batch(items, done) -> bool:
        """The lane's finisher for calls answered later: answer each from the thread that ran the batch."""
        for item in items:
            item.on_done = None  # answered here, not as an item that left without running
        done(items)  # the lane's bookkeeping first, so no caller sees its answer before its item is finished
        for item in items:
            request, later, watch = item.owner
            if watch is not None:
                timer.forget(watch)
            try:
                later.send(service.answer(request, item))
            except KernelError as exc:
                later.fail(exc)
            except Exception as exc:
                later.fail(environment_fault(exc, "ModelInfer") or Internal(internal_message("ModelInfer")))
        return True

    def answer_unrun(item) -> None:
        """``on_done`` of a call answered later whose item left without running (cancelled, expired,
        unloaded): its error, at once (the lane calls this under its lock; sending a status does not block)."""
        _, later, watch = item.owner
        if watch is not None:
            timer.forget(watch)
        later.fail(item.error)

    def infer_later(request, item, context, later):
        """Queue the call's work (prepared and admitted) and return DEFERRED: the batch's thread answers it
        (answer_later.py). A model whose batches are short is run as a call answered by its handler is (see
        ANSWER_LATER_MIN_NS). On the poller thread (``later.on_poller``: a call that arrived to an idle server) a
        short batch on an idle lane runs right here, anything else goes to the lane's threads: the poller never
        waits."""
        if not later.on_poller and service.predicted_ns(item) < ANSWER_LATER_MIN_NS:
            service.run_blocking(item, lambda it: on_wait(context, it))
            return service.answer(request, item)
        item.finisher = answer_batch
        item.on_done = answer_unrun
        watch = service.watch_deadline(item)
        item.owner = (request, later, watch)  # (before queueing: the batch may run, and answer it, right here)
        if not later.on_poller:
            # Hooked before it is queued: this thread may run its batch right here, and a cancel reaches a running
            # batch too, which stops once none of its requests is wanted (scheduling/stopping.py). (A batch of
            # ANSWER_LATER_MIN_NS or more: one callback, and a lane lock at the call's end, are nothing to it.)
            context.add_callback(lambda: service.cancel(item))
            service.run_or_queue(item, watch)
            return later.defer()
        if service.run_if_idle(item, INLINE_MAX_NS, watch) and item.state == ITEM_EXPIRED:
            if watch is not None:  # expired before it could run: nothing answered it
                timer.forget(watch)
            raise item.error
        on_wait(context, item)  # (state read without the lane's lock: at worst a cancel that finds nothing)
        return later.defer()

    def on_wait(context, item) -> None:
        # Client cancellation reaches the queue, hooked up only for requests that wait while
        # still queued (one run inline, or already in another thread's batch, has nothing to cancel:
        # its batch is not stopped for it).
        if item.state == ITEM_QUEUED and not context.add_callback(lambda: service.cancel(item)):
            service.cancel(item)  # the RPC already ended

    def ModelInfer(request, context, arrived_ns=None):
        later = answer_later.take(f"{SERVICE_LABEL}.ModelInfer")
        # _sync_call written out: this is the one per-request handler worth the lines.
        try:
            held = None
            if type(request) is Received:  # a large request: held against the payload budget until the call ends
                request, held = hold_call(payload, request, "ModelInfer", context.add_callback)
            item = service.prepare(request, context.time_remaining(), arrived_ns)
            if held is not None or item.decoded_bytes > CHARGE_ABOVE:  # ...or one that decoded large
                charge_decoded(payload, held, item.decoded_bytes, "ModelInfer", context.add_callback)
            if admit is not None:
                admit(item)
            if later is not None:
                return infer_later(request, item, context, later)
            service.run_blocking(item, lambda it: on_wait(context, it))
            return service.answer(request, item)
        except Exception as exc:
            exc = answerable(exc, "ModelInfer")
            counted(refusals, "ModelInfer", exc)
            _sync_abort("ModelInfer", exc, context)

    def ModelStreamInfer(request_iterator, context):
        if budget is not None:
            try:
                budget.admit_stream()
            except KernelError as exc:
                counted(refusals, "ModelStreamInfer", exc)
                context.set_trailing_metadata(exc.trailers)
                context.abort(status_of(exc), details_of(exc))
            if not context.add_callback(budget.stream_ended):  # its slot comes back when the call ends, however
                budget.stream_ended()
        try:
            yield from _SyncStream(service, request_iterator, context)
        except Exception as exc:  # (its reader thread not started, say: a status, not gRPC's UNKNOWN)
            exc = answerable(exc, "ModelStreamInfer")
            counted(refusals, "ModelStreamInfer", exc)
            _sync_abort("ModelStreamInfer", exc, context)

    ModelInfer.wants_arrival = True  # Triton's ``timeout`` counts from the call's arrival (registration.py)
    ModelInfer.runs_on_poller = True  # never waits when its LaterAnswer is on_poller (eager_receive.attach)
    methods["ModelInfer"] = ModelInfer
    methods["ModelStreamInfer"] = ModelStreamInfer
    return generic_handler(SERVICE, pb, methods)


# --------------------------------------------------------------------------- aio
async def _aio_abort(rpc: str, exc: BaseException, context, refusals) -> None:
    exc = answerable(exc, rpc)  # the environment running out: UNAVAILABLE (kernel/os_faults.py)
    counted(refusals, rpc, exc)
    if isinstance(exc, KernelError):
        await context.abort(status_of(exc), details_of(exc), trailing_metadata=exc.trailers)
    await context.abort(grpc.StatusCode.INTERNAL, internal_message(rpc))


def _aio_unary(rpc: str, method, refusals):
    called = _requested(rpc, _checked(method))

    async def handler(request, context):
        try:
            return called(request, context)
        except Exception as exc:
            await _aio_abort(rpc, exc, context, refusals)

    handler.__name__ = rpc
    return handler


def aio_servicer(service: InferenceService) -> grpc.GenericRpcHandler:
    """Handlers for ``grpc.aio.server``: the loop never blocks; lane threads run batches."""
    refusals = service.refusals
    methods = {rpc: _aio_unary(rpc, getattr(service, name), refusals) for rpc, name in UNARY.items()}
    methods.update((rpc, _aio_unary(rpc, not_offered(rpc), refusals)) for rpc in NOT_OFFERED)

    payload = service.payload

    async def ModelInfer(request, context, arrived_ns=None):
        try:
            held = None
            if type(request) is Received:  # a large request: held against the payload budget until the call ends
                request, held = hold_call(payload, request, "ModelInfer", _at_call_end(context))
            item = service.prepare(request, context.time_remaining(), arrived_ns)
            if held is not None or item.decoded_bytes > CHARGE_ABOVE:  # ...or one that decoded large
                charge_decoded(payload, held, item.decoded_bytes, "ModelInfer", _at_call_end(context))
            done = attach(item)
            if service.run_if_idle(item, INLINE_MAX_NS):
                return service.answer(request, item)
            await wait_finished(service, item, done)
            return service.answer(request, item)
        except Exception as exc:
            await _aio_abort("ModelInfer", exc, context, refusals)

    async def ModelStreamInfer(request_iterator, context):
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        end = object()

        window = StreamWindow(service)
        hold = AsyncStreamHold()  # unanswered requests and their bytes, bounded: the reader waits for room
        sizes: deque[int] = deque()  # the bytes of each request not yet answered, in request order (InOrder's)
        charges = StreamCharges(service.payload, "ModelStreamInfer request")  # large ones, kernel-wide
        charged: deque[int] = deque()  # what each of them holds of it, as ``sizes``
        context.add_done_callback(lambda _call: charges.close())  # (however the call ends; and in finally below)

        async def read() -> None:
            count = 0
            try:
                async for request, nbytes in request_iterator:  # (registration.Received)
                    await hold.take(nbytes)  # full: wait for the client to read
                    seq, count = count, count + 1
                    sizes.append(nbytes)
                    charged.append(0)
                    try:
                        # (refused: its answer says so; one that did not parse is answered at once, not charged)
                        charged[-1] = charges.take(0 if type(request) is Unparsable else nbytes)
                        item = service.prepare(request, context.time_remaining())
                        count_decoded(hold, sizes, item, nbytes, charges, charged)
                        window.submit(item, lambda it, req=request, n=seq: loop.call_soon_threadsafe(
                            results.put_nowait, (n, req, it)))
                    except Exception as exc:
                        results.put_nowait((seq, request, exc))
            finally:
                results.put_nowait((-1, end, count))

        reader = asyncio.ensure_future(read())
        sent, total, order = 0, None, InOrder()
        try:
            while total is None or sent < total:
                seq, request, result = await results.get()
                if request is end:
                    total = result
                    continue
                for request, result in order.add(seq, request, result):
                    sent += 1
                    yield stream_response(service, request, result)
                    await hold.give_back(sizes.popleft())
                    charges.give_back(charged.popleft())
        finally:  # the call ended, however: nothing of it stays queued
            reader.cancel()
            window.cancel_all()
            charges.close()

    ModelInfer.wants_arrival = True  # Triton's ``timeout`` counts from the call's arrival (registration.py)
    methods["ModelInfer"] = ModelInfer
    methods["ModelStreamInfer"] = ModelStreamInfer
    return generic_handler(SERVICE, pb, methods)
