"""Stopping a running batch once none of its requests is wanted any more.

A queued request that its client cancels, or whose deadline passes, leaves the queue and never runs
(``Lane.cancel``, ``Lane.expire``). One already running in a batch used to run to the end all the same: under
overload (every batch made of requests near their deadline) the model kept a core busy for callers that had
all gone, while live requests queued behind it. Each batch now runs with an onnxruntime ``RunOptions`` (one per
running batch, reused), and when the last request of a running batch that was still wanted is cancelled or
passes its deadline, the lane sets its ``terminate``. onnxruntime checks the flag between nodes (a ``Loop``
between iterations) and raises (``Fail``: "Exiting due to terminate flag being set to true"); the session is
left as it was and runs the next batch normally. A batch with one request still wanted runs to the end.

Who notices: whoever already watches a request's end — the client's cancel (a call's callback, the event loop's
cancelled wait, a stream's end) and its deadline (the expiry timer of calls answered later, the event loop's
timer, a blocked caller waking at its deadline) — calls ``Lane.cancel``/``expire``, which for a running request
records it here (``Abandoned``); nothing is added per request on the hot path. A request whose deadline has
passed counts as abandoned whether or not anyone told the lane (the thread running the batch watches nothing).

Measured (onnxruntime 1.32, a 16-64-4 MLP, one row, timeit on a shared machine): passing a ``RunOptions`` is no
slower than passing None, for which onnxruntime builds a default one each run (4.7-5.9 µs against 5.5-7.2 µs a
run); making one costs ~0.3 µs, so they are kept and reused (``Lane._spare_options``), never made per batch.
Not watched: a lone blocking call (a model under ANSWER_LATER_MIN_NS a batch) run on its own handler thread,
and a call run inline on the poller or the event loop (kernel/api/frontends.py): no one else sees its end.
"""

from __future__ import annotations

from onnxruntime import RunOptions

from ..errors import Cancelled, DeadlineExceeded
from .types import NO_DEADLINE


class CancelledWhileRunning(Cancelled):
    """The client cancelled a request whose batch was then stopped (``ModelStats.stopped_cancelled``)."""


class ExpiredWhileRunning(DeadlineExceeded):
    """A request's deadline passed while its batch ran, and the batch was stopped (``ModelStats.stopped_expired``;
    not ``finished_late``: the model never finished)."""


class Abandoned:
    """The requests of one running batch that are no longer wanted: request -> True (cancelled) or False (its
    deadline passed), the first reason heard; ``stopped`` once the batch's ``terminate`` was set."""

    __slots__ = ("reasons", "stopped")

    def __init__(self):
        self.reasons: dict = {}
        self.stopped = False


def new_run_options() -> RunOptions:
    return RunOptions()


def nobody_waits(batch, abandoned: Abandoned, now: int) -> bool:
    """Whether every request of ``batch`` was cancelled or has passed its deadline."""
    reasons = abandoned.reasons
    for item in batch.items:
        if item not in reasons and (item.deadline_ns == NO_DEADLINE or item.deadline_ns > now):
            return False
    return True


def stopped_error(item, abandoned: Abandoned) -> Cancelled | DeadlineExceeded:
    """The answer of ``item`` whose batch was stopped: CANCELLED if its client cancelled it first, else
    DEADLINE_EXCEEDED."""
    why = ("the batch it ran in was stopped: every request in it had been cancelled or had passed its deadline; "
           "the model never finished this request")
    if abandoned.reasons.get(item, False):
        return CancelledWhileRunning(f"the client cancelled the request; {why}")
    return ExpiredWhileRunning(f"deadline passed while the request ran; {why}")


def was_stopped(options) -> bool:
    """Whether a run that raised was stopped by the lane (its ``terminate`` set): not a model fault."""
    return options is not None and options.terminate
