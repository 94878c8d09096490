"""The decision flow: validate → (idempotency) → features → scheduler/model → policy → escalation → audit.

``prepare`` does the per-request work (validation, encoding, a work item
for the scheduler); the model runs through the same lanes as ModelInfer;
``finish`` does the per-batch work for a group of finished requests at once
(policy evaluated vectorized over the group, audit records appended
together and waited for together, so one group-commit fsync covers them).
A decision is returned only once its audit record is durable.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .stream_drains import StreamDrains
from .tally import DecisionTally
from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import (Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument, KernelError, NotFound,
                      Unavailable, quote)
from ..ids import random_hex
from ..limits import check_decision_request
from ..observability.repeats import RepeatedFailure
from ..review.deferred import DeferredRows
from ..scheduling import WorkItem
from ..scheduling.deadlines import request_deadline
from ..scheduling.types import ITEM_CANCELLED, ITEM_EXPIRED, ITEM_QUEUED
from ..store import request_hash as store_request_hash
from ..store.idempotency import matches as request_matches
from . import provenance
from .finisher import BatchFinisher
from .group_finish import GroupFinish
from .key_claims import KeyClaims
from .spec import Pipeline

log = logging.getLogger("aios.decisions")

ANONYMOUS = "anonymous"  # the principal until authentication lands
TASK_KEY_RETRY_MS = 1000  # retry hint for a Decide whose key an undecided task holds (a task waits in a queue)
TASK_CLAIM_WAIT_NS = 5 * 10**9  # a task's attempt waits this long for its key's claim (key_claims.py), then backs off


class Pending:
    """One decision between ``prepare`` and ``finish``."""

    __slots__ = ("request", "pipeline", "values", "digests", "input_hash", "item", "started_ns", "prepared_ns",
                 "request_id", "principal", "task_id", "request_hash", "record", "outputs", "result", "later", "watch",
                 "claim")

    def __init__(self, request, pipeline: Pipeline, values: dict, digests: dict, input_hash: str, item,
                 started_ns: int, request_id: str, principal: str, request_hash: str, claim=None):
        self.request = request
        self.pipeline = pipeline
        self.values = values
        self.digests = digests
        self.input_hash = input_hash
        self.item = item
        self.started_ns = started_ns
        self.prepared_ns = time.monotonic_ns()
        self.request_id = request_id
        self.principal = principal
        self.task_id = ""
        self.request_hash = request_hash
        self.record = None  # its audit record, once decided with the audit log on
        self.outputs = None  # (provenance.output_entries, class scores) for its record's tail (audit log on)
        self.result = None  # its Decision or KernelError, once finished by the lane (finish_batch)
        self.later = None  # the call's LaterAnswer when the finisher answers it (kernel/api/answer_later.py)
        self.watch = None  # its entry in the inference service's expiry timer, while answered later
        self.claim = claim  # its idempotency key's claim (key_claims.py), until its answer is stored


@dataclass(slots=True)
class Services:
    """The optional parts a decision touches; each may be None (then that step is skipped)."""

    audit: object = None  # kernel.audit.AuditLog
    reviews: object = None  # kernel.review.ReviewQueue
    idempotency: object = None  # kernel.tasks.IdempotencyStore
    audit_timeout_s: float = 10.0
    # (tenant, key) -> (task id, request hash) of a task holding that idempotency key that has not decided yet
    # (TaskStore.key_holder): a Decide with its key waits for (or is refused by) the task, never races it.
    task_key_holder: object = None


class DecisionEngine(GroupFinish):
    def __init__(self, registry, inference, services: Services | None = None):
        self.registry = registry
        self.inference = inference
        self.stream_drains = StreamDrains()  # the open DecideStreams, ended when the kernel stops
        self.services = services or Services()
        self._statics: dict = {}
        self._opening_lock = threading.Lock()
        # group token -> its first audit sequence, until its reviews (or its idempotency entries) are stored
        self._opening: dict[object, int] = {}
        self.claims = KeyClaims()  # idempotency keys whose decisions are being made (one decision per key)
        self.tally = DecisionTally()  # decisions per pipeline by outcome (ListPipelines)
        # Finishes unary decisions in groups (see finisher.py), and answers those whose callers left (answer_later)
        self.finisher = BatchFinisher(self.finish, self._answer_later)
        self._finish_later = self.finisher.submit
        # A store that cannot take the answers' idempotency entries (a full disk) fails every keyed group:
        # logged once, then counted (group_finish._store_answers).
        self._unstored_answers = RepeatedFailure(log, "storing the idempotency entries of answered decisions")
        self._lost_answers = RepeatedFailure(log, "keeping unstored idempotency entries in memory")
        self._review_rows = None
        if self.services.reviews is not None:
            self._review_rows = DeferredRows(self._store_review_rows)
            self.services.reviews.add_read_barrier(self._review_rows.settle, self._reviews_waiting)

    def close(self) -> None:
        """Finish the decisions handed to the finisher thread, store their review rows, stop both threads
        (before the audit log and the store close)."""
        self.finisher.close()
        if self._review_rows is not None:
            self._review_rows.close()

    # -- per request -------------------------------------------------------------
    def prepare(self, request, deadline_ns: int | None, principal: str = ANONYMOUS,
                arrived_ns: int | None = None, task_id: str = "") -> Pending | kpb.Decision:
        """Validate and encode ``request``; a Decision when the idempotency store already has the answer.

        ``arrived_ns``: when the call came in (the request's ``timeout_ms`` and the phase timings count
        from there); now if not known. ``task_id``: the task whose attempt this is (it holds its own key).
        """
        started = arrived_ns or time.monotonic_ns()
        # First, before the request is hashed, copied or stored: its identifiers and text within their limits.
        check_decision_request(request)
        pipeline = self.registry.get(request.pipeline)
        request_hash = ""
        claim = None
        if request.idempotency_key:
            request_hash = store_request_hash(request)
            if self.services.idempotency is not None:
                # Claimed before the store is read: a second call with the key, until this one's answer is
                # stored, is refused with a retry hint instead of deciding again (key_claims.py). (The call's
                # deadline only bounds how long a claim never released could hold the key.)
                claim = self.claims.claim(request.tenant, request.idempotency_key, request_hash, deadline_ns,
                                          wait_ns=TASK_CLAIM_WAIT_NS if task_id else 0)
        try:
            if claim is not None:
                replay = self._replayed(request, request_hash)
                if replay is not None:  # (before the deadline check: a retry gets a stored answer however late)
                    self.claims.release(claim)
                    return replay
                self._refuse_if_a_task_holds(request, request_hash, task_id)
                self.services.idempotency.check_writable(request.idempotency_key)  # (a replay above needs no write)
            self.refuse_if_reviews_backlogged()
            try:
                deadline = request_deadline(time.monotonic_ns(), deadline_ns,
                                            (request.timeout_ms or pipeline.timeout_ms) * 10**6, arrived_ns)
            except DeadlineExceeded:
                self._expired_before_queue(pipeline)
                raise
            digests = {}
            if request.text_fields:
                pipeline.check_text(request.text_fields)
                digests = provenance.text_digests(request.text_fields)
            # Validated values, the model row and the input hash in one pass (compiled: over the wire bytes).
            values, row, input_hash = pipeline.codec.read_encode_hash(request, digests)
            mv = self._model_of(pipeline)
            request_id = request.request_id or random_hex()
            priority = request.priority
            if not 1 <= priority <= mv.config.priority_levels:  # 0 or past the levels: the default, as ModelInfer's
                priority = pipeline.priority or mv.config.priority
            item = WorkItem(mv, 1, ((pipeline.width,),), {pipeline.input: row}, request_id=request_id,
                            priority=priority, deadline_ns=deadline, tenant=request.tenant)
        except BaseException:
            self.claims.release(claim)
            raise
        return Pending(request, pipeline, values, digests, input_hash, item, started, request_id, principal,
                       request_hash, claim)

    def _refuse_if_a_task_holds(self, request, request_hash: str, task_id: str) -> None:
        """A task that took this key and has not decided yet: its decision will be the key's answer. A Decide with
        another request is refused as StartTask refuses one (it would otherwise be decided, and the task fail on
        its own key: a test-port audit); one with the same request is ABORTED with a retry hint, as a Decide with
        the key in flight is."""
        holder = self.services.task_key_holder
        held = holder(request.tenant, request.idempotency_key) if holder is not None else None
        if held is None or held[0] == task_id:
            return
        key = quote(request.idempotency_key)
        if not request_matches(held[1], request, request_hash):
            raise FailedPrecondition(f"idempotency_key {key} already started task {held[0]} with a different "
                                     "request; use a new key for a new request")
        raise Aborted(f"idempotency_key {key} belongs to task {held[0]}, which has not decided yet; its decision "
                      f"answers this request: watch the task (WatchTask), or retry after {TASK_KEY_RETRY_MS} ms",
                      trailers=(("retry-after-ms", str(TASK_KEY_RETRY_MS)),))

    def check_task_key(self, request, request_hash: str) -> None:
        """StartTask's check of its key, made after the task store reserved it (``TaskStore.create``): a Decide
        deciding with it now, or one answered with it, for another request refuses the task. Decide checks the
        reservation after taking its claim, and stores its answer before releasing it, so of a Decide and a
        StartTask racing for one key with different requests exactly one is refused (a review audit: both were
        answered, and the task then failed on its own key)."""
        deciding = self.claims.held_hash(request.tenant, request.idempotency_key)
        if deciding is not None and not request_matches(deciding, request, request_hash):
            raise FailedPrecondition(f"request.idempotency_key {quote(request.idempotency_key)} is in use by a "
                                     "Decide with a different request; use a new key for a new request")
        self._replayed(request, request_hash)  # (raises for an answer stored under another request)

    def _expired_before_queue(self, pipeline: Pipeline) -> None:
        """Count a Decide whose deadline passed before it could start where a ModelInfer's is counted: its model's
        ``expired_before_queue`` (a statistics audit: 17 of 20 Decides answered DEADLINE_EXCEEDED were in no counter,
        neither the model's nor ListPipelines')."""
        try:
            mv = self._model_of(pipeline)
        except KernelError:  # (no model to count it on: the caller hears of the deadline all the same)
            return
        mv.stats.record_refused("expired_before_queue")

    def _model_of(self, pipeline: Pipeline):
        """The model version ``pipeline`` runs on. One that is not loaded (unloaded, being reloaded) while
        its pipeline serves is UNAVAILABLE, not NOT_FOUND: the pipeline is there and decides again once
        the model is loaded, so the caller should retry (NOT_FOUND says not to)."""
        try:
            # The version the pipeline was checked against: a newer one it was refused for never decides.
            return self.inference.resolve(pipeline.model, pipeline.bound_version or pipeline.model_version)
        except NotFound as exc:
            raise Unavailable(f"pipeline {quote(pipeline.name)} cannot decide now: {exc.message}; it decides again "
                              f"once the model is loaded") from None

    def release(self, pending: Pending) -> None:
        """``pending`` ends here (answered, refused, or abandoned): its idempotency key is free again.
        Every path that ends a prepared decision calls this (``finish`` for all it finishes); twice is harmless."""
        claim = pending.claim
        if claim is not None:
            pending.claim = None
            self.claims.release(claim)

    def recorded_before(self, exclude=()) -> int:
        """The audit sequence below which every escalated decision has its review row stored, and every keyed
        decision its idempotency entry.

        ``exclude``: the groups whose rows are being stored in the transaction
        asking (they are committed with the mark). Without the audit log, 0.
        """
        audit = self.services.audit
        if audit is None:
            return 0
        with self._opening_lock:
            durable = audit.size  # records at or past it are not durable yet: their groups are registered
            lows = [sequence for token, sequence in self._opening.items() if token not in exclude]
        # Answers whose entries the store refused (a full disk) are kept in memory, their groups' tokens released:
        # the mark passed them, and a kill (or a stop while the disk was still full) lost their keys for good (a
        # crash audit, by reading; a retry then decided again).
        store = self.services.idempotency
        unwritten = store.lowest_unwritten_sequence() if store is not None else None
        if unwritten is not None:
            lows.append(unwritten)
        return min(durable, *lows) if lows else durable

    def _reviews_waiting(self, review_id: str | None) -> int:
        """Review rows (of ``review_id``, or all) that the store would not take, waiting in memory."""
        if review_id is None:
            return self._review_rows.waiting()
        return self._review_rows.waiting(lambda row: row[5] == review_id)  # (row: group_finish's review row)

    def store_takes_writes(self, cause: str | None) -> None:
        """The store's refusal listener: once it takes writes again (``cause`` None), store what was kept in
        memory meanwhile at once (answers' idempotency entries, review rows), not at the next put or back-off."""
        if cause is not None:
            return
        if self.services.idempotency is not None:
            self.services.idempotency.flush_unwritten()
        if self._review_rows is not None:
            self._review_rows.retry_now()

    def _store_review_rows(self, items: list, groups: list) -> None:
        """DeferredRows' store: the review rows of ``groups`` (their tokens in ``_opening``), one transaction."""
        self.services.reviews.create_many(items, durable=False, recorded_before=lambda: self.recorded_before(groups),
                                          answer=False)
        self._stored(*groups)

    def _stored(self, *tokens) -> None:
        """These groups' review rows (or idempotency entries) are stored, or after a failed append will never
        be: unregister their tokens (None: a group that registered none)."""
        with self._opening_lock:
            for token in tokens:
                if token is not None:
                    del self._opening[token]

    def validate(self, request) -> None:
        """Refuse a request that could never be decided (identifiers or text over their limits, unknown
        pipeline, bad fields, a text field it does not take) before it is queued: StartTask's check, so a task
        stores no such request."""
        check_decision_request(request, "request.")
        if not request.pipeline:  # (named as StartTask's caller wrote it, not as Decide's field)
            raise InvalidArgument("request.pipeline is required: the name of the pipeline to run")
        pipeline = self.registry.get(request.pipeline)
        pipeline.codec.read(request.fields)
        if request.text_fields:  # (prepare's check: a text field the pipeline does not take is never decided)
            pipeline.check_text(request.text_fields)
        if request.idempotency_key:  # a key a Decide used with another request: the task would only fail later
            self._replayed(request, store_request_hash(request))

    def _replayed(self, request, request_hash: str) -> kpb.Decision | None:
        store = self.services.idempotency
        if store is None:
            return None
        found = store.get(request.tenant, request.idempotency_key)
        if found is None:
            return None
        stored_hash, response = found
        if not request_matches(stored_hash, request, request_hash):
            raise FailedPrecondition(
                f"idempotency_key {quote(request.idempotency_key)} was used before with a different request; "
                "use a new key for a new request"
            )
        decision = kpb.Decision.FromString(response)
        decision.replayed = True
        if request.request_id:  # this call's id, so a stream's caller can match it (audit_sequence finds the original)
            decision.request_id = request.request_id
        return decision

    def run_blocking(self, pending: Pending, on_wait=None) -> None:
        self.inference.run_blocking(pending.item, on_wait)

    def finish_in_groups(self, pending: Pending):
        """Mark ``pending``'s model work so the lane hands it to the finisher thread when it has run
        (``pending.result`` is set before its caller hears of it); returns the work item."""
        item = pending.item
        item.finisher, item.owner = self._finish_later, pending
        return item

    # -- entry points ---------------------------------------------------------------
    def decide(self, request, deadline_ns: int | None, principal: str = ANONYMOUS, on_wait=None,
               arrived_ns: int | None = None, admit=None) -> kpb.Decision:
        """One decision, blocking: what the unary Decide RPC calls.

        Once its model work has run, the lane hands it to the engine's
        ``BatchFinisher``, which decides and audits it with every other decision
        finished meanwhile and only then lets the lane wake this caller: one
        sleep per call. A request that never ran (expired, cancelled) is
        finished here, alone. ``admit(item)``, if given, may refuse the
        prepared request before it is queued (the front end's call budget).
        """
        pending = self.prepare(request, deadline_ns, principal, arrived_ns)
        if isinstance(pending, kpb.Decision):
            return pending
        try:
            if admit is not None:
                admit(pending.item)
            item = self.finish_in_groups(pending)
            try:
                self.run_blocking(pending, on_wait)
            finally:
                item.owner = None  # (no reference cycle left for the garbage collector)
            return self.answer(pending)
        finally:
            self.release(pending)  # (refused before it ran; otherwise finish released it already)

    def decide_later(self, request, deadline_ns: int | None, later, principal: str = ANONYMOUS,
                     arrived_ns: int | None = None, admit=None, on_queued=None):
        """``decide`` for a call answered later (kernel/api/answer_later.py): queue the decision and return
        ``later.defer()``; the finisher thread answers it with the rest of its group, so the caller's thread
        goes on at once instead of sleeping until then. ``on_queued(item)`` is called if the model work
        waits in the queue (the place to hook client cancellation). A replayed decision is returned."""
        pending = self.prepare(request, deadline_ns, principal, arrived_ns)
        if isinstance(pending, kpb.Decision):
            return pending
        item = pending.item
        try:
            if admit is not None:
                admit(item)
            self.answer_later(pending, later)
        except BaseException:  # refused at admission: nothing was queued
            self.release(pending)
            raise
        if on_queued is not None and item.state == ITEM_QUEUED:  # (without the lane's lock: at worst a no-op)
            on_queued(item)
        return later.defer()

    def answer_later(self, pending: Pending, later, inline: bool = True) -> None:
        """Queue ``pending``'s model work; the finisher decides it with its group and answers through
        ``later``: ``later.send(decision)``, or ``later.fail(error)`` (also for work that never ran).
        ``inline``: run the next batch on this thread if a lane slot is free (a unary call's handler);
        otherwise the lane's threads do (a stream's prepare task, which has more requests to take).
        Raises if admission refuses the work (nothing is queued then)."""
        item = pending.item
        self.finish_in_groups(pending)
        pending.later = later
        item.on_done = self._never_ran
        pending.watch = self.inference.watch_deadline(item)  # no caller wakes at its deadline: the timer does
        if inline:
            self.inference.run_or_queue(item, pending.watch)
        else:
            self.inference.submit(item, pending.watch)

    def _never_ran(self, item) -> None:
        """``on_done`` of a decision answered later: called by the lane (under its lock) when the item
        leaves it. One whose model ran was finished by the finisher already (``result`` set) and is
        answered there; one that never ran (expired, cancelled, unloaded) is handed to the finisher
        alone, where it may audit, as ``outcome`` would on the caller's thread."""
        pending = item.owner
        if pending is None or pending.result is not None:
            return
        if not self.finisher.submit([item], _no_lane_done):  # closing: its error, without the finisher
            pending.result = item.error
            self.release(pending)
            self._answer_later([pending])

    def abandon(self, pending: Pending) -> None:
        """The caller awaiting ``pending`` on the event loop left (grpc.aio cancelled its handler, after
        ``aio_wait.wait_finished`` took its item back from the queue if it still could). One that never ran is
        finished alone off the loop, as ``_never_ran`` finishes one answered later, which frees its idempotency
        key: nothing else would, and every retry with the key was refused ABORTED until its claim went stale.
        One that ran, or runs still, is its batch's finisher's."""
        if pending.item.state in (ITEM_CANCELLED, ITEM_EXPIRED):
            self._never_ran(pending.item)

    def _answer_later(self, group: list[Pending]) -> None:
        """Send the answers of the group's decisions whose callers did not wait (the finisher calls this
        once their results are set and the lane has finished their items)."""
        for pending in group:
            later = pending.later
            if later is None:
                continue
            pending.later = None
            if pending.watch is not None:
                self.inference.expiry.forget(pending.watch)
            pending.item.owner = None  # (no reference cycle left for the garbage collector)
            result = self.in_time(pending, pending.result)
            try:
                if result is None or isinstance(result, BaseException):
                    later.fail(result)
                else:
                    later.send(result)
            except Exception:  # one call's fault must not leave the rest of the group unanswered
                log.exception("answering decision %r failed", pending.request_id)

    def answer(self, pending: Pending) -> kpb.Decision:
        """``outcome``, for a caller about to hand it to gRPC: DEADLINE_EXCEEDED if the deadline passed since
        the decision was recorded (``in_time``)."""
        result = self.in_time(pending, self.outcome(pending))
        if isinstance(result, BaseException):
            raise result
        return result

    def outcome(self, pending: Pending) -> kpb.Decision:
        """The answer for ``pending`` once its model work is over: the finisher's result, or, for a
        request that never ran (expired, cancelled), one decided here alone (it may audit: blocking).
        A failure is raised."""
        result = pending.result
        if result is None:
            result = self.finish([pending])[0]
        if isinstance(result, BaseException):
            raise result
        return result


def _no_lane_done(items: list) -> None:
    """The finisher's ``done`` for an item the lane has already finished (it never ran)."""
