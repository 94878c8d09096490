"""DecideStream: many decisions in flight on one stream, each answer tagged with its request id.

A reader thread validates each incoming request and queues its model work
without waiting for it; the lanes batch them with everything else and hand
them to the decision engine's finisher thread, which decides and audits them
in groups together with every other finished decision (unary ones too), so
the per-decision cost falls as load rises. The stream's own thread only sends
the answers (and finishes, as one group, the few that never ran). A bad request gets an answer with
``error_code``/``error_message`` and the stream goes on. Answers come in
completion order, not request order.

This is the path on grpc.aio and wherever the stream pump is off; on the
threaded front end ``kernel/api/stream_pump.py`` runs DecideStream without
the reader and the sending thread, with the same answers (it shares
``prepare_streamed`` and ``error_decision`` with this module, and the bound on what a stream holds,
``scheduling/stream_window.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from functools import partial

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..at_send import AtSend
from ..errors import NOT_DECIDED, Cancelled, InvalidArgument, KernelError, Unavailable
from ..ids import random_hex
from ..os_faults import answerable
from ..scheduling.stream_window import StreamHold, StreamWindow
from ..threads import name_native_thread
from .flow import ANONYMOUS, DecisionEngine, Pending
from .group_finish import RECORDED_TRAILER
from .stream_drains import DRAINED

log = logging.getLogger("aios.decisions")


_END = object()
_DRAINED = object()  # the kernel is stopping (stream_drains.py)


RETRY_AFTER_TRAILER = "retry-after-ms"
NOT_DECIDED_TRAILER = NOT_DECIDED[0][0]

STREAM_RPC = "DecisionService.DecideStream"  # the method label of aios_calls_failed_total (observability.refusals)


def counted(engine: DecisionEngine, answer: kpb.Decision) -> kpb.Decision:
    """``answer``, going out on a DecideStream; one with an error counted by its code, as a call's status is."""
    if answer.error_code:
        refusals = getattr(engine.inference, "refusals", None)
        if refusals is not None:
            refusals.count(STREAM_RPC, answer.error_code)
    return answer


def error_decision(request, exc: BaseException) -> kpb.Decision:
    if not isinstance(request, kpb.DecisionRequest):  # it did not parse: nothing of it to echo
        request = kpb.DecisionRequest()
    exc = answerable(exc, STREAM_RPC)  # the environment running out: UNAVAILABLE (kernel/os_faults.py)
    if isinstance(exc, KernelError):
        code, message = exc.code, exc.message
    else:  # a bug: logged with its traceback under an id the answer gives, as a unary call's INTERNAL is (an audit:
        # a stream's answered INTERNAL with no id and left nothing in the log)
        request_id = random_hex()
        log.error("internal error in %s (request id %s)", STREAM_RPC, request_id, exc_info=exc)
        code, message = "INTERNAL", f"internal error (request id {request_id}); the kernel keeps serving"
    answer = kpb.Decision(request_id=request.request_id, pipeline=request.pipeline, tenant=request.tenant,
                          error_code=code, error_message=message)
    # What a unary call's trailers say (a stream's answers have none): where a decision answered with an
    # error was recorded all the same, when to send it again, and whether nothing was decided.
    for key, value in getattr(exc, "trailers", ()):
        if key == RECORDED_TRAILER:
            answer.audit_sequence = int(value)
        elif key == RETRY_AFTER_TRAILER:
            answer.retry_after_ms = min(int(value), 0xFFFFFFFF)
        elif key == NOT_DECIDED_TRAILER:
            answer.not_decided = True
    return answer


def prepare_streamed(engine: DecisionEngine, request, deadline_ns: int | None, principal: str) -> Pending | kpb.Decision:
    """One streamed message's first step, shared by both stream paths: its ``Pending``, or the Decision
    to answer it with at once (a replay from the idempotency store, or ``error_decision`` for a message
    that did not parse or could not be prepared)."""
    try:
        if not isinstance(request, kpb.DecisionRequest):
            raise _unparsed(request)
        return engine.prepare(request, deadline_ns, principal)
    except Exception as exc:
        return error_decision(request, exc)


def _unparsed(request) -> InvalidArgument:
    # The API layer hands on a message whose bytes did not parse as a stand-in that says why
    # (kernel.api.registration.Unparsable), so that it is answered in turn and the stream goes on.
    refusal = getattr(request, "refusal", "")  # refused from its bytes before parsing (api/wire_limits.py)
    if refusal:
        return InvalidArgument(refusal)
    reason = getattr(request, "reason", type(request).__name__)
    return InvalidArgument(f"the request is not a valid aios.kernel.v1.DecisionRequest message: {reason}")


def _in_time(engine: DecisionEngine, pending: Pending) -> kpb.Decision:
    result = engine.in_time(pending, pending.result)
    return counted(engine, result if isinstance(result, kpb.Decision) else error_decision(pending.request, result))


class _Uncharged:
    """No payload budget (a stream served without one): nothing charged, nothing to give back."""

    @staticmethod
    def take(nbytes: int) -> int:
        return 0

    @staticmethod
    def give_back(charged: int) -> None:
        pass


_UNCHARGED = _Uncharged()


def decide_stream(engine: DecisionEngine, requests: Iterator, ctx, principal: str = ANONYMOUS,
                  charges=None) -> Iterator[kpb.Decision | AtSend]:
    # Each answer-bearing event comes with the bytes of its request, given back to ``hold`` once answered, and what
    # it holds of the kernel's payload budget (``charges``: kernel/api/payload_budget.StreamCharges; the caller
    # closes it when the call ends), given back then too.
    charges = charges or _UNCHARGED
    events: queue.SimpleQueue = queue.SimpleQueue()
    hold = StreamHold()  # unanswered requests and their bytes, bounded: the reader waits for room
    window = StreamWindow(engine.inference)  # what is still queued: deadlines watched, cancelled at the call's end
    lock = threading.Lock()
    taken = [0]  # requests the reader took (each is answered exactly once)
    stopping = [False]  # the drain began: take no more (under ``lock``, as ``taken``)

    def on_drain() -> None:
        with lock:
            stopping[0] = True
        events.put(_DRAINED)

    def read() -> None:
        name_native_thread()  # (so per-thread CPU tells the stream's reader from the handler threads)
        try:
            for request, nbytes in requests:  # (registration.Received)
                if not hold.take(nbytes, ctx.is_active):
                    return
                with lock:
                    if stopping[0]:  # read as the drain began: not taken, so not decided (the status says so)
                        return
                    taken[0] += 1
                pending = prepare_streamed(engine, request, ctx.deadline_ns, principal)
                if isinstance(pending, kpb.Decision):  # a replay or an error: answered as it is
                    events.put((pending, nbytes, 0))
                    continue
                # Decided with every other finished decision (unary ones too) on the finisher thread;
                # on_done (the window's) then only hands the answer to this stream.
                charged = 0
                try:
                    charged = charges.take(nbytes)  # (the payload budget full: RESOURCE_EXHAUSTED with its hint)
                    window.submit(engine.finish_in_groups(pending),
                                  lambda _item, p=pending, n=nbytes, c=charged: events.put((p, n, c)))
                except Exception as exc:  # refused at admission: RESOURCE_EXHAUSTED with its retry hint
                    engine.release(pending)
                    events.put((error_decision(request, exc), nbytes, charged))
        except Exception as exc:  # the request stream itself broke (bad bytes are answered per message above)
            events.put(exc)
        finally:
            events.put(_END)

    ctx.on_done(window.cancel_all)
    drains = engine.stream_drains
    token = drains.open(on_drain)
    if token is None:
        on_drain()
    else:
        ctx.on_done(lambda: drains.close(token))
    reader = threading.Thread(target=read, name="decide-stream-reader", daemon=True)
    reader.start()
    reading = True
    drained = False
    answered = 0
    while reading or answered < taken[0]:
        batch = [events.get()]
        while True:  # take whatever else is ready: one group, one policy pass, one audit wait
            try:
                batch.append(events.get_nowait())
            except queue.Empty:
                break
        group: list[tuple[Pending, int, int]] = []
        for event in batch:
            if event is _END:
                reading = False
            elif event is _DRAINED:
                reading, drained = False, True
            elif isinstance(event, Exception):  # the request stream itself broke
                if isinstance(event, KernelError):
                    raise event
                raise Cancelled("the request stream ended abnormally") from event
            else:
                answer, nbytes, charged = event
                if isinstance(answer, Pending):
                    answer.item.owner = None  # (no reference cycle left for the garbage collector)
                    if answer.result is None:  # it never ran (cancelled, expired) or the finisher was closing
                        group.append(event)
                        continue
                    # Its deadline, checked again as it goes out: by the front end, where it sends it (on grpc.aio
                    # the event loop sends it after a wait of its own).
                    answer = AtSend(partial(_in_time, engine, answer))  # (counted as it is made)
                else:
                    answer = counted(engine, answer)
                hold.give_back(nbytes)
                charges.give_back(charged)
                answered += 1
                yield answer
        if group:
            try:
                results = engine.finish([pending for pending, _, _ in group])
            except Exception as exc:  # one group's failure is answered per request; the stream goes on
                log.exception("finishing %d streamed decisions failed", len(group))
                results = [exc] * len(group)
            for (pending, nbytes, charged), result in zip(group, results):
                hold.give_back(nbytes)
                charges.give_back(charged)
                answered += 1
                yield counted(engine, result if isinstance(result, kpb.Decision) else error_decision(pending.request, result))
    if drained:  # every request taken is answered: the rest were not read (stream_drains.py)
        raise Unavailable(DRAINED)
