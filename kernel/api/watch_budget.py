"""Open watches, capped below the threaded front end's limit on calls in progress.

A watch (``ReviewService.WatchReviews``, ``TaskService.WatchTask``,
``AuditService.StreamAudit`` with ``follow``) has no end of its own, and on
the threaded front end each open one holds a handler thread, counted by gRPC
against ``workers`` (``maximum_concurrent_rpcs``). With ``workers`` watches
open every other call (Decide, ModelInfer, even a health Check) was refused
with gRPC's "Concurrent RPC limit exceeded!", before the kernel could read
its priority, so ``CallBudget``'s reserve did not help. ``WatchBudget`` caps
the three together at ``max_watches`` (default a quarter of ``workers``): a
watch beyond it is refused at once with RESOURCE_EXHAUSTED that says how many
are open and names the setting, with a ``retry-after-ms`` trailer. The rule
is the same on the asyncio front end, where a watch holds no handler thread
but still a worker thread and its queued events.

grpc.health.v1 ``Watch`` is not counted: it holds no thread on either front
end (kernel/api/health.py). A StreamAudit that only reads back (no
``follow``) ends by itself and is ordinary in-flight work: not counted either.
"""

from __future__ import annotations

import contextlib
import threading

from ..errors import ResourceExhausted

SETTING = "max_watches"
# A hint only: a watch slot frees when some client ends its watch, on that client's schedule, not the kernel's.
RETRY_AFTER_MS = 1000


class OpenBudget:
    """At most ``limit`` calls of a kind that stays open (watches, client streams) at once; ``hold()`` takes one.

    The refusal says how many are open, which calls count (``kinds``), the setting that sets the limit and
    what to do (``advice``), with a ``retry-after-ms`` trailer: a place frees when some client ends its call.
    """

    __slots__ = ("limit", "open", "refused", "_lock", "_noun", "_kinds", "_setting", "_advice")

    def __init__(self, limit: int, noun: str, kinds: str, setting: str, advice: str):
        self.limit = limit
        self.open = 0  # open now (read without the lock: a snapshot)
        self.refused = 0  # turned away at the limit
        self._lock = threading.Lock()
        self._noun, self._kinds, self._setting, self._advice = noun, kinds, setting, advice

    def hold(self, rpc: str = "") -> _Held:
        """One open place (for ``rpc``) until the ``with`` block ends or ``release()``; RESOURCE_EXHAUSTED at
        the limit."""
        with self._lock:
            if self.open >= self.limit:
                self.refused += 1
                open_now = self.open
            else:
                self.open += 1
                return _Held(self)
        refused = f"{rpc} refused; " if rpc else ""
        raise ResourceExhausted(
            f"{open_now} {self._noun} are open ({self._kinds}, together; limit {self.limit}, the {self._setting} "
            f"setting): {refused}{self._advice}, or retry after {RETRY_AFTER_MS} ms",
            trailers=(("retry-after-ms", str(RETRY_AFTER_MS)),),
        )

    def _release(self) -> None:
        with self._lock:
            self.open -= 1


class WatchBudget(OpenBudget):
    """At most ``limit`` watches open at once; ``hold(rpc)`` takes one for a ``with`` block."""

    __slots__ = ()

    def __init__(self, limit: int):
        super().__init__(limit, "watches", "WatchReviews, WatchTask and StreamAudit with follow", SETTING,
                         "end a watch you no longer need")


class _Held:
    """A watch slot, given back once (``with`` block's end, or ``release()``)."""

    __slots__ = ("_budget",)

    def __init__(self, budget: OpenBudget):
        self._budget = budget

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._release()

    def __enter__(self) -> _Held:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


class _Unlimited:
    """No cap (handlers assembled without a budget: tests, tools)."""

    __slots__ = ()

    def hold(self, rpc: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()


UNLIMITED = _Unlimited()


def follow(watches: WatchBudget, rpc: str, open_watch, ctx):
    """What a watch sends, for as long as the call lasts, holding one of ``watches``' places: the watch
    (``open_watch()``) is opened once the place is taken and closed however the call ends (the client left,
    the deadline passed: ``ctx.on_done`` stops it waiting at once)."""
    with watches.hold(rpc):
        watch = open_watch()
        ctx.on_done(watch.close)
        try:
            for event in watch:
                yield event
                if not ctx.is_active():
                    return
        finally:
            watch.close()

