"""Run durable tasks on a small pool of worker threads, with retries and restart recovery.

``run_fn(task)`` runs one attempt of a task's pipeline and returns the final
``Decision`` (→ SUCCEEDED) or ``WaitingForReview`` (→ WAITING_FOR_REVIEW, to
be finished by ``complete_from_review``). It may raise:

- ``TransientError``: retried with exponential backoff
  (``backoff_s · 2^(attempt-1)``, at most ``max_backoff_s``) until
  ``max_attempts`` runs have been made, then FAILED (the kernel passes its
  ``task_max_attempts``, ``task_backoff_s`` and ``task_max_backoff_s``
  settings);
- ``UntilRestart``: nothing can be decided until the kernel restarts (its audit log fail-stopped): back to
  QUEUED, the attempt not counted, and not run again by this process; the next ``start()`` runs it;
- anything else: FAILED at once, with the error as ``Task.error``.

A task cancelled while an attempt runs is CANCELLED at once; the attempt
runs to its end and its outcome is dropped (a decision it made stays on the
audit log), and a review it opened is withdrawn through the ``on_cancelled``
hooks, as a cancelled waiting task's is.

A change the store refuses for a reason that may pass (``StoreBusy``:
another process holding its write lock, a full disk) is written again after
the store's retry hint, by the worker that ran the attempt, which is not run
again; the task shows its last stored state meanwhile.

On ``start()``, tasks the previous process left RUNNING (it died mid-run)
are queued again — the pipeline is deterministic and idempotent, so running
it again is safe — unless that run was their last allowed attempt; QUEUED
ones are queued; WAITING_FOR_REVIEW ones keep waiting (or finish, if their
review was resolved while nobody could tell them). Backoff delays use the
monotonic clock; a restart finishes a QUEUED task's wait from its stored
``next_attempt_unix_ns`` (wall clock), at most ``max_backoff_s`` of it: a
restart retried every task at once (a burst on whatever made them fail), and
a wall clock set back, or a lower ``task_max_backoff_s``, must not make a
task wait longer than the longest back-off.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import KernelError, TransientError
from ..store.faults import RETRY_AFTER_MS, StoreBusy
from ..threads import name_native_thread
from .store import TaskStore, TaskWatch

log = logging.getLogger("aios.tasks")

# How long a worker waits before writing again a task change the store refused for a reason that may pass
# (StoreBusy: another process holding its write lock, a full disk): the store's own retry hint.
STORE_RETRY_S = RETRY_AFTER_MS / 1000


class WaitingForReview:
    """What ``run_fn`` returns when the case went to a human: the task waits for that review."""

    __slots__ = ("review_id", "decision")

    def __init__(self, review_id: str, decision: kpb.Decision):
        self.review_id = review_id
        self.decision = decision  # the proposed (escalated) decision, kept on the task meanwhile

    def __repr__(self) -> str:
        return f"WaitingForReview({self.review_id!r})"


class UntilRestart(Exception):
    """What ``run_fn`` raises when its attempt could not run for a reason only a restart of the kernel ends (its
    audit log fail-stopped, a full disk; or it is stopping): the task waits, QUEUED, its attempts unspent. Failing it instead left
    a workflow engine's key answering a FAILED task for good, for work the kernel never got to try."""


# The end of the history line of a task waiting for a restart (UntilRestart).
WAITS_FOR_RESTART = "the task runs again once the kernel restarts"


class TaskRunner:
    """Workers that take QUEUED tasks, run them, and record the outcome."""

    def __init__(self, store: TaskStore, run_fn: Callable[[kpb.Task], object], workers: int = 2,
                 max_attempts: int = 3, backoff_s: float = 0.1, max_backoff_s: float = 30.0,
                 validate: Callable[[kpb.DecisionRequest], None] | None = None,
                 audit_position: Callable[[], int] | None = None,
                 recorded: Callable[[str], bool] | None = None):
        if workers < 1 or max_attempts < 1 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("workers and max_attempts must be >= 1, backoffs >= 0")
        self.store = store
        self.run_fn = run_fn
        # The audit log's size now, kept on a task as each attempt begins (Task.audit_from_sequence).
        self.audit_position = audit_position
        # Whether the attempt a stop of the kernel cut off had recorded its decision (read at start, _recover):
        # such a task is finished with that decision even when that was its last attempt.
        self.recorded = recorded  # (until that run takes the decision: its next run is no new attempt)
        self.workers = workers
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.validate = validate  # refuses bad requests at StartTask (e.g. unknown pipeline: NOT_FOUND)
        self.on_cancelled: list[Callable[[kpb.Task], None]] = []  # e.g. withdraw the review a task waited on
        self._cond = threading.Condition(threading.Lock())
        self._ready: list[tuple[int, int, str]] = []  # heap of (monotonic ns when due, tie-breaker, task id)
        self._queued: set[str] = set()  # task ids in the heap: each at most once
        # task id -> the write of its attempt's outcome that the store refused (StoreBusy): written again, not re-run
        self._unrecorded: dict[str, Callable[[], None]] = {}
        self._refusals: dict[str, int] = {}  # task id -> StoreBusy refusals in a row (the first is logged)
        self._tie = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> TaskRunner:
        """Recover what the last process left, then start the workers."""
        self._recover()
        with self._cond:
            self._stopping = False
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"aios-task-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking tasks and wait up to ``timeout_s`` for running attempts.

        An attempt still running afterwards stays RUNNING in the store and is
        re-run by the next ``start()`` on the same data. An outcome the store
        refused (StoreBusy), waiting for its retry, is written once more.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        self._record_refused_outcomes()

    def _record_refused_outcomes(self) -> None:
        """Write once more the outcomes the store refused (StoreBusy) whose retry the stop cut off: left RUNNING,
        the next start ran the task again (taking the decision its attempt recorded, if it did; a transient
        failure's back-off and a failure's error were lost). The first refusal ends the tries, so the stop waits
        one busy timeout at most; one line names what stays unwritten."""
        pending = list(self._unrecorded.items())
        for done, (task_id, record) in enumerate(pending):
            try:
                record()
            except KernelError as exc:  # still refused (the lock still held), or the store failed
                left = [tid for tid, _ in pending[done:]]
                log.error("stopping: the store would not take the outcome of %d task%s (%s): %s; the next start runs "
                          "each again, taking the decision its attempt recorded if it did", len(left),
                          "s" if len(left) != 1 else "", ", ".join(left), exc.message)
                return
            self._unrecorded.pop(task_id, None)
            self._refusals.pop(task_id, None)

    def _recover(self) -> None:
        requeued, taking, failed = 0, 0, 0
        for task in self.store.in_states((kpb.RUNNING,)):
            attempt = task.attempts
            if self.recorded is not None and self.recorded(task.task_id):
                # Decided and on the log: the task takes that decision (one decision per task), attempts left or not.
                self.store.transition(task.task_id, kpb.QUEUED, (kpb.RUNNING,),
                                      f"re-queued: the kernel stopped after attempt {attempt} recorded its decision")
                taking += 1
            elif attempt >= self.max_attempts:
                self.store.transition(task.task_id, kpb.FAILED, (kpb.RUNNING,), "the kernel stopped during the last attempt",
                                      error=f"the kernel stopped while attempt {attempt} of {self.max_attempts} ran")
                failed += 1
            else:
                self.store.transition(task.task_id, kpb.QUEUED, (kpb.RUNNING,),
                                      f"re-queued: the kernel stopped while attempt {attempt} ran")
                requeued += 1
        queued, gave_up, backing_off = self.store.in_states((kpb.QUEUED,)), 0, 0
        now = self.store.now()
        for task in queued:
            if task.attempts >= self.max_attempts and not (self.recorded is not None and self.recorded(task.task_id)):
                # Waiting for a retry when task_max_attempts was lowered across the restart: it had its attempts
                # (it ran "attempt 2 of 1" otherwise; a workflow engine's audit).
                self.store.transition(task.task_id, kpb.FAILED, (kpb.QUEUED,), "failed",
                                      error=f"gave up after {task.attempts} attempts: task_max_attempts is "
                                            f"{self.max_attempts} since the kernel restarted")
                gave_up += 1
                continue
            delay_s = self._backoff_left_s(task, now)
            if delay_s > self.max_backoff_s:  # (stored, so that `task get`'s "next run" says when it runs now)
                self.store.transition(task.task_id, kpb.QUEUED, (kpb.QUEUED,),
                                      f"next run in {self.max_backoff_s:.3g} s: the one stored was {delay_s:.0f} s "
                                      "away, past task_max_backoff_s (the wall clock set back, or the setting "
                                      "lowered)", retry_in_s=self.max_backoff_s)
                delay_s = self.max_backoff_s
            backing_off += delay_s > 0
            self._schedule(task.task_id, delay_s)
        finished = self.store.apply_pending_reviews()
        # An operator restarting after a crash reads here what happened to the work in flight.
        if requeued or taking or failed:
            log.warning("tasks running when the kernel stopped: %d re-queued for another attempt, %d to take the "
                        "decision their attempt recorded, %d failed (that was their last attempt, and it recorded "
                        "nothing)", requeued, taking, failed)
        if gave_up:
            log.warning("tasks: %d waiting for a retry failed: they have made task_max_attempts (%d) attempts",
                        gave_up, self.max_attempts)
        if len(queued) > gave_up:
            log.info("tasks: %d queued, starting now; %d of them once their back-off ends",
                     len(queued) - gave_up, backing_off)
        if finished:
            log.info("finished %d waiting tasks from reviews resolved before the restart", finished)

    def _backoff_left_s(self, task: kpb.Task, now_unix_ns: int) -> float:
        """What is left of a QUEUED task's back-off at start: its stored next attempt (wall clock) less now, never
        below 0 (the kernel was down past it: run now). ``_recover`` holds it to ``max_backoff_s``: a wall clock set
        back since, or a lower ``task_max_backoff_s``, must not hold a task longer than the longest back-off."""
        if not task.next_attempt_unix_ns:
            return 0.0
        return max((task.next_attempt_unix_ns - now_unix_ns) / 1e9, 0.0)

    # -- the API ------------------------------------------------------------------------------
    def submit(self, request: kpb.DecisionRequest) -> kpb.Task:
        """Start a task for ``request`` (or return the one its idempotency key already started).

        A key that started a task answers with that task before the request is validated: a StartTask retried
        after its pipeline was unloaded (or changed) was refused NOT_FOUND (INVALID_ARGUMENT), and the caller,
        who may never have had the first answer, could not learn the task it had started."""
        started = self.store.started(request)
        if started is not None:
            return started
        if self.validate is not None:
            self.validate(request)
        task, created = self.store.create(request)
        if created:
            self._schedule(task.task_id, 0.0)
        return task

    def get(self, task_id: str) -> kpb.Task:
        return self.store.get(task_id)

    def list(self, tenant: str = "", states=(), page_size: int = 0, page_token: str = "") -> kpb.ListTasksResponse:
        return self.store.list(tenant, states, page_size, page_token)

    def cancel(self, task_id: str) -> kpb.Task:
        """CANCELLED unless already final (FAILED_PRECONDITION).

        A running attempt goes on to its end, but its outcome is dropped: the
        task stays CANCELLED. That attempt may already have made its decision
        (it is on the audit log, with the task's id); a review it opened is
        withdrawn by the cancel hooks, or once the attempt ends
        (``_cancelled_while_running``). A reviewer's resolution of the task's
        review and the cancel have one winner, decided in the store's
        transactions (kernel/store/sqlite_tasks.py): the hooks run after the
        cancel is durable, so a cancel that fails withdraws nothing.
        """
        task = self.store.cancel(task_id)
        self._run_cancel_hooks(task)
        return task

    def _run_cancel_hooks(self, task: kpb.Task) -> None:
        for hook in self.on_cancelled:
            try:
                hook(task)
            except Exception:  # the task is cancelled either way; the hook's failure is logged
                log.exception("a task-cancel hook failed for task %s", task.task_id)

    def watch(self, task_id: str, timeout_s: float | None = None) -> TaskWatch:
        return self.store.watch(task_id, timeout_s)

    def complete_from_review(self, review_id: str, decision: kpb.Decision, task_id: str = "") -> kpb.Task | None:
        return self.store.complete_from_review(review_id, decision, task_id)

    # -- the workers --------------------------------------------------------------------------
    def _schedule(self, task_id: str, delay_s: float) -> None:
        with self._cond:
            if task_id in self._queued:
                return
            self._queued.add(task_id)
            heapq.heappush(self._ready, (time.monotonic_ns() + int(delay_s * 1e9), next(self._tie), task_id))
            self._cond.notify()

    def _next_due(self) -> str | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic_ns()
                if self._ready and self._ready[0][0] <= now:
                    task_id = heapq.heappop(self._ready)[2]
                    self._queued.discard(task_id)
                    return task_id
                self._cond.wait((self._ready[0][0] - now) / 1e9 if self._ready else None)
            return None

    def _work(self) -> None:
        name_native_thread()
        while (task_id := self._next_due()) is not None:
            try:
                self._run(task_id)
                refused = self._refusals.pop(task_id, 0)
                if refused:
                    log.warning("task %s: the store took its change after refusing it %d time%s", task_id, refused,
                                "s" if refused != 1 else "")
            except StoreBusy as exc:  # nothing was written and it may pass: the same write again, later
                refused = self._refusals[task_id] = self._refusals.get(task_id, 0) + 1
                if refused == 1:  # (once a task: a store refusing for hours logged a line a second for each)
                    log.error("task %s: the store refused its change; trying again every %g s until it takes it "
                              "(logged once): %s", task_id, STORE_RETRY_S, exc.message)
                self._schedule(task_id, STORE_RETRY_S)
            except KernelError as exc:  # a store failure (fail-stopped, closed at shutdown): the task stays as recorded
                log.error("task %s: recording its outcome failed: %s", task_id, exc.message)
            except Exception:
                log.exception("task %s: recording its outcome failed", task_id)

    def _run(self, task_id: str) -> None:
        """One attempt of ``task_id`` and the write of its outcome; or, when the store refused that write for a
        reason that may pass (StoreBusy: the task stayed RUNNING, and nothing would ever move it on until a
        restart), that write again: the attempt is not run again (its decision is on the audit log already).
        A StoreBusy raised here reaches ``_work``, which schedules the task again."""
        record = self._unrecorded.pop(task_id, None)
        if record is None:
            record = self._attempt(task_id)
            if record is None:
                return
        try:
            record()
        except StoreBusy:
            self._unrecorded[task_id] = record
            raise

    def _attempt(self, task_id: str) -> Callable[[], None] | None:
        """Run an attempt of the task; what records its outcome (None: there is nothing to run or record)."""
        task = self.store.get(task_id)
        before = task.attempts
        if self.recorded is not None and self.recorded(task_id):  # (see _recover) the cut-off attempt's decision
            # (An attempt that waited for a restart was not counted: the decision it may have recorded is attempt 1's.)
            attempt = max(before, 1)
            note, fresh = f"taking the decision attempt {attempt} recorded", False
        else:
            attempt = before + 1
            note, fresh = f"attempt {attempt} of {self.max_attempts}", self.audit_position is not None
        # (Taking a recorded decision keeps the attempt's audit_from: a second stop finds that record again.)
        task = self.store.transition(task_id, kpb.RUNNING, (kpb.QUEUED,), note, attempts=attempt,
                                     audit_from=self.audit_position() if fresh else None)
        if task is None:  # cancelled while queued
            return None
        try:
            outcome = self.run_fn(task)
        except UntilRestart as exc:
            return lambda why=str(exc): self._wait_for_restart(task_id, attempt, before, why)
        except TransientError as exc:
            return lambda failure=exc: self._after_transient(task_id, attempt, failure)
        except KernelError as exc:
            error = f"{exc.code}: {exc.message}"
            return lambda: self._fail(task_id, error)
        except Exception as exc:
            log.exception("task %s: attempt %d failed", task_id, attempt)
            error = f"{type(exc).__name__}: {exc}"
            return lambda: self._fail(task_id, error)
        if isinstance(outcome, WaitingForReview):
            if not outcome.review_id:
                return lambda: self._fail(task_id, "the pipeline asked for a review but gave no review id")

            def wait_for_review() -> None:
                if self.store.enter_waiting(task_id, outcome.review_id, outcome.decision) is None:
                    self._cancelled_while_running(task_id, outcome.review_id)

            return wait_for_review
        if isinstance(outcome, kpb.Decision):
            return lambda: self.store.transition(task_id, kpb.SUCCEEDED, (kpb.RUNNING,), "decided", decision=outcome)
        return lambda: self._fail(
            task_id, f"the pipeline returned {type(outcome).__name__}, not a Decision or WaitingForReview")

    def _cancelled_while_running(self, task_id: str, review_id: str) -> None:
        """The task was cancelled while this attempt ran, and the attempt opened ``review_id``.

        The cancel's hooks ran while the task had no review yet, so nothing
        withdrew it: they run again now, with the review named on the task
        they are given, so that nobody works a case whose task is gone.
        """
        task = self.store.get(task_id)
        if task.state != kpb.CANCELLED:  # (only a cancel moves a RUNNING task on without this worker)
            return
        cancelled = kpb.Task()
        cancelled.CopyFrom(task)
        cancelled.review_id = review_id
        self._run_cancel_hooks(cancelled)

    def _after_transient(self, task_id: str, attempt: int, exc: TransientError) -> None:
        # (a task whose attempt recorded its decision takes it at its next run, which is no new attempt)
        if attempt >= self.max_attempts and not (self.recorded is not None and self.recorded(task_id)):
            self._fail(task_id, f"gave up after {attempt} attempts; last error: {exc.message}")
            return
        delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        task = self.store.transition(task_id, kpb.QUEUED, (kpb.RUNNING,),
                                     f"attempt {attempt} failed ({exc.message}); retry in {delay:.3g} s",
                                     retry_in_s=delay)
        if task is not None:
            self._schedule(task_id, delay)

    def _wait_for_restart(self, task_id: str, attempt: int, before: int, why: str) -> None:
        # Not scheduled again: nothing this process runs can decide it now; _recover queues it at the next start.
        self.store.transition(task_id, kpb.QUEUED, (kpb.RUNNING,),
                              f"attempt {attempt} could not run ({why}); not counted: {WAITS_FOR_RESTART}",
                              attempts=before)

    def _fail(self, task_id: str, error: str) -> None:
        self.store.transition(task_id, kpb.FAILED, (kpb.RUNNING,), "failed", error=error)
