"""Unary calls on grpc's threaded server receive their request before they take a handler thread.

grpc's sync server hands a new call to a handler thread at once; that thread
then asks for the request message and sleeps until the poller thread has it
(``grpc._server._unary_request``). Every unary call so costs its handler
thread two wake-ups, and under load calls sit in handler threads waiting for
bytes while other calls, whose bytes are in, wait for the core. Here the
poller asks for the message as the call arrives and hands the call to a
handler thread only once the message is in: one wake-up, and a thread only
for work that can run. Measured (bench/RESULTS.md, "Unary calls receive
their request first"): tiny-model ModelInfer 1.12-1.20x the calls/s at 16 in
flight with ~10 % less server CPU a call, 1.05x at one in flight, and the
large model's batches at 64 in flight steadily full (p99 halved there). The
price: at 16 in flight on the tiny model p99 doubles (5 -> 10 ms; p50 3.2 ->
2.7 ms), since every call in is runnable at once and they meet in the lane.
``eager_receive = false`` restores grpc's own path. Running the handler
itself also lets a handler hand its call on to be answered from another
thread (``answer_later.py``).

A call that arrives while no other call is in progress (``poller_inline``)
is not handed to a handler thread at all: its handler runs on the poller
thread, which has nothing else to do meanwhile. Only handlers marked
``runs_on_poller`` do this, and they must never wait there (ModelInfer runs
a short batch on an idle lane itself and hands anything else to the lane's
threads, answering later). On one core the hand-off is the largest single
cost of a lone tiny-model call (bench/RESULTS.md, "A lone call runs on the
poller").

The hook is the one grpc offers for choosing a thread pool per method
(``experimental_thread_pool`` on a unary behaviour, read by
``grpc._server._select_thread_pool_for_behavior``): ``EagerReceive``
stands in as that pool. The rest follows grpc's own unary path step for step
with its private helpers; they are checked at import, and each call checks
that grpc hands over what this code expects. If anything differs (another
grpcio), calls take grpc's standard path and the log says so once.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

from ..errors import NOT_DECIDED
from ..os_faults import environment_fault
from . import entry_gate
from .answer_later import DEFERRED, LaterAnswer, Outstanding, offer
from .call_budget import default_reserve
from .registration import unary_behaviour

log = logging.getLogger("aios.api")

try:
    import grpc._server as _gs
    from grpc._cython import cygrpc as _cygrpc

    _NEEDED = ("_unary_response_in_pool", "_possibly_finish_call", "_abort", "_is_rpc_state_active", "_common",
               "_call_behavior", "_serialize_response", "_status",
               "_select_thread_pool_for_behavior", "_RECEIVE_MESSAGE_TOKEN", "_OPEN", "_CLOSED", "_EMPTY_FLAGS")
    AVAILABLE = all(hasattr(_gs, name) for name in _NEEDED) and hasattr(_cygrpc, "ReceiveMessageOperation")
except ImportError:  # pragma: no cover - grpc without its private modules
    AVAILABLE = False

_warned = False

# A call runs on the poller only if it reached the poller at least this long after the last call ended.
# A lone caller's next call comes a round trip after its answer (here 120-210 µs, p1-p90, at one in
# flight); under load, when the server is idle for a moment, the next call is already inside grpc and
# comes within ~20-26 µs. Without this the poller takes calls of a steady stream one by one whenever it
# finds the server idle, and they stop batching: tiny model at 16 in flight 0.73x (bench/RESULTS.md,
# "A lone call runs on the poller").
LONE_GAP_NS = 60_000
# ...and only while most recent calls (a moving share, each call weighing IDLE_SHARE_WEIGHT) found the server
# idle too: a lone caller's always do; at 16 in flight on the tiny model 9 % did, and 4.6 % also passed
# the gap test, each then holding the poller while the calls behind it queued.
IDLE_SHARE_WEIGHT = 0.125
LONE_IDLE_SHARE = 0.75

# Calls waiting for their request message count against gRPC's limit (``maximum_concurrent_rpcs`` = workers) from
# their arrival, and nothing else ends one while its connection is up: a client that opens calls and never sends
# their requests held all of ``workers``, and gRPC then refused every other call before any code of ours ran. So:
# - past ``waiting_cap`` (a quarter of workers: idle streams, max_streams, and watches, max_watches, hold slots too)
#   each call in ends those that have waited ``MIN_WAIT_NS`` or more for their request;
# - past ``waiting_bound`` (workers less the priority-1 reserve: above it the call budget refuses ordinary calls
#   anyway) it ends one whatever its age, so gRPC's count stays below its limit and arrivals keep reaching us.
# - past the slots open streams and watches leave (workers less one less those: ``held_open``) it ends one whatever
#   its age too: they hold slots for as long as they stay open, and beside them waiting calls under the bound took the
#   last slot, after which gRPC refused every arrival before one could trim (two idle DecideStreams and two
#   headers-only calls locked a 4-worker kernel for good; 256 of each one of 512).
# Not by the cap alone: a legitimate burst (4,000 ServerLive calls from one channel) had up to 403 calls at once
# waiting for requests already on their way, the oldest 25 ms. Nothing is cut while there is room, however slowly
# a request comes (a 60 MiB one over seconds).
WAITING_SHARE = 0.25
MIN_WAIT_NS = 1_000_000_000
RETRY_AFTER_MS = 20  # as the call budget's hint (call_budget.py)


def waiting_cap(workers: int) -> int:
    return max(1, int(workers * WAITING_SHARE))


def waiting_bound(workers: int) -> int:
    return max(1, workers - default_reserve(workers))


def _fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("unary calls take grpc's standard path (a thread per call before its message): %s", reason)


class _Finished:
    """The future grpc's server waits on for a call's end (its count of calls in progress):
    done once the handler thread is done, or at once for a call that never reached one."""

    __slots__ = ("_done", "_callbacks", "_receiver")

    def __init__(self, receiver: EagerReceive | None = None):
        self._done = False
        self._callbacks = []
        self._receiver = receiver  # told when the call ended (EagerReceive.last_done_ns), if any

    def add_done_callback(self, callback) -> None:
        # grpc adds its callback on the poller thread right after submit, before the message (and so
        # set_done, on the poller or a handler thread) can come: no race between the two.
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def set_done(self, _unused=None) -> None:
        if self._done:  # once only: grpc counts the call's end by it
            return
        self._done = True
        if self._receiver is not None:
            self._receiver.last_done_ns = time.monotonic_ns()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._run(callback)

    def _run(self, callback) -> None:
        try:
            callback(self)
        except Exception:  # grpc's own bookkeeping: log, never break the thread that finished the call
            log.exception("a call's completion callback raised")


class EagerReceive(futures.ThreadPoolExecutor):
    """The "thread pool" grpc picks for our unary methods: receives the request, then runs the call on ``pool``.

    A ``ThreadPoolExecutor`` only because grpc checks for one; it starts no
    threads of its own (``pool``, the server's ``HandlerPool``, runs them).
    """

    def __init__(self, pool, answer_later: bool = True, refusals=None,
                 max_waiting: int | None = None, waiting_bound: int | None = None, gate=None,
                 held_open=None, limit: int = 0):  # (no super().__init__: nothing of ThreadPoolExecutor is used)
        self._pool = pool
        self._gate = gate  # the stop's entry gate (entry_gate.EntryGate): a call the stopped pool refuses counts there
        self._refusals = refusals  # where a call answered later counts an error status (observability.refusals)
        # Each behaviour's method ("Service.Method"): a call ended here, not by its handler, is counted under it.
        self._methods: dict = {}
        self._answer_later = answer_later  # handlers may take their call's LaterAnswer (answer_later.py)
        # Behaviours (handler functions) that run on the poller thread itself when their call arrives with no
        # other call in progress (``poller_inline``): handlers that never wait there (``LaterAnswer.on_poller``).
        # grpc hands each call's behaviour over wrapped (registration._ArrivalStamped: a partial), hence ``func``.
        self._poller_handlers: frozenset = frozenset()
        self.calls = 0  # calls that took this path (tests)
        self.on_poller = 0  # a call running on the poller thread now (0 or 1: the call budget counts it)
        self.ran_on_poller = 0  # calls run there in all (tests)
        self.last_done_ns = 0  # when the last call ended, on any thread (LONE_GAP_NS)
        self.idle_share = 1.0  # moving share of calls that arrived to an idle server (LONE_IDLE_SHARE)
        # Calls in, whose request is not yet: in progress for gRPC's limit, not yet in the pool
        # (the server's CallBudget adds them). Changed only on the poller thread.
        self.waiting = 0
        # The calls counted in ``waiting`` that may still be ended, oldest first: call's _Finished -> (arrival,
        # rpc_event, state, behaviour, its "ended" flag); their connections' peers, asked only when trimming.
        self._waiters: dict = {}
        self._peers: dict = {}
        self.max_waiting = max_waiting  # past it calls waiting MIN_WAIT_NS for their request are ended (None: never)
        self.waiting_bound = max_waiting if waiting_bound is None else waiting_bound  # past it one is, of any age
        self.min_wait_ns = MIN_WAIT_NS
        # Call slots held by open streams and watches (a callable), and gRPC's limit on calls (workers): waiting
        # calls are held to the slots those leave, less one for the next arrival (``_bound_now``).
        self._held_open, self._limit = held_open, limit
        self.ended_waiting = 0  # calls ended for it (tests, observability)
        self.outstanding = Outstanding()  # calls whose handler returned DEFERRED, not yet answered

    def submit(self, *args, **kwargs):
        # grpc calls submit(context.run, _unary_response_in_pool, rpc_event, state, behaviour,
        # receive_request, request_deserializer, response_serializer) for a unary-unary call.
        if kwargs or len(args) != 8 or args[1] is not _gs._unary_response_in_pool:
            _fallback("grpc handed over an unexpected call shape")
            return self._pool.submit(*args, **kwargs)
        run, _respond, rpc_event, state, behaviour, _receive, deserializer, serializer = args
        finished = _Finished(self)
        self.calls += 1

        ended = []  # (a flag: the call was ended while it waited for its request)

        def on_message(event):  # on the poller thread, like grpc's own receive callback
            self.waiting -= 1
            self._forget(finished)
            serialized = event.batch_operations[0].message()
            with state.condition:
                if ended:  # its status is sent (end, below); whatever came, this is its receive's end
                    outcome = _gs._possibly_finish_call(state, _gs._RECEIVE_MESSAGE_TOKEN)
                    finished.set_done()
                    return outcome
                if serialized is None:  # the client closed (or cancelled) without sending its request
                    if state.client is _gs._OPEN:
                        state.client = _gs._CLOSED
                    if state.client is _gs._CLOSED and rpc_event.call_details.deadline <= time.time():
                        # Or its deadline passed while it waited (gRPC's deadline is on the wall clock): gRPC ended
                        # the call DEADLINE_EXCEEDED, and no status of ours goes out (it was counted UNIMPLEMENTED).
                        self._refused(behaviour, "DEADLINE_EXCEEDED")
                    elif state.client is _gs._CLOSED:
                        self._refused(behaviour, "UNIMPLEMENTED")
                        details = f'"{rpc_event.call_details.method}" requires exactly one request message.'
                        _gs._abort(state, rpc_event.call, _cygrpc.StatusCode.unimplemented, details.encode())
                    outcome = _gs._possibly_finish_call(state, _gs._RECEIVE_MESSAGE_TOKEN)
                    finished.set_done()
                    return outcome
                outcome = _gs._possibly_finish_call(state, _gs._RECEIVE_MESSAGE_TOKEN)

            def request():  # on the thread that runs the handler: what grpc's unary_request returns
                with state.condition:
                    if not _gs._is_rpc_state_active(state):  # cancelled meanwhile
                        return None
                parsed = _gs._common.deserialize(serialized, deserializer)
                if parsed is None:
                    self._refused(behaviour, "INTERNAL")
                    with state.condition:
                        _gs._abort(state, rpc_event.call, _cygrpc.StatusCode.internal,
                                   b"Exception deserializing request!")
                return parsed

            if self._poller_handlers and self._lone(behaviour):
                # Nothing else in progress: a hand-off to a handler thread would be the call's largest
                # cost (on one core 30-50 µs of server CPU a tiny ModelInfer, bench/RESULTS.md "A lone call
                # runs on the poller"), and no other call waits for this thread meanwhile.
                self.on_poller = 1
                self.ran_on_poller += 1
                try:
                    run(self._respond, rpc_event, state, behaviour, request, deserializer, serializer, finished, True)
                finally:
                    self.on_poller = 0
                return outcome
            try:
                self._pool.submit(run, self._respond, rpc_event, state, behaviour, request, deserializer, serializer,
                                  finished)
            except RuntimeError as exc:
                # The pool is shut down (the server is stopping, this call passed its gate earlier), or it could not
                # start a thread for it (the limit on threads: os_faults.py). Either way the call was not run.
                fault = environment_fault(exc, "starting a handler thread")
                if fault is not None:
                    self._refused(behaviour, fault.code)
                    trailers, details = (*NOT_DECIDED, *fault.trailers), fault.message
                else:
                    if self._gate is not None:  # refused by the stop, as the gate refuses: counted with its refusals
                        self._gate.counted()
                    else:
                        self._refused(behaviour, "UNAVAILABLE")
                    trailers, details = entry_gate.TRAILERS, entry_gate.REFUSAL
                with state.condition:
                    state.trailing_metadata = trailers
                    _gs._abort(state, rpc_event.call, _cygrpc.StatusCode.unavailable, details.encode())
                finished.set_done()
            return outcome

        # grpc calls submit with the call's state condition held (_handle_with_method_handler).
        rpc_event.call.start_server_batch((_cygrpc.ReceiveMessageOperation(_gs._EMPTY_FLAGS),), on_message)
        state.due.add(_gs._RECEIVE_MESSAGE_TOKEN)
        self.waiting += 1
        if self.max_waiting is not None:
            # (per call only this; the ending, and each waiting call's connection, are worked out when trimming)
            self._waiters[finished] = (time.monotonic_ns(), rpc_event, state, behaviour, ended)
            # (counted by the calls that may still be ended: one already ended is gone once its receive completes)
            if len(self._waiters) > min(self.max_waiting, self._bound_now()):
                self._trim(time.monotonic_ns())
        return finished

    def _forget(self, finished) -> None:
        if self._waiters.pop(finished, None) is not None:
            self._peers.pop(finished, None)

    def _by_connection(self) -> dict:
        """The waiting calls by their connection (peer address -> their _Finished, oldest first); each call's peer
        asked once, when a trim first needs it (gRPC's peer() is a call into the core: not made on every call)."""
        by_peer: dict = {}
        for finished, entry in self._waiters.items():
            peer = self._peers.get(finished)
            if peer is None:
                peer = self._peers[finished] = entry[1].call.peer()
            by_peer.setdefault(peer, []).append(finished)
        return by_peer

    def _trim(self, now: int) -> None:
        """More calls wait for their request than ``max_waiting``: end those that have waited ``min_wait_ns``, and,
        past ``waiting_bound``, one more of any age. The one ended: the oldest on the connection with the most such
        calls (a client that opens a new call for each one ended turned over all its own within ~10 ms, and a 60 MiB
        request on another connection, 0.3 s in transit, was then always the oldest of all: cut 5 times of 5), else
        the oldest of all. (Ties, as when each connection has one: the connection whose oldest came first.)"""
        bound = self._bound_now()
        by_peer = self._by_connection()
        while len(self._waiters) > min(self.max_waiting, bound):
            peer = max(by_peer, key=lambda each: len(by_peer[each]))  # (first of the largest)
            victim = by_peer[peer][0]
            if now - self._waiters[victim][0] < self.min_wait_ns:
                oldest = next(iter(self._waiters))
                if now - self._waiters[oldest][0] >= self.min_wait_ns:
                    victim = oldest
                elif len(self._waiters) <= bound:
                    return
            victim_peer = self._peers[victim]
            held = len(by_peer[victim_peer])
            by_peer[victim_peer].remove(victim)
            if not by_peer[victim_peer]:
                del by_peer[victim_peer]
            self._end(victim, now, held)

    def _bound_now(self) -> int:
        """How many calls may wait for their request whatever their age: ``waiting_bound``, and no more than the
        slots open streams and watches leave less one, so that gRPC takes the next call in (and this code can end a
        waiting one for it); none when they leave only that one."""
        if self._held_open is None:
            return self.waiting_bound
        return max(0, min(self.waiting_bound, self._limit - 1 - self._held_open()))

    def _end(self, victim, now: int, held: int) -> None:
        """End ``victim``, a call still waiting for its request (``held``: the waiting calls on its connection)."""
        arrived, rpc_event, state, behaviour, ended = self._waiters[victim]
        self._forget(victim)
        with state.condition:  # (the newest call's is held too: grpc holds it around submit; the poller's alone)
            if _gs._is_rpc_state_active(state):
                ended.append(True)
                self._refused(behaviour, "RESOURCE_EXHAUSTED")
                self.ended_waiting += 1
                state.trailing_metadata = NOT_DECIDED + (("retry-after-ms", str(RETRY_AFTER_MS)),)
                why = (f"its request message had not come {(now - arrived) // 1_000_000} ms after the call began, and "
                       f"{len(self._waiters) + 1} calls were waiting for theirs ({held} on its connection; at most "
                       f"{self.max_waiting} wait {self.min_wait_ns // 1_000_000} ms or more, at most "
                       f"{self._bound_now()} in all now): the longest-waiting is ended (nothing was run; a request "
                       f"sent with its call may only have been slow to be read under load): retry after "
                       f"{RETRY_AFTER_MS} ms")
                # Sending the status closes the stream: the receive completes (on_message) and ends the call.
                _gs._abort(state, rpc_event.call, _cygrpc.StatusCode.resource_exhausted, why.encode())

    def _refused(self, behaviour, code: str) -> None:
        """A call ended with ``code`` before its handler ran, counted as a handler's status is."""
        method = self._methods.get(getattr(behaviour, "func", behaviour))  # (grpc hands over a partial: see above)
        if self._refusals is not None and method is not None:
            self._refusals.count(method, code)

    def _lone(self, behaviour) -> bool:
        """Whether a call (its request in) runs on the poller: it arrived to an idle server, as most recent
        calls did, well after the last call ended, and its handler may run there (on the poller thread)."""
        idle = self.waiting == 0 and self.outstanding.count == 0 and self._pool.in_progress() == 0
        self.idle_share += ((1.0 if idle else 0.0) - self.idle_share) * IDLE_SHARE_WEIGHT
        if not idle or self.idle_share < LONE_IDLE_SHARE:
            return False
        # The time grpc took up the call, stamped once for the handler (registration._ArrivalStamped).
        arrived_ns = getattr(behaviour, "keywords", {}).get("arrived_ns") or time.monotonic_ns()
        return (arrived_ns - self.last_done_ns >= LONE_GAP_NS
                and getattr(behaviour, "func", behaviour) in self._poller_handlers
                and self._pool.arrival_while_idle())

    def _respond(self, rpc_event, state, behaviour, request, deserializer, serializer, finished,
                 on_poller: bool = False) -> None:
        """grpc's ``_unary_response_in_pool``, on a handler thread (or the poller, ``on_poller``), with one
        addition: the behaviour may take the call's ``LaterAnswer`` and return ``DEFERRED``; the call is then
        answered from another thread."""
        _cygrpc.install_context_from_request_call_event(rpc_event)
        deferred = False
        try:
            argument = request()
            if argument is not None:
                later = None
                if self._answer_later:
                    later = LaterAnswer(rpc_event, state, serializer, finished, self.outstanding, on_poller,
                                        self._refusals)
                    offer(later)
                try:
                    response, proceed = _gs._call_behavior(rpc_event, state, behaviour, argument, deserializer)
                finally:
                    offer(None)
                if response is DEFERRED:
                    deferred = True
                elif later is not None and not later.settle():  # a ``send`` after this is dropped
                    log.error("a unary call was answered through its LaterAnswer without DEFERRED")
                elif proceed:
                    serialized = _gs._serialize_response(rpc_event, state, response, serializer)
                    if serialized is not None:
                        _gs._status(rpc_event, state, serialized)
        except Exception:  # as grpc's own: never let a call's fault end the handler thread
            log.exception("answering a unary call failed")
        finally:
            _cygrpc.uninstall_context()
            if not deferred:
                finished.set_done()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # the HandlerPool is the server's; grpc shuts that one down


def attach(handlers, pool, answer_later: bool = True, poller_inline: bool = False,
           refusals=None, max_waiting: int | None = None, waiting_bound: int | None = None,
           gate=None, held_open=None, limit: int = 0) -> EagerReceive | None:
    """Route the unary-unary methods of ``handlers`` (``registration.ServiceHandlers``) through an
    ``EagerReceive`` on ``pool``; None (and a warning) where this grpcio does not allow it. With
    ``poller_inline`` (and ``answer_later``), behaviours marked ``runs_on_poller`` run on the poller
    thread when they arrive to an idle server. ``max_waiting``, ``waiting_bound``: how many calls may wait for their
    request (``waiting_cap``, ``waiting_bound``); past them the longest-waiting are ended. ``held_open()``: the call
    slots open streams and watches hold, of ``limit`` (gRPC's, workers); waiting calls never take the last one."""
    if not AVAILABLE:
        _fallback("this grpcio lacks the internals it follows")
        return None
    eager = EagerReceive(pool, answer_later, refusals, max_waiting, waiting_bound, gate, held_open, limit)
    on_poller = set()
    for service in handlers:
        for name, handler in getattr(service, "methods", {}).items():
            if handler.request_streaming or handler.response_streaming:
                continue
            behaviour = unary_behaviour(handler)
            eager._methods[behaviour] = f"{service.service_name.rpartition('.')[2]}.{name}"
            try:
                behaviour.experimental_thread_pool = eager  # read per call (registration._ArrivalStamped passes it on)
            except AttributeError:  # not a plain function (a bound method): that method keeps grpc's path
                continue
            if poller_inline and getattr(behaviour, "runs_on_poller", False):
                on_poller.add(behaviour)
    if answer_later:  # (a handler on the poller hands on what would wait through its LaterAnswer)
        eager._poller_handlers = frozenset(on_poller)
    return eager
