"""Durable task records: states, timestamped transitions, idempotent starts, watches.

Every state change is one atomic read-modify-write of the whole ``Task``
(with its ``history``), fsynced before it returns; concurrent changes share
one commit (group commit, ``kernel.store``). Each change is published to
watchers from the store's after-commit hook: once durable, in commit order.
Timestamps are wall-clock (``*_unix_ns``), for people; nothing here waits on
them.

    QUEUED → RUNNING → (WAITING_FOR_REVIEW) → SUCCEEDED | FAILED | CANCELLED
       ↑________|  (a transient failure goes back to QUEUED for a retry)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .. import paging
from ..errors import FailedPrecondition, InvalidArgument, NotFound, quote
from ..limits import MAX_TENANT_CHARS, check_identifier
from ..store import Feed, request_hash
from ..store.idempotency import matches as request_matches
from ..store.feed import FellBehind
from ..store.idempotency import check_key
from ..store.request_diff import describe, differing_parts
from ..store.sqlite_tasks import FINISHED

FINAL = FINISHED
ACTIVE = (kpb.QUEUED, kpb.RUNNING, kpb.WAITING_FOR_REVIEW)
CREATE_WAIT_NS = 10 * 10**9  # how long a StartTask waits for another one with its key to be stored (_reserve)
UNDECIDED = (kpb.QUEUED, kpb.RUNNING)  # a task whose decision is not stored under its idempotency key yet


def _missing(task_id: str) -> str:
    # The caller's id, quoted short: it may be any length (kernel/errors.py, ``quote``).
    return f"task {quote(task_id)} does not exist"


def state_name(state: int) -> str:
    return kpb.TaskState.Name(state)


# What a task watch that fell behind is told: a new watch is sent the task's current state first.
RESYNC = "watch the task again: a new watch is sent its current state first, then each change"


class TaskWatch:
    """A task's current state, then each change, ending after a final state (or ``close()``).

    Iterating raises DeadlineExceeded when ``timeout_s`` passes without a change, the
    store's error once ``TaskStore.end_watches`` ended it, and RESOURCE_EXHAUSTED
    (``FellBehind``) once more changes waited for its reader than the feed keeps.
    """

    __slots__ = ("_sub", "_first", "_revision", "_done")

    def __init__(self, sub, first: kpb.Task, revision: int):
        self._sub = sub
        self._first = first
        self._revision = revision
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> kpb.Task:
        if self._first is not None:
            task, self._first = self._first, None
            self._finish_if_final(task)
            return task
        if self._done:
            raise StopIteration
        while True:
            try:
                revision, task = next(self._sub)  # StopIteration once closed
            except FellBehind as exc:
                raise FellBehind(exc.behind, RESYNC) from None
            if revision <= self._revision:
                continue
            self._revision = revision
            self._finish_if_final(task)
            return task

    def _finish_if_final(self, task: kpb.Task) -> None:
        if task.state in FINAL:
            self._done = True
            self._sub.close()

    def close(self) -> None:
        self._done = True
        self._sub.close()


class TaskStore:
    """Tasks of one backend (``db.tasks``), with the state machine's transitions."""

    def __init__(self, db, clock: Callable[[], int] = time.time_ns):
        self._records = db.tasks
        self._clock = clock
        self._feed = Feed()
        # (tenant, key) -> (task id, request hash) for keyed tasks that have not decided yet (QUEUED, RUNNING):
        # until a task's decision is stored under its key, the idempotency store knows nothing of it, and a
        # Decide with the key would be decided and make the task fail on its own key (a test-port audit).
        self._undecided_keys: dict[tuple[str, str], tuple[str, str]] = {}
        self._keys_lock = threading.Lock()
        # Keys whose reserving task is being stored: (its task id, set once its insert is over).
        self._creating: dict[tuple[str, str], tuple[str, threading.Event]] = {}
        # Called with (request, request hash) once a new task's key is reserved, before the task is stored: raises
        # to refuse it (DecisionEngine.check_task_key: a Decide with the key and another request).
        self.check_key: Callable[[kpb.DecisionRequest, str], None] | None = None
        for task in self.in_states(UNDECIDED):
            if task.request.idempotency_key:
                self._undecided_keys[task.request.tenant, task.request.idempotency_key] = (
                    task.task_id, request_hash(task.request))

    def key_holder(self, tenant: str, key: str) -> tuple[str, str] | None:
        """(task id, request hash) of the task holding ``key`` for ``tenant`` that has not decided yet, or None."""
        return self._undecided_keys.get((tenant, key))

    # -- reading ----------------------------------------------------------------------------
    def get(self, task_id: str) -> kpb.Task:
        return self._get(task_id)[0]

    def _get(self, task_id: str) -> tuple[kpb.Task, int]:
        if not task_id:
            raise InvalidArgument("task_id is required")
        found = self._records.get(task_id)
        if found is None:
            raise NotFound(_missing(task_id))
        return found

    def list(self, tenant: str = "", states=(), page_size: int = 0, page_token: str = "") -> kpb.ListTasksResponse:
        """One page of tasks, oldest first: ``tenant``'s (any: ""), in any of ``states`` (any: none given)."""
        states = tuple(sorted(set(states)))
        for state in states:
            if state not in kpb.TaskState.values() or state == kpb.TASK_STATE_UNSPECIFIED:
                raise InvalidArgument(f"states: {state} is not a task state (QUEUED, RUNNING, WAITING_FOR_REVIEW, "
                                      f"SUCCEEDED, FAILED, CANCELLED)")
        check_identifier(tenant, "tenant", MAX_TENANT_CHARS)
        limit = paging.page_size(page_size)
        filters = (tenant, states)
        rows = self._records.page(tenant, states, paging.decode(page_token, filters), limit + 1)
        response = kpb.ListTasksResponse()
        response.next_page_token = paging.fill(rows, limit, filters, response.tasks.append)
        return response

    def in_states(self, states: tuple[int, ...]) -> list[kpb.Task]:
        return [task for task, _ in self._records.in_states(tuple(states))]

    def watch(self, task_id: str, timeout_s: float | None = None) -> TaskWatch:
        # Subscribe first, then read: a change published before the read is in what we read, one
        # published after reaches the subscription, and TaskWatch drops revisions it already has.
        sub = self._feed.subscribe(task_id, timeout_s=timeout_s)
        try:
            task, revision = self._get(task_id)
        except BaseException:
            sub.close()
            raise
        return TaskWatch(sub, task, revision)

    def watcher_count(self, task_id: str) -> int:
        """Open watches of one task (each WatchTask call holds one until it ends)."""
        return self._feed.subscriber_count(task_id)

    def end_watches(self, error: Callable[[], BaseException]) -> None:
        """End every watch, open or opened later, with ``error()`` after the task's state it was sent
        (the kernel is draining)."""
        self._feed.close(error)

    # -- writing ----------------------------------------------------------------------------
    def create(self, request: kpb.DecisionRequest) -> tuple[kpb.Task, bool]:
        """A new QUEUED task for ``request``; ``(task, created)``.

        A request with an idempotency key the tenant already used returns
        that task (``created=False``, and ``Task.replayed`` set on the copy
        returned, never stored) if the request is the same, and raises
        FAILED_PRECONDITION if it differs.
        """
        if not request.pipeline:
            raise InvalidArgument("request.pipeline is required")
        key = request.idempotency_key
        check_key(key, "request.idempotency_key")
        digest = request_hash(request) if key else ""
        now = self._clock()
        task = kpb.Task(task_id=uuid.uuid4().hex, state=kpb.QUEUED, created_unix_ns=now, updated_unix_ns=now)
        task.request.CopyFrom(request)
        if not task.request.request_id:  # made once, so every run of the task uses the same id
            task.request.request_id = uuid.uuid4().hex
        task.history.add(state=kpb.QUEUED, at_unix_ns=now, detail="started")
        reserved = self._reserve(task, digest) if key else False
        try:
            if reserved and self.check_key is not None:
                self.check_key(request, digest)
            stored, _revision, stored_hash, created = self._records.insert(task, digest, after_commit=self._publish)
        except BaseException:
            if reserved:
                self._release_key(task)
            raise
        finally:
            if reserved:
                self._created(task)
        if reserved and not created:  # the key's task was stored before (and has decided: it was not held)
            self._release_key(task)
        if not created:
            return self._replay(stored, stored_hash, request, digest), False
        return stored, True

    def started(self, request: kpb.DecisionRequest) -> kpb.Task | None:
        """The task ``request``'s idempotency key already started, as ``create`` answers it (``replayed`` set;
        FAILED_PRECONDITION naming it when the request differs), or None when the key started none (or there is
        no key). A retried StartTask is answered from here before the request is checked against the pipelines
        served now: the task it started stands, whatever changed since (its pipeline unloaded, a field dropped)."""
        key = request.idempotency_key
        if not key:
            return None
        check_key(key, "request.idempotency_key")
        found = self._records.by_key(request.tenant, key)
        if found is None:
            return None
        stored, stored_hash = found
        return self._replay(stored, stored_hash, request, request_hash(request))

    @staticmethod
    def _replay(stored: kpb.Task, stored_hash: str, request: kpb.DecisionRequest, digest: str) -> kpb.Task:
        if not request_matches(stored_hash, request, digest):
            raise FailedPrecondition(
                f"request.idempotency_key {quote(request.idempotency_key)} already started task {stored.task_id} "
                f"with a different request{describe(differing_parts(stored.request, request))}; use a new key for a "
                "new request"
            )
        replayed = kpb.Task()
        replayed.CopyFrom(stored)
        replayed.replayed = True  # the caller's answer says so; the stored task is unchanged
        return replayed

    def _reserve(self, task: kpb.Task, digest: str) -> bool:
        """Reserve the key of ``task`` (about to be stored) for it; False if another task holds it.

        Held from before the insert commits: no Decide slips in between. A StartTask that finds the key reserved
        by one still being stored waits for that insert first: inserting its own beside it, it could commit
        first, and the other, finding its key taken, then released the reservation that the stored, undecided
        task needed (a Decide with another request was then decided, and the task failed on its own key: a race
        audit); and the other may yet be refused (``check_key``), leaving the key to this one, which must then be
        checked too."""
        pair = (task.request.tenant, task.request.idempotency_key)
        give_up = time.monotonic_ns() + CREATE_WAIT_NS
        while True:
            with self._keys_lock:
                holder = self._undecided_keys.setdefault(pair, (task.task_id, digest))
                if holder[0] == task.task_id:
                    self._creating[pair] = (task.task_id, threading.Event())
                    return True
                storing = self._creating.get(pair, (None, None))[1]
            if storing is None or not storing.wait(max(0, give_up - time.monotonic_ns()) / 1e9):
                return False  # held by a stored task (or still being stored after CREATE_WAIT_NS): insert, find it

    def _created(self, task: kpb.Task) -> None:
        """The insert of ``task``, which reserved its key, is over (stored, found another, or failed)."""
        pair = (task.request.tenant, task.request.idempotency_key)
        with self._keys_lock:
            storing = self._creating.get(pair)
            if storing is None or storing[0] != task.task_id:  # (another task reserved it since: not ours to end)
                return
            del self._creating[pair]
        storing[1].set()

    def _release_key(self, task: kpb.Task) -> None:
        with self._keys_lock:
            where = (task.request.tenant, task.request.idempotency_key)
            held = self._undecided_keys.get(where)
            if held is not None and held[0] == task.task_id:
                del self._undecided_keys[where]

    def now(self) -> int:
        """The store's wall clock (ns): what ``next_attempt_unix_ns`` and the history's times were written by."""
        return self._clock()

    def transition(self, task_id: str, state: int, from_states: tuple[int, ...], detail: str = "", *,
                   attempts: int | None = None, decision: kpb.Decision | None = None, error: str | None = None,
                   review_id: str | None = None, audit_from: int | None = None,
                   retry_in_s: float | None = None) -> kpb.Task | None:
        """Move the task to ``state`` if it is in one of ``from_states``; None if it is not. ``retry_in_s``: the
        wait before its next attempt (``next_attempt_unix_ns``; any other transition clears it)."""
        def mutate(task: kpb.Task) -> bool:
            if task.state not in from_states:
                return False
            now = self._clock()
            task.state = state
            task.updated_unix_ns = now
            if attempts is not None:
                task.attempts = attempts
            if decision is not None:
                task.decision.CopyFrom(decision)
            if error is not None:
                task.error = error
            if review_id is not None:
                task.review_id = review_id
            if audit_from is not None:
                task.audit_from_sequence = audit_from
            task.next_attempt_unix_ns = now + round(retry_in_s * 1e9) if retry_in_s is not None else 0
            task.history.add(state=state, at_unix_ns=now, attempt=task.attempts, detail=detail)
            return True

        return self._update(task_id, mutate)

    def _update(self, task_id: str, mutate) -> kpb.Task | None:
        if not task_id:
            raise InvalidArgument("task_id is required")
        result = self._records.update(task_id, mutate, after_commit=self._publish)
        if result is None:
            raise NotFound(_missing(task_id))
        task, _revision, changed = result
        return task if changed else None

    def _publish(self, result) -> None:
        # Runs once the write is durable, on the committing thread, in commit order. ``result`` is
        # records.insert's (task, revision, hash, created) or records.update's (task, revision, changed).
        if result is not None and result[-1]:
            task, revision = result[0], result[1]
            if task.state not in UNDECIDED and task.request.idempotency_key:  # decided (its answer stored), or over
                self._release_key(task)
            self._feed.publish((revision, task), task.task_id, size=task.ByteSize)

    def cancel(self, task_id: str) -> kpb.Task:
        task = self.transition(task_id, kpb.CANCELLED, ACTIVE, "cancelled by a caller")
        if task is not None:
            return task
        final = self.get(task_id)  # not active means final, and final states never change
        raise FailedPrecondition(
            f"task {quote(task_id)} is already {state_name(final.state)}; only QUEUED, RUNNING or "
            "WAITING_FOR_REVIEW tasks can be cancelled"
        )

    # -- reviews ------------------------------------------------------------------------------
    def enter_waiting(self, task_id: str, review_id: str, proposed: kpb.Decision) -> kpb.Task | None:
        """RUNNING → WAITING_FOR_REVIEW; straight on to SUCCEEDED if the review was already resolved. None when the
        task is neither RUNNING nor already waiting on ``review_id`` (cancelled meanwhile).

        Called again for a task already waiting on ``review_id`` (the runner writes a refused outcome again: the
        move to WAITING committed, the move on to SUCCEEDED with a resolution parked meanwhile was refused by a
        busy store), it looks for that resolution again: the task waited for a review already resolved until a
        restart (a race review)."""
        task = self.transition(task_id, kpb.WAITING_FOR_REVIEW, (kpb.RUNNING,), f"waiting for review {review_id}",
                               decision=proposed, review_id=review_id)
        if task is None:
            task = self.get(task_id)
            if task.state != kpb.WAITING_FOR_REVIEW or task.review_id != review_id:
                return None
        # No lock between this and complete_from_review: each side commits its write durably, then
        # reads the other's, so at least one sees the other (both may; the WAITING → SUCCEEDED
        # compare-and-set lets only one finish the task).
        decision = self._records.completion(review_id)
        if decision is None:
            return task
        return self._finish_review(task_id, review_id, decision)

    def complete_from_review(self, review_id: str, decision: kpb.Decision, task_id: str = "") -> kpb.Task | None:
        """The review's resolution finishes the task waiting on it (WAITING_FOR_REVIEW → SUCCEEDED).

        Returns the task, or None when no task waits on ``review_id`` yet:
        the resolution is kept and finishes the task when it gets there
        (it may still be RUNNING, or the process may have died in between).
        A task already final is returned unchanged, so repeating is harmless.
        """
        if not review_id:
            raise InvalidArgument("review_id is required")
        if not isinstance(decision, kpb.Decision):
            raise InvalidArgument(f"decision must be a kernel_pb2.Decision, got {type(decision).__name__}")
        if task_id:
            task = self.get(task_id)
            if task.state in FINAL:
                return task
        self._records.put_completion(review_id, decision)  # committed before we look (see enter_waiting)
        found = self._records.waiting_on(review_id)
        if found is None:
            return self.get(task_id) if task_id else None
        return self._finish_review(found[0].task_id, review_id, decision)

    def _finish_review(self, task_id: str, review_id: str, decision: kpb.Decision) -> kpb.Task:
        action = decision.action or "(no action)"
        task = self.transition(task_id, kpb.SUCCEEDED, (kpb.WAITING_FOR_REVIEW,),
                               f"review {review_id} resolved: {action}", decision=decision)
        self._records.drop_completion(review_id)
        return task if task is not None else self.get(task_id)

    def apply_pending_reviews(self) -> int:
        """Finish waiting tasks whose review was resolved while no one could (after a crash); how many."""
        finished = 0
        for task in self.in_states((kpb.WAITING_FOR_REVIEW,)):
            decision = self._records.completion(task.review_id)
            if decision is not None:
                self._finish_review(task.task_id, task.review_id, decision)
                finished += 1
        return finished
