"""Finish unary decisions in groups on one thread of their own, while their callers sleep once.

A decision's last steps — the policy, the audit record and its fsync, the
review — cost far less per decision when done for many at once (one
vectorized policy pass, one audit wait, one review transaction). The lane
hands each model batch's decisions here the moment the model has run
(``WorkItem.finisher``) without waking their callers; this thread takes
everything handed in since its last group as the next group, finishes it,
and only then lets the lane wake each caller with its answer. So a ``Decide``
caller sleeps once, like a ``ModelInfer`` caller, and batches that finish
while a group is being written join the next group.

(Replaced a leader/follower coalescer on the callers' own threads: every
caller there woke once for its model result and slept again for its group,
two thread switches per decision instead of one per group.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import Internal, KernelError
from ..observability.repeats import RepeatedFailure
from ..os_faults import environment_fault
from ..threads import name_native_thread, no_wakeup_preemption

log = logging.getLogger("aios.decisions")


class BatchFinisher:
    """``submit(items, done)``: finish ``[item.owner ...]`` with ``finish_group``, then call ``done(items)``.

    ``finish_group(pendings)`` returns one result (a Decision or a
    KernelError) per pending; each lands on ``pending.result``. ``done`` is the
    lane's "these items are finished" call, made once per submitted list.
    """

    def __init__(self, finish_group: Callable[[list], list], answer: Callable[[list], None] | None = None,
                 name: str = "aios-decide", max_group: int = 256):
        self._finish_group = finish_group
        # answer(pendings): after ``done``, send the answers of callers that did not wait (answer_later)
        self._answer = answer
        self._max_group = max_group
        self._lock = threading.Lock()
        self._queue: list[tuple[list, Callable[[list], None]]] = []
        self._queued = 0
        self._sleeping = False
        # Released once per sleep by whoever queues work: a Lock, not a Condition, because waking
        # through a Condition costs Python-level bookkeeping on every group.
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._closing = False
        # A group fails as a whole when the audit log has stopped (a full disk, its files removed): then every
        # group fails the same way, and a traceback each buried the log's one ERROR line (272 in 2 s from 4
        # clients). An expected KernelError is one ERROR line, then a count now and then; anything else a bug,
        # whose first traceback is kept, and counted the same way after it.
        self._refused = RepeatedFailure(log, "finishing decision groups")
        self._crashing = RepeatedFailure(log, "finishing decision groups (unexpectedly)")
        self.groups = 0  # for tests and stats: groups finished, decisions in them
        self.items = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: list, done: Callable[[list], None]) -> bool:
        """Queue a batch's finished model work; never blocks (the lane calls it from the thread that ran the
        batch, and ``DecisionEngine._never_ran`` under the lane's lock).

        False once closing: the lane then wakes the callers at once and each
        finishes its own decision.
        """
        with self._lock:
            if self._closing:
                return False
            self._queue.append((items, done))
            self._queued += len(items)
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wakeup.release()
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._lock:
            self._closing = True
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wakeup.release()
        self._thread.join(timeout_s)
        if self.groups:
            log.info("decision finisher: %d decisions in %d groups (%.1f per group)", self.items, self.groups,
                     self.items / self.groups)

    def _run(self) -> None:
        # Woken by a handler thread that holds the GIL: preempting it would only block on the GIL and
        # switch back (see kernel/threads.py). The decisions wait anyway; let the waker run on.
        name_native_thread()
        no_wakeup_preemption()
        while True:
            with self._lock:
                if not self._queue:
                    if self._closing:
                        return
                    self._sleeping = True
                    taken = None
                elif self._queued <= self._max_group:
                    taken, self._queue, self._queued = self._queue, [], 0
                else:
                    taken, count = [], 0
                    while self._queue and count < self._max_group:
                        taken.append(self._queue.pop(0))
                        count += len(taken[-1][0])
                    self._queued -= count
            if taken is None:
                self._wakeup.acquire()
                continue
            self._finish(taken)

    def _finish(self, taken: list) -> None:
        group = [item.owner for items, _ in taken for item in items]
        try:
            results = self._finish_group(group)
        except Exception as exc:  # every decision of the group gets the failure; none is left unanswered
            # (finish_group keeps a row's own fault to that row: what reaches here failed the group as a
            # whole, such as the audit log.)
            results = [self._failed(group, exc)] * len(group)
        else:
            self._refused.succeeded()
            self._crashing.succeeded()
        for pending, result in zip(group, results):
            pending.result = result
        self.groups += 1
        self.items += len(group)
        for items, done in taken:
            try:
                done(items)
            except Exception:  # never leave the other batches' callers asleep
                log.exception("waking the callers of %d finished decisions failed", len(items))
        if self._answer is not None:
            try:
                self._answer(group)
            except Exception:
                log.exception("answering %d finished decisions failed", len(group))

    def _failed(self, group: list, exc: Exception) -> KernelError:
        """Log a group's failure (see ``_refused``) and return what each of its decisions is answered."""
        fault = environment_fault(exc, "finishing decisions")  # out of descriptors, memory, disk (os_faults.py)
        if fault is not None:  # (said once per episode there; not "not decided": a record may be on the log)
            return fault
        if isinstance(exc, KernelError):
            self._refused.failed(f"a group of {len(group)} decisions was answered {exc.code}: {exc.message}",
                                 traceback=False)
            return exc
        self._crashing.failed(f"a group of {len(group)} decisions was answered INTERNAL: {type(exc).__name__}: {exc}")
        return Internal(f"the decision could not be finished: {exc}")
