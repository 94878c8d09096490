"""DecideStream on the threaded front end, driven by gRPC's poller and the decision finisher instead of two threads.

grpc's synchronous server gives a bidirectional stream a thread that sends
each answer and sleeps until gRPC has sent it, and the kernel's handler
(``pipelines/stream.py``) a second thread that reads each request the same
way: start a receive, sleep, be woken by the poller. One stream with many
decisions in flight paid ~9 thread switches a decision and ran at 0.55x
ModelInfer's calls/s, below unary Decide (bench/RESULTS.md, "DecideStream
with many decisions in flight on one stream"). Pumped: 0.70-0.77x for that
stream, and 16 streams 0.87-0.93x where unary Decide is at 0.65x
(bench/RESULTS.md, "DecideStream driven by the poller and the finisher").

Here the stream has no thread of its own:

- receives are started from gRPC's poller thread, each from the previous
  one's completion, while the stream has room (``stream_window.has_room``):
  fewer than ``MAX_IN_FLIGHT`` requests taken and not yet answered *and
  sent*, and fewer than ``MAX_HELD_BYTES`` of requests not yet answered. An
  answer waiting for its send counts too, so a client that writes and never
  reads stops being read once that many are held (gRPC's flow control then
  pushes back on it), and each
  completed send resumes a paused stream. Counting answers as done when
  they were queued to send let such a client make the kernel take 61,115
  requests in 12 s and hold their answers (+1 GB with 100 KB request ids);
- what arrived is prepared and queued by one task on the handler pool at a
  time, which takes the stream's whole backlog each round;
- the finisher answers each decision with its group (``DecisionEngine.
  answer_later``, as for unary calls answered later), and the answers go out
  one send at a time (gRPC allows one in flight per call), each next one
  started from the previous one's completion; the OK status follows the last
  answer once the client has half-closed.

A call that ends early (client cancel, deadline) takes back what is still
queued. It follows grpc's own stream path step for step with the private
helpers ``eager_receive.py`` already relies on; they are checked at import,
and where anything differs the stream takes grpc's standard path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent import futures

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import NOT_DECIDED, ResourceExhausted
from ..os_faults import environment_fault
from ..pipelines.flow import ANONYMOUS
from ..pipelines.stream import STREAM_RPC, counted, error_decision, prepare_streamed
from ..pipelines.stream_drains import DRAINED
from ..scheduling.stream_window import has_room
from .eager_receive import AVAILABLE as _EAGER_AVAILABLE
from .eager_receive import _Finished
from .payload_budget import StreamCharges
from .rpc import _deadline_ns

log = logging.getLogger("aios.api")

try:
    import grpc._server as _gs
    from grpc._cython import cygrpc as _cygrpc

    # What this module uses beyond what eager_receive.py already checks for.
    _NEEDED = ("_stream_response_in_pool", "_get_initial_metadata_operation", "_get_send_message_op_flags_from_state",
               "_reset_per_message_state", "_SEND_MESSAGE_TOKEN", "_SEND_INITIAL_METADATA_AND_SEND_MESSAGE_TOKEN")
    AVAILABLE = _EAGER_AVAILABLE and all(hasattr(_gs, name) for name in _NEEDED)
except ImportError:  # pragma: no cover - grpc without its private modules
    AVAILABLE = False

STREAM_SERVICE, STREAM_METHOD = "aios.kernel.v1.DecisionService", "DecideStream"


class TakeOverPool(futures.ThreadPoolExecutor):
    """A "thread pool" grpc picks for one streaming method, which takes grpc's response path over for its calls
    (``StreamPump`` here, ``windowed_sends.WindowedSends``). A ``ThreadPoolExecutor`` only because grpc checks for
    one: it owns no threads, ``pool`` (the server's) runs what it runs."""

    method = "a stream"  # how the one warning names the method

    def __init__(self, pool):  # (no super().__init__: nothing of ThreadPoolExecutor is used)
        self._pool = pool
        self._warned = False

    def follows(self, args, kwargs) -> bool:
        """Whether grpc handed ``submit`` the call shape followed here: (context.run, _stream_response_in_pool,
        rpc_event, state, behaviour, request thunk or iterator, request_deserializer, response_serializer). When
        not, the call takes grpc's standard path on the pool (said once)."""
        if not kwargs and len(args) == 8 and args[1] is _gs._stream_response_in_pool:
            return True
        if not self._warned:
            self._warned = True
            log.warning("%s takes grpc's standard path: grpc handed over an unexpected call shape", self.method)
        return False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # owns no threads


def start_send(call, state, data: bytes, on_sent) -> None:
    """Start sending ``data`` on a server call, its state's condition held: with the initial metadata if none went
    out yet, as grpc's ``_send_response`` does, but without waiting; ``on_sent(token)`` runs on gRPC's poller once
    it is sent (and returns what grpc's batch callbacks return). One send in flight per call: gRPC's rule."""
    flags = _gs._get_send_message_op_flags_from_state(state)
    if state.initial_metadata_allowed:
        operations = (_gs._get_initial_metadata_operation(state, None), _cygrpc.SendMessageOperation(data, flags))
        state.initial_metadata_allowed = False
        token = _gs._SEND_INITIAL_METADATA_AND_SEND_MESSAGE_TOKEN
    else:
        operations = (_cygrpc.SendMessageOperation(data, flags),)
        token = _gs._SEND_MESSAGE_TOKEN
    call.start_server_batch(operations, lambda _event: on_sent(token))
    state.due.add(token)
    _gs._reset_per_message_state(state)


class StreamPump(TakeOverPool):
    """The "thread pool" grpc picks for DecideStream: it starts the stream's state machine and returns the
    future grpc counts the call by."""

    method = "DecideStream"

    def __init__(self, engine, pool, budget=None, refusals=None, payload=None):
        super().__init__(pool)  # the server's HandlerPool: runs each stream's prepare task
        self._engine = engine
        self.payload = payload  # the kernel's PayloadBudget: large requests queued hold it (payload_budget.py)
        self._budget = budget  # the server's CallBudget: a stream may not take the threads kept for priority 1
        self._refusals = refusals  # where a stream refused counts (observability.refusals)
        self.streams = 0  # streams that took this path (changed on gRPC's poller thread only)
        # Over all streams, on gRPC's poller thread only (its batch callbacks): requests received, and answers
        # gRPC has sent. Their difference is what the streams hold (each within stream_window.has_room).
        self.taken = 0
        self.sent = 0
        self._ended = 0  # of them, those over (changed from any thread: under the lock)
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        """Streams in progress (read without the lock: the call budget's estimate)."""
        return self.streams - self._ended

    def _stream_over(self, _finished) -> None:
        with self._lock:
            self._ended += 1

    def submit(self, *args, **kwargs):
        # (grpc calls it with the call's condition held)
        if not self.follows(args, kwargs):
            return self._pool.submit(*args, **kwargs)
        _run, _respond, rpc_event, state, _behaviour, _iterator, deserializer, serializer = args
        self.streams += 1
        if self._budget is not None:
            try:
                self._budget.admit_stream()  # (this stream counted: it asks as one of the calls in progress)
            except ResourceExhausted as exc:
                return self._refuse(rpc_event, state, exc)
        stream = _Stream(self, self._engine, self._pool, rpc_event, state, deserializer, serializer)
        stream.finished.add_done_callback(self._stream_over)
        # Ended with the engine's other DecideStreams when the kernel stops (kernel/pipelines/stream_drains.py).
        drains = self._engine.stream_drains
        token = drains.open(stream.drain)
        stream.finished.add_done_callback(lambda _finished: drains.close(token))
        if self._budget is not None:
            stream.finished.add_done_callback(lambda _finished: self._budget.stream_ended())
        stream.start()
        if token is None:  # (opened as the drain began: ends at once)
            stream.drain()
        return stream.finished

    def refused(self, code: str) -> None:
        """A stream ended with ``code`` here, not by its handler: counted as the handler's statuses are."""
        if self._refusals is not None:
            self._refusals.count(STREAM_RPC, code)

    def _refuse(self, rpc_event, state, exc: ResourceExhausted) -> _Finished:
        """End a stream the call budget refused, with its status and retry hint (grpc calls submit with the
        call's condition held, as ``_abort`` wants); the future grpc counts it by is done at once."""
        state.trailing_metadata = exc.trailers
        self.refused("RESOURCE_EXHAUSTED")
        _gs._abort(state, rpc_event.call, _cygrpc.StatusCode.resource_exhausted, exc.message.encode())
        finished = _Finished()
        self._stream_over(finished)
        finished.set_done()
        return finished

class _Answer:
    """A decision's ``later`` (what ``DecisionEngine.answer_later`` answers through): back onto its stream."""

    __slots__ = ("_stream", "_request", "_nbytes", "item", "_pending", "_charged")

    def __init__(self, stream: _Stream, request, nbytes: int, item, pending, charged: int = 0):
        self._stream = stream
        self._request = request
        self._nbytes = nbytes
        self._charged = charged  # what it holds of the payload budget, given back with its answer
        self.item = item  # its model work: no longer to take back once answered
        self._pending = pending  # (its deadline checked again if the answer has to wait for its turn to go out)

    def send(self, decision) -> None:
        self._stream._charges.give_back(self._charged)
        self._stream.answer(decision, self._nbytes, self.item, self._pending)

    def fail(self, error) -> None:
        self._stream._charges.give_back(self._charged)
        self._stream.answer(error_decision(self._request, error), self._nbytes, self.item)


class _Stream:
    """One DecideStream call. Every field is guarded by the call's ``state.condition``."""

    def __init__(self, pump, engine, pool, rpc_event, state, deserializer, serializer):
        self._pump = pump
        self._engine = engine
        self._pool = pool
        self._rpc_event = rpc_event
        self._call = rpc_event.call
        self._state = state
        self._deserializer = deserializer
        self._serializer = serializer
        self.finished = _Finished()
        self._deadline_ns = _deadline_ns(rpc_event.call_details.deadline - time.time())
        self._backlog: list[bytes] = []  # received, not yet prepared
        self._working = False  # a prepare task is on the pool
        self._sends: deque[bytes] = deque()  # answers waiting for the send in flight
        self._sending = False
        self._receiving = False
        self._reading = True  # until the client half-closes
        self._taken = 0  # requests received (each is answered exactly once)
        self._answered = 0
        self._done_sending = 0  # answers gRPC has sent: ``_taken - _done_sending`` are held (has_room)
        self._held_bytes = 0  # of the requests taken and not yet answered (their answers are small)
        self._queued: dict[int, object] = {}  # id(item) -> item: model work to take back if the call ends
        self._done = False  # the status is out or the call ended: ``finished`` is set
        self._draining = False  # the kernel is stopping: read nothing more, answer what was taken, end
        self._charges = StreamCharges(pump.payload, "DecideStream request")  # its large requests queued, kernel-wide

    # -- receiving (gRPC's poller thread) ---------------------------------------------------
    def start(self) -> None:
        state = self._state
        with state.condition:
            if state.callbacks is None:  # the call is over already: nothing to pump, and count it as ended
                self._done = True
                self.finished.set_done()
                return
            state.callbacks.append(self._call_ended)  # run by grpc when the call is over, however it ended
            self._receive_locked()

    def _receive_locked(self) -> None:
        if (self._receiving or not self._reading or self._draining
                or not has_room(self._taken - self._done_sending, self._held_bytes)
                or not _gs._is_rpc_state_active(self._state)):
            return  # (a completed send or an answer resumes a stream paused for room)
        self._call.start_server_batch((_cygrpc.ReceiveMessageOperation(_gs._EMPTY_FLAGS),), self._on_message)
        self._state.due.add(_gs._RECEIVE_MESSAGE_TOKEN)
        self._receiving = True

    def _on_message(self, event):
        data = event.batch_operations[0].message()
        state = self._state
        start_task = False
        with state.condition:
            self._receiving = False
            outcome = _gs._possibly_finish_call(state, _gs._RECEIVE_MESSAGE_TOKEN)
            if data is None:  # the client half-closed (or the call ended)
                self._reading = False
                if state.client is _gs._OPEN:
                    state.client = _gs._CLOSED
                self._end_if_answered_locked()
                return outcome
            if self._draining:  # read as the drain began: not taken, so not decided (the status says so)
                self._end_if_answered_locked()
                return outcome
            self._taken += 1
            self._pump.taken += 1
            self._held_bytes += len(data)
            self._backlog.append(data)
            if not self._working:
                self._working = start_task = True
            self._receive_locked()
        if start_task:
            try:
                self._pool.submit(self._prepare_backlog)
            except RuntimeError:  # the pool is shut down: the server is stopping
                with state.condition:
                    self._working = False
                    state.trailing_metadata = NOT_DECIDED  # (what it answered was decided; the rest was not)
                    self._pump.refused("UNAVAILABLE")
                    _gs._abort(state, self._call, _cygrpc.StatusCode.unavailable, b"the kernel is shutting down")
        return outcome

    # -- preparing (a handler-pool thread) ---------------------------------------------------
    def _prepare_backlog(self) -> None:
        state = self._state
        while True:
            with state.condition:
                taken, self._backlog = self._backlog, []
                if not taken:
                    self._working = False
                    return
            for data in taken:
                try:
                    self._take(data)
                except Exception as exc:  # never leave a request unanswered, nor the task stuck
                    fault = environment_fault(exc, "DecisionService.DecideStream")  # (UNAVAILABLE: os_faults.py)
                    if fault is None:
                        log.exception("queueing a streamed decision failed")
                    self.answer(error_decision(None, fault), len(data), None)

    def _take(self, data: bytes) -> None:
        # (a safe parser: never raises; a Received, its message an Unparsable stand-in for bad bytes)
        request = _gs._common.deserialize(data, self._deserializer).message
        nbytes = len(data)
        pending = prepare_streamed(self._engine, request, self._deadline_ns, ANONYMOUS)
        if isinstance(pending, kpb.Decision):  # a replay or an error: answered as it is
            self.answer(pending, nbytes, None)
            return
        item = pending.item
        try:
            charged = self._charges.take(nbytes)  # (held until answered; the stream's end gives back the rest)
        except ResourceExhausted as exc:  # the payload budget is full: this request is answered so, the stream goes on
            self._engine.release(pending)
            self.answer(error_decision(request, exc), nbytes, None)
            return
        with self._state.condition:
            if not _gs._is_rpc_state_active(self._state):  # the call ended: nothing to queue for
                self._answered += 1
                self._engine.release(pending)
                self._charges.give_back(charged)
                return
            self._queued[id(item)] = item
        try:
            self._engine.answer_later(pending, _Answer(self, request, nbytes, item, pending, charged), inline=False)
        except Exception as exc:  # refused at admission: RESOURCE_EXHAUSTED with its retry hint
            self._engine.release(pending)
            self._charges.give_back(charged)
            self.answer(error_decision(request, exc), nbytes, item)

    # -- answering (the finisher, or the prepare task) ----------------------------------------
    def answer(self, decision, nbytes: int, item, pending=None) -> None:
        """Send ``decision`` (for a request of ``nbytes``; ``item``: its model work, no longer to take back)
        after those before it. ``pending``: the decision's, when it ran (its deadline is checked again if it
        waits for the send before it)."""
        try:
            data = self._serializer(decision)
        except Exception:  # the kernel's bug; the request still gets an answer, and the stream its end
            log.exception("serializing a streamed decision failed")
            decision = error_decision(None, None)
            data = self._serializer(decision)
        counted(self._engine, decision)
        state = self._state
        with state.condition:
            if item is not None:
                self._queued.pop(id(item), None)
            self._answered += 1
            self._held_bytes -= nbytes
            if not _gs._is_rpc_state_active(state):
                return  # the call ended: nobody to tell
            if self._sending:  # (bounded by has_room's count: receiving waits for sends, not answers)
                self._sends.append(data if pending is None else (data, decision, pending))
            else:
                self._send_locked(data)
            self._receive_locked()  # fewer bytes held: a stream paused for them reads on

    def _send_locked(self, data: bytes) -> None:
        start_send(self._call, self._state, data, self._after_send)
        self._sending = True

    def _after_send(self, token: str):
        state = self._state
        with state.condition:
            self._sending = False
            self._done_sending += 1
            self._pump.sent += 1
            outcome = _gs._possibly_finish_call(state, token)
            if self._sends and _gs._is_rpc_state_active(state):
                self._send_locked(self._in_time(self._sends.popleft()))
            else:
                self._end_if_answered_locked()
            self._receive_locked()  # one held answer less: a stream paused for room reads on
            return outcome

    def _in_time(self, queued) -> bytes:
        """A queued answer's bytes as they may go out now: one whose deadline passed while it waited for the
        sends before it (a client reading slowly, a busy poller) is answered as one recorded late is."""
        if type(queued) is bytes:
            return queued
        data, decision, pending = queued
        result = self._engine.in_time(pending, decision)
        if result is decision:
            return data
        # (counted here, as it goes out: ``answer`` counted it when it was made, an OK answer then)
        return self._serializer(counted(self._engine, error_decision(pending.request, result)))

    # -- the end --------------------------------------------------------------------------------
    def drain(self) -> None:
        with self._state.condition:
            if not self._done:
                self._draining = True
                self._end_if_answered_locked()

    def _end_if_answered_locked(self) -> None:
        """The OK status, once the client has half-closed and every request is answered and sent; draining,
        UNAVAILABLE once every request taken is answered and sent (a receive still pending ends with the call)."""
        if (self._done or self._sending or self._sends or self._answered < self._taken
                or not _gs._is_rpc_state_active(self._state)):
            return
        if self._draining:
            self._done = True
            self._state.trailing_metadata = NOT_DECIDED  # (every request it took is answered; the rest was not read)
            self._pump.refused("UNAVAILABLE")
            _gs._abort(self._state, self._call, _cygrpc.StatusCode.unavailable, DRAINED.encode())
            self.finished.set_done()
            return
        if self._reading or self._receiving:
            return
        self._done = True
        _gs._status(self._rpc_event, self._state, None)
        self.finished.set_done()

    def _call_ended(self) -> None:
        """grpc's end-of-call callback: take back what is still queued; count the call as over."""
        state = self._state
        with state.condition:
            queued, self._queued = list(self._queued.values()), {}
            first, self._done = not self._done, True
        for item in queued:
            self._engine.inference.cancel(item)  # (each then leaves the lane unrun and is answered to nobody)
        self._charges.close()  # (what its requests still held of the payload budget, however the call ended)
        if first:
            self.finished.set_done()


def attach(handlers, engine, pool, budget=None, refusals=None, payload=None) -> StreamPump | None:
    """Route DecideStream (found among ``handlers``, ``registration.ServiceHandlers``) through a
    ``StreamPump``; None (and the log says so) where this grpcio lacks the internals it follows."""
    if not AVAILABLE:
        log.warning("DecideStream takes grpc's standard path: this grpcio lacks the internals stream_pump.py follows")
        return None
    for service in handlers:
        if getattr(service, "service_name", None) != STREAM_SERVICE:
            continue
        handler = service.methods.get(STREAM_METHOD)
        if handler is None:
            return None
        pump = StreamPump(engine, pool, budget, refusals, payload)
        handler.stream_stream.experimental_thread_pool = pump
        return pump
    return None
