"""A unary call on the threaded front end answered later, from another thread, so its handler thread is free.

With ``eager_receive`` the kernel runs each unary call's handler itself
(``eager_receive._respond``, grpc's ``_unary_response_in_pool`` step for
step). That lets a handler hand its call on instead of sleeping until the
answer exists: ``take()`` gives it the call's ``LaterAnswer``; the handler
queues its work with it and returns ``DEFERRED``; whoever finishes the work
(the thread that ran the model's batch) calls ``send(response)`` or
``fail(error)``. A handler thread then never sleeps on a batch: under load
it goes straight to the next call, and one thread answers a whole batch,
where each caller's thread used to be woken in turn (bench/RESULTS.md,
"Answers sent by the batch's thread").

``take()`` returns None where the call cannot be answered later (grpc's
standard path, the asyncio front end, a stream): the handler blocks as it
always did. Calls answered later still count as in progress, for gRPC's
``maximum_concurrent_rpcs`` (its future is done only once the answer is
sent) and for ``CallBudget`` (``outstanding``).
"""

from __future__ import annotations

import logging
import threading

import grpc

from ..errors import Internal, KernelError
from ..os_faults import environment_fault

log = logging.getLogger("aios.api")

try:
    import grpc._server as _gs
    from grpc._cython import cygrpc as _cygrpc
except ImportError:  # pragma: no cover - eager_receive.AVAILABLE is False then, and nothing here runs
    _gs = _cygrpc = None

# What a handler returns when it has taken its call's LaterAnswer and will answer through it.
DEFERRED = object()

_local = threading.local()


def take(method: str = ""):
    """The running call's ``LaterAnswer``, or None where this call must be answered by returning; ``method``
    ("Service.Method") names the call where its error status is counted (gRPC's call details have no method
    for a registered one)."""
    later = getattr(_local, "later", None)
    if later is not None:
        later.method = method
    return later


def offer(later) -> None:
    """Make ``later`` (a ``LaterAnswer``, or None) what ``take()`` returns on this thread: set by the
    code that runs a unary call's handler, for the length of the handler."""
    _local.later = later


class Outstanding:
    """Calls handed on and not yet answered (read by the server's CallBudget without a lock).

    A call counts from its handler's ``defer()`` to its answer; the two may
    come in either order from two threads, hence the lock.
    """

    __slots__ = ("count", "_lock")

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def change(self, answer: LaterAnswer, deferring: bool) -> bool:
        """Record ``answer``'s defer (``deferring``) or its answer; False for a second answer."""
        with self._lock:
            if deferring:
                answer._deferred = True
                if not answer._sent:
                    self.count += 1
                return True
            if answer._sent:
                return False
            answer._sent = True
            if answer._deferred:
                self.count -= 1
            return True


class LaterAnswer:
    """One call's answer, sent from any thread, once: a response message, or a ``KernelError``'s status."""

    __slots__ = ("_rpc_event", "_state", "_serialize", "_finished", "_outstanding", "_sent", "_deferred", "on_poller",
                 "_refusals", "method")

    def __init__(self, rpc_event, state, serialize, finished, outstanding: Outstanding, on_poller: bool = False,
                 refusals=None):
        self._refusals = refusals  # where ``fail`` counts the status it sends (observability.refusals)
        self.method = ""  # the call's, as ``take`` was told it
        self._rpc_event = rpc_event
        self._state = state
        self._serialize = serialize
        self._finished = finished  # the future grpc counts the call by (eager_receive._Finished)
        self._outstanding = outstanding
        self._sent = False
        self._deferred = False
        # The handler runs on gRPC's poller thread (eager_receive): it must not wait for anything;
        # work that would take long is handed on and the call answered later.
        self.on_poller = on_poller

    def defer(self):
        """Mark the call as answered later (call it once its work is handed on: the answer may already be
        out, from another thread); returns ``DEFERRED`` for the handler to return."""
        self._outstanding.change(self, deferring=True)
        return DEFERRED

    def settle(self) -> bool:
        """The handler answered by returning (no ``defer``): any later ``send``/``fail`` is dropped.
        False if one already went out (the handler should have returned ``DEFERRED``)."""
        return self._outstanding.change(self, deferring=False)

    def send(self, response) -> None:
        try:
            serialized = _gs._common.serialize(response, self._serialize)
        except Exception:  # a response that does not serialize is the kernel's bug: INTERNAL, as grpc does
            log.exception("serializing a response failed")
            serialized = None
        if serialized is None:
            self._status(_cygrpc.StatusCode.internal, b"Failed to serialize response!", None)
        else:
            self._status(None, None, serialized)

    def fail(self, error) -> None:
        """Answer with ``error``'s status: a ``KernelError`` as it says, the environment running out (descriptors,
        memory, disk: kernel/os_faults.py) UNAVAILABLE, anything else (or None) INTERNAL."""
        if not isinstance(error, KernelError):
            error = (environment_fault(error, self.method or "a call answered later")
                     or Internal(f"the request could not be finished{f': {error}' if error else ''}"))
        code = _gs._common.STATUS_CODE_TO_CYGRPC_STATUS_CODE[grpc.StatusCode[error.code]]
        self._status(code, error.message.encode(), None, error.trailers, error.code)

    def _status(self, code, details: bytes | None, serialized: bytes | None, trailers=None,
                failed_with: str | None = None) -> None:
        if not self._outstanding.change(self, deferring=False):  # a caller's bug; the first answer stands
            log.error("a deferred call was answered twice; the second answer is dropped")
            return
        if failed_with is not None and self._refusals is not None:  # counted only when it is the answer sent
            self._refusals.count(self.method, failed_with)
        state = self._state
        try:
            with state.condition:
                if trailers:
                    state.trailing_metadata = trailers
                if code is None:
                    _gs._status(self._rpc_event, state, serialized)
                else:
                    _gs._abort(state, self._rpc_event.call, code, details)
        except Exception:  # grpc's internals moved under us: end the call rather than leave the client waiting
            log.exception("sending an answer from another thread failed; the call is cancelled instead")
            try:
                self._rpc_event.call.cancel()
            except Exception:
                log.exception("cancelling the call failed too")
        finally:
            self._finished.set_done()
