"""A group of finished decisions, decided at once: the policy vectorized per pipeline, the audit records
written together (one fsync), then reviews and idempotency entries — each failure kept to the rows it
belongs to.

``DecisionEngine`` (flow.py) takes these as a mixin: ``finish(group)`` is what the decision finisher
thread (finisher.py) and a lone request that never ran call. Kept apart from flow.py's per-request
entry points so each file stays about one step of a decision.
"""

from __future__ import annotations

import logging
import time
from math import isfinite
from typing import TYPE_CHECKING

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..accel import decision_wire
from ..audit.errors import AuditTimeout
from ..audit.record import RecordWithTail
from ..decision_wire import reasons_bytes
from ..observability.log_budget import budget_for, not_logged
from ..errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    ModelRefusedInput,
    KernelError,
    Unavailable,
    quote,
)
from ..ids import random_hex
from ..scheduling.types import NO_DEADLINE
from ..store.faults import RETRY_AFTER_MS, StoreBusy
from ..store.idempotency import MAX_UNWRITTEN
from . import provenance
from .slow_records import complete_later
from .spec import Pipeline

if TYPE_CHECKING:
    from .flow import Pending

log = logging.getLogger("aios.decisions")

# Review rows waiting in memory beyond which a group stores its own before answering (so a review store
# that keeps failing fails the decisions, as it did before rows were stored in the background).
MAX_REVIEW_BACKLOG = 50_000
# ... and bytes of them (the decision and the request, free text included, at up to 1 MiB a text field): 50,000 rows
# of large free text held GBs. Past either, new decisions are refused at entry (``refuse_if_reviews_backlogged``).
MAX_REVIEW_BACKLOG_BYTES = 64 << 20
RECORDED_TRAILER = "aios-audit-sequence"


def recorded_at(sequence: int) -> tuple[tuple[str, str], ...]:
    """The trailer of an error answer whose decision was made and recorded all the same (made after its deadline;
    its review could not be stored): a program tells it from "nothing was decided" without reading the text."""
    return ((RECORDED_TRAILER, str(sequence)),)


def _late_answer(pending: Pending, decision: kpb.Decision, what: str, key_lost: bool) -> DeadlineExceeded:
    """DEADLINE_EXCEEDED for ``decision``, recorded but not to be acted on: ``what`` happened to it (it "was
    made ... and recorded at audit sequence ...", or "was recorded at ..., but its answer was ready ..."), and
    how to get it back; ``key_lost``: its idempotency entry could not be stored."""
    key = pending.request.idempotency_key
    if not key:
        then = ("it stands on the record (a retry without an idempotency_key makes another decision; "
                "send one to get this decision back on a retry)")
    elif key_lost:
        then = "its idempotency entry could not be stored, so a retry with the same key decides again"
    else:
        then = f"a retry with the same idempotency_key ({quote(key)}) returns it"
    review = f", escalated to review {decision.review_id}" if decision.review_id else ""
    return DeadlineExceeded(f"decision {quote(decision.request_id)} {what} (action {decision.action!r}{review}); "
                            f"{then}", trailers=recorded_at(decision.audit_sequence))


class GroupFinish:
    """The per-group steps of ``DecisionEngine`` (its attributes: services, _statics, _review_rows, ...)."""

    # -- per group -------------------------------------------------------------------
    def finish(self, group: list[Pending]) -> list[kpb.Decision | KernelError]:
        """Decide every finished request of ``group``: policy per pipeline at once, audit together.

        Decided, then audited (records queued together, waited for together),
        then the reviews opened and the answers checked against their deadlines.

        One row's failure is that row's alone: a policy pass that raises is
        retried in halves down to the rows that raise by themselves
        (``_decide_apart``), so other pipelines' rows and the row's own
        neighbours are decided as usual; a recorded decision whose review or
        idempotency entry cannot be stored is answered for what it is
        (``_complete``), never as a write that kept nothing.
        """
        results: list = [None] * len(group)
        by_pipeline: dict[tuple[int, int], list[int]] = {}
        for index, pending in enumerate(group):
            error = pending.item.error
            if error is not None:
                results[index] = self._failed(pending, error)
                continue
            # One policy pass per pipeline version *and* model version: during a model swap a group can
            # hold both, and each is read with its own output labels.
            by_pipeline.setdefault((id(pending.pipeline), id(pending.item.model)), []).append(index)
        for indices in by_pipeline.values():
            rows = [group[i] for i in indices]
            try:  # (free until it catches: the common path runs exactly as before)
                decided = self._decide(rows)
            except Exception as exc:  # one row's fault: no other pipeline's rows, and only its own rows, get it
                decided = self._decide_apart(rows, exc)
            for i, decision in zip(indices, decided):
                results[i] = decision
        keying = None
        # The "audit" phase: the records built, written and (fsync mode) flushed, and the reviews opened (a
        # statistics audit: the clock once started after the write and fsync, so a slow disk showed only in
        # "total").
        audit_started = time.monotonic_ns()
        tickets = None
        try:
            decided, tickets, opening, keying = self._audit(group, results)
            return self._complete(group, results, decided, tickets, opening, audit_started)
        except AuditTimeout:
            if tickets is None:
                raise
            # Taken, not yet durable: answered as such, completed once durable (slow_records.py), keys held till then.
            answers = complete_later(self, group, results, decided, tickets, opening, keying, audit_started)
            keying = None  # (the completion unregisters it)
            return answers
        except KernelError as exc:  # the group failed as a whole (the audit log stopped): each is a failed decision
            # (``_complete`` counts the groups that get this far; these were answered with the error and counted
            # nowhere: ListPipelines and the metrics said 0 failed while every decision failed.)
            self.tally.add(group, [exc] * len(group), None)
            raise
        finally:  # every answer that will be stored under its key is stored by now: the keys are free
            self._stored(keying)
            for pending in group:
                if pending.claim is not None:
                    self.release(pending)

    def _failed(self, pending: Pending, error: BaseException) -> kpb.Decision | KernelError:
        """A request whose model work failed: the error, or for a model fault the pipeline's fallback."""
        if not isinstance(error, KernelError):
            error = KernelError(str(error))
        # A model fault (not the caller's deadline or a full queue) takes the pipeline's fallback; so does an input
        # the model refused at run time, which the pipeline built from fields that passed its checks (a pipeline
        # author's walk-through: onnxruntime's own message reached the caller as INVALID_ARGUMENT).
        fault = error.code == "INTERNAL" or isinstance(error, ModelRefusedInput)
        return self._fallback(pending, error) if pending.pipeline.fallback_action and fault else error

    def _fallback(self, pending: Pending, error: KernelError) -> kpb.Decision:
        """The pipeline's fallback decision for a request whose model failed: FALLBACK, sent to a human."""
        pipeline, mv, request = pending.pipeline, pending.item.model, pending.request
        policy = pipeline.policy
        decision = kpb.Decision(
            request_id=pending.request_id, action=pipeline.fallback_action, outcome=kpb.FALLBACK,
            input_hash=pending.input_hash,
            tenant=request.tenant, idempotency_key=request.idempotency_key, policy_name=policy.name,
            policy_hash=policy.hash, policy_version=str(policy.version), pipeline=pipeline.name,
            pipeline_version=pipeline.hash,
        )
        decision.reasons.add(rule_id="FALLBACK", description="the model failed; the pipeline's fallback action")
        decision.escalation_reasons.append(f"model fault: {error.message}")
        model = decision.model
        model.model_name, model.model_version, model.route_arm = mv.name, mv.version, "fallback"
        model.model_sha256 = _model_sha256(mv)
        item = pending.item
        timings = decision.phase_timings_ns
        timings["validate"] = pending.prepared_ns - pending.started_ns
        if item.started_ns:  # the model ran (and failed): its queue and model time, as a decided request's
            timings["queue"] = max(0, item.started_ns - item.enqueued_ns)
            timings["model"] = int(sum(item.timings))
        return decision

    def _static(self, pipeline: Pipeline, mv) -> "_Statics":
        """What every decision of (pipeline, model version) shares, computed once."""
        key = (pipeline.hash, pipeline.policy.hash, id(mv), _model_sha256(mv))  # (an id a retired version had)
        found = self._statics.get(key)
        if found is None:
            found = _Statics(pipeline, mv)
            if len(self._statics) > 64:  # old pipeline versions; cheap to recompute
                self._statics.clear()
            self._statics[key] = found
        return found

    def _decide(self, group: list[Pending]) -> list[kpb.Decision | KernelError]:
        """Decide a group of one pipeline and model version: one policy pass, then each Decision.

        With the audit log on, each Decision is built inside its audit record
        (``pending.record``), which the answer then shares instead of copying.
        """
        pipeline = group[0].pipeline
        policy_started = time.monotonic_ns()
        mv = group[0].item.model
        static = self._static(pipeline, mv)
        decision_fields = decision_wire.decision_fields
        labels, out_index, score_names = static.labels, static.out_index, static.score_names
        template, record_template, entries = static.template, static.record_template, static.entries
        # Per row in plain Python, the model's outputs joined to the row's fields: for the few rows of a
        # group this is cheaper than numpy columns, and it lets the policy take its compiled one-pass
        # row reader (measured: 21 vs 40 µs per policy call at 6 rows).
        rows, score_rows, confidences, finite = [], [], [], []
        for pending in group:
            scores = pending.item.outputs[out_index].ravel().tolist()
            ok = all(map(isfinite, scores))
            if not ok:  # a model fault for this request alone: its neighbours are still decided
                scores = [0.0] * len(scores)
            best = scores.index(max(scores))  # the first maximum, as numpy's argmax
            row = dict(pending.values)  # (outputs win over a field of the same name, as before)
            row["label"] = labels[best]
            row["confidence"] = confidence = scores[best]
            for name, value in zip(score_names, scores):
                row[name] = value
            rows.append(row)
            score_rows.append(scores)
            confidences.append(confidence)
            finite.append(ok)
        result = pipeline.policy.evaluate_rows(rows)
        policy_ns = time.monotonic_ns() - policy_started  # the group's pass, whole, as "model" is the batch's
        minimum = pipeline.escalation.min_confidence
        errors = getattr(result, "error", None)
        actions, escalates, fired_rules = result.action.tolist(), result.escalate.tolist(), result.fired
        adjusts = result.adjust.tolist() if result.adjust.any() else None  # (most policies never adjust)
        audited = self.services.audit is not None
        decisions: list = []
        for k, pending in enumerate(group):
            if not finite[k]:
                skipped = budget_for(mv, "non_finite").take()  # (a model that returns NaN does so for many requests)
                (log.debug if skipped is None else log.error)(
                    "model %s/%s returned non-finite scores for request %r%s", mv.name, mv.version, pending.request_id,
                    not_logged(skipped or 0))
                decisions.append(self._failed(pending, Internal(
                    f"model {mv.name}/{mv.version} returned non-finite scores (request id {pending.request_id})")))
                continue
            request = pending.request
            if audited:  # (the fields provenance.new_record sets, from the static template)
                record = pending.record = kpb.AuditRecord()
                record.MergeFrom(record_template)
                record.principal = pending.principal
                if request.tenant:
                    record.tenant = request.tenant
                record.request_id = pending.request_id
                if request.idempotency_key:
                    record.idempotency_key = request.idempotency_key
                decision = record.decision
                pending.outputs = (entries, score_rows[k])  # (with the inputs and task id: the record's tail, in _audit)
            else:
                decision = kpb.Decision()
                decision.CopyFrom(template)
            conf = confidences[k]
            fired = fired_rules[k]
            why = []
            if errors is not None and errors[k]:
                why.append(f"the policy could not decide: {errors[k]}")
            if escalates[k]:  # (under COLLECT, only the rules that asked, of all that fired; else all of them)
                asked = [rule_id for rule_id in fired if pipeline.policy.rule(rule_id).escalate]
                # A UNIQUE conflict escalates by itself (said above): its rules asked for nothing unless they did.
                if asked or not (errors is not None and errors[k]):
                    why.append("a policy rule asked for review: " + ", ".join(asked or fired))
            if conf < minimum:
                why.append(f"model confidence {conf:.3f} is below the pipeline's {minimum:g}")
            item = pending.item
            # Every per-request field in one merge (kernel/decision_wire.py says why).
            decision.MergeFromString(decision_fields(
                pending.request_id, actions[k], pending.input_hash, request.tenant, request.idempotency_key,
                static.reasons(fired), bool(why), conf, labels, score_rows[k], why,
                pending.prepared_ns - pending.started_ns,
                max(0, (item.started_ns or item.enqueued_ns) - item.enqueued_ns), int(sum(item.timings)), policy_ns))
            if adjusts is not None and adjusts[k]:  # the policy's score adjustment, on the answer and the record
                decision.score_adjustment = adjusts[k]
            decisions.append(decision)
        return decisions

    def _decide_apart(self, group: list[Pending], exc: Exception) -> list[kpb.Decision | KernelError]:
        """``_decide`` for a ``group`` whose pass just raised ``exc``: each half decided again, and a half
        that raises split again, down to the rows that raise alone; only those get the error (the kernel's
        rule for model batches too: one poisoned request must not take down the others). A bad row costs
        about 2·log2(n) extra passes, and none runs unless a pass raised. Logged once: a line with the
        traceback per row that gets INTERNAL, one line for the rows refused with a KernelError."""
        refused: list = []
        decided = self._bisect(group, exc, refused)
        if refused:
            pending, error = refused[0]
            log.warning("pipeline %s could not decide %d of %d requests of a group (request %r: %s: %s%s)",
                        pending.pipeline.name, len(refused), len(group), pending.request_id, error.code,
                        error.message, "; and others" if len(refused) > 1 else "")
        return decided

    def _bisect(self, group: list[Pending], exc: Exception, refused: list) -> list:
        if len(group) == 1:
            return [self._undecidable(group[0], exc, refused)]
        half = len(group) // 2
        decided: list = []
        for part in (group[:half], group[half:]):
            try:
                decided += self._decide(part)
            except Exception as part_exc:
                decided += self._bisect(part, part_exc, refused)
        return decided

    @staticmethod
    def _undecidable(pending: Pending, exc: Exception, refused: list | None = None) -> KernelError:
        """The answer for a row that cannot be decided (its policy pass raises even alone) or recorded:
        a KernelError as it is (a value the policy refuses names its field; listed in ``refused`` for the
        caller to log, else logged here), anything else INTERNAL with the request id that the logged
        traceback carries too."""
        pending.record = pending.outputs = None  # (half built by the pass that raised)
        if isinstance(exc, KernelError):
            if refused is not None:
                refused.append((pending, exc))
            else:
                log.warning("pipeline %s could not decide request %r: %s: %s", pending.pipeline.name,
                            pending.request_id, exc.code, exc.message)
            return exc
        log.error("pipeline %s could not decide request %r", pending.pipeline.name, pending.request_id, exc_info=exc)
        return Internal(f"internal error (request id {pending.request_id}); the kernel keeps serving")

    def _audit(self, group: list[Pending], results: list) -> tuple[list, list, object]:
        """Name each escalated decision's review and queue every decision's audit record.

        An escalated decision gets its review id first, so its audit record
        names the review; ``_complete`` opens the review once the record is
        durable and points it back at the record (audit sequence and hash),
        which is what links the reviewer's resolution to the decision it
        overrides. A crash in between leaves a recorded, never acknowledged
        decision; the caller's retry decides again.
        """
        reviews, audit = self.services.reviews, self.services.audit
        decided, records = [], []
        for index, (pending, decision) in enumerate(zip(group, results)):
            if isinstance(decision, KernelError):  # (isinstance on a message class goes through ABCMeta: slow)
                continue
            if reviews is not None and decision.outcome in (kpb.ESCALATED, kpb.FALLBACK):
                # Time first: new rows land at the right edge of the store's review_id index (a random
                # id touched a random index page per insert), and ids sort by creation.
                decision.review_id = f"{time.time_ns():016x}{random_hex()}"
            if audit is not None:
                record = pending.record
                try:  # (free until it catches) a record that cannot be built fails its decision alone
                    if record is None:  # a fallback decision, built on its own
                        record = pending.record = provenance.decision_record(decision, pending.principal)
                        if pending.task_id:
                            record.task_id = pending.task_id
                        provenance.add_inputs(record, pending.request, pending.values, pending.digests)
                        if pending.request_hash:
                            record.request_hash = bytes.fromhex(pending.request_hash)
                    else:  # built by _decide: its inputs, scores and task id go in as bytes
                        entries, scores = pending.outputs
                        record = RecordWithTail(record, provenance.decision_tail(
                            pending.request, pending.values, pending.digests, scores, entries, pending.task_id,
                            pending.request_hash))
                except Exception as exc:
                    results[index] = self._undecidable(pending, exc)
                    continue
                decided.append(decision)
                records.append(record)
        opening = keying = None
        if not records:
            return decided, [], None, None
        if self.services.idempotency is not None and any(p.request_hash for p in group):
            # Registered before the append, as a group opening reviews is: the mark below which every
            # keyed decision's entry is stored (or is stored again at start from its record, which names
            # its request's hash: DecisionSide._reopen_from_records) must never pass a group still storing.
            keying = object()
            with self._opening_lock:
                self._opening[keying] = audit.size
        if reviews is not None and any(d.review_id for d in decided):
            # Registered before the append: the mark that says "every escalation below this sequence
            # has its review row" must never pass a group still opening its reviews. The durable size
            # now is a lower bound of the group's first sequence, which is all the mark needs.
            opening = object()
            with self._opening_lock:
                self._opening[opening] = audit.size
        try:
            # Written on this thread (the finisher waits for it anyway) unless another group is being written.
            tickets = audit.append_many(records, write_here=True)
        except BaseException:
            self._stored(opening, keying)
            raise
        # opening, keying: the group's tokens in _opening while its reviews, its idempotency entries are stored
        return decided, tickets, opening, keying

    def _complete(self, group: list[Pending], results: list, decided: list, tickets: list,
                  opening, audit_started: int, wait_s: float | None = -1.0) -> list[kpb.Decision | KernelError]:
        """Wait for the audit records (``wait_s``, by default ``audit_timeout_s``), open the reviews, answer (the
        end of ``finish``).

        From here on each decision is recorded: a review or idempotency entry
        that cannot be stored fails (or, for the idempotency entry, only logs)
        that decision alone, with an answer that says it was recorded.
        """
        reviews, store = self.services.reviews, self.services.idempotency
        if wait_s == -1.0:
            wait_s = self.services.audit_timeout_s
        for decision, ticket in zip(decided, tickets):
            sequence, digest = ticket.wait(wait_s)
            decision.audit_sequence = sequence
            decision.audit_hash = digest.hex() if isinstance(digest, bytes) else str(digest)
        escalated = [index for index, decision in enumerate(results)
                     if not isinstance(decision, KernelError) and decision.review_id]
        deferred = None
        if escalated:
            rows = []
            for index in escalated:
                pending, decision = group[index], results[index]
                rows.append((decision, pending.request, pending.pipeline.escalation.review_actions,
                             pending.pipeline.escalation.review_sla_s, pending.task_id, decision.review_id,
                             pending.record.time_unix_ns if pending.record is not None else 0,  # dated by its record
                             provenance.defaulted_values(pending.request, pending.values)))  # what the case left out
            if opening is not None and not any(group[index].task_id for index in escalated):
                # Every record is written before its answer (and fsynced, in the default mode), so its
                # review row needs no fsync and need not even be stored before the answer: a lost row
                # is reopened from its record at start (kernel/review/reopen.py), and every read of the
                # queue waits for the rows queued before it (kernel/review/deferred.py). Its group stays
                # in _opening until stored. In "async" mode the same holds for a crash of the kernel
                # process (the written record survives it); a power cut that takes the newest records
                # takes their decisions' rows with them, as that mode allows. (An fsync of the rows
                # there was the one fsync per group that mode otherwise saves: bench/RESULTS.md.)
                deferred = rows
            else:  # one transaction (one group-committed fsync) for the group's reviews; tasks reopen their own
                try:
                    opened = reviews.create_many(rows, durable=True)
                except Exception as exc:  # (its group stays in _opening: the mark stays below its records)
                    self._unreviewed(group, results, escalated, exc)
                else:
                    if opening is not None:
                        self._stored(opening)
                    for index, review in zip(escalated, opened):
                        results[index].review_id = review.review_id  # a re-run task finds the review it opened
        now = time.monotonic_ns()
        audit_ns = now - audit_started  # the group's, whole: each of its decisions waited for all of it
        keyed = late = None
        for index, (pending, decision) in enumerate(zip(group, results)):
            if isinstance(decision, KernelError):  # (isinstance on a message class goes through ABCMeta: slow)
                continue
            decision.phase_timings_ns["audit"] = audit_ns
            decision.phase_timings_ns["total"] = now - pending.started_ns
            deadline = pending.item.deadline_ns
            if deadline != NO_DEADLINE and now > deadline:
                # Recorded (the decision was made) but too late to be acted on: answered DEADLINE_EXCEEDED
                # (``_too_late``), yet stored under its key like any other (its Decision stays in ``results``
                # until then), so that a retry with the key replays it instead of deciding and reviewing again.
                if late is None:
                    late = []
                late.append((index, now - deadline))
            if store is not None and pending.request.idempotency_key:
                if keyed is None:
                    keyed = []
                keyed.append(index)
        if deferred is not None:  # queued once every decision is final: the proposed decision is the answer as sent
            if not self._reviews_backlogged():
                self._review_rows.add(deferred, opening, sum(row[0].ByteSize() + row[1].ByteSize() for row in deferred))
            else:  # the store has been failing for a while: no more answers whose reviews only memory holds
                try:
                    reviews.create_many(deferred, durable=True, answer=False)
                except Exception as exc:  # (its group stays in _opening: reopened from its records at start)
                    self._unreviewed(group, results, escalated, exc)
                else:
                    self._stored(opening)
        unkept = ()
        if keyed is not None:  # last: only an answer that is final is stored under its key
            unkept = self._store_answers(group, results, keyed)
        self.tally.add(group, results, late)  # (before late decisions become DEADLINE_EXCEEDED: counted as made)
        if late is not None:
            self._too_late(group, results, late, unkept)
        return results

    def _reviews_backlogged(self) -> bool:
        """Whether the review rows waiting in memory for the store reached their bound (rows or bytes)."""
        rows = self._review_rows
        return rows.backlog >= MAX_REVIEW_BACKLOG or rows.backlog_bytes >= MAX_REVIEW_BACKLOG_BYTES

    def refuse_if_reviews_backlogged(self) -> None:
        """Refuse a new decision at entry (StoreBusy: UNAVAILABLE, retry-after-ms) while the review rows waiting in
        memory for a store that refuses writes are at their bound: decided, an escalated one would be answered
        UNAVAILABLE after it was recorded (its review could not be stored), inviting a retry that decides again."""
        rows = self._review_rows
        if rows is None or not rows.failing or not self._reviews_backlogged():
            return
        raise StoreBusy(f"this decision was not started: {rows.backlog} review rows ({rows.backlog_bytes >> 20} MiB) "
                        "wait in memory for the store, which has not taken them for a while (at most "
                        f"{MAX_REVIEW_BACKLOG} rows or {MAX_REVIEW_BACKLOG_BYTES >> 20} MiB are kept); retry after "
                        f"{RETRY_AFTER_MS} ms")

    @staticmethod
    def _too_late(group: list[Pending], results: list, late: list[tuple[int, int]], unkept) -> None:
        """Answer each decision that was recorded after its deadline (``(index, ns late)``) with
        DEADLINE_EXCEEDED saying what it was and where it stands: its caller must not act on a late
        answer, but must know that the decision exists, with its review, and how to get it back."""
        for index, overdue_ns in late:
            decision = results[index]
            if isinstance(decision, KernelError):  # its review or its key failed: that answer says so already
                continue
            results[index] = _late_answer(group[index], decision, f"was made {overdue_ns / 1e6:.1f} ms after its "
                                          f"deadline and recorded at audit sequence {decision.audit_sequence}",
                                          index in unkept)

    def in_time(self, pending: Pending, result):
        """``result`` (the finisher's, for ``pending``) as its caller may have it now, just before it goes to
        gRPC. The finisher checked the deadline once the record was durable, but the answer goes out later:
        after the lane woke its caller (a thread waiting for the GIL, the event loop), after the group's
        other answers. A decision whose deadline passed since is answered as one recorded late is, and
        counted late: never an answer its caller gave up on (a scheduler stress test got OK answers up to
        380 ms late; ModelInfer's ``InferenceService.answer`` makes the same check)."""
        if type(result) is not kpb.Decision:  # (an error already; isinstance on a message class is slow)
            return result
        deadline = pending.item.deadline_ns
        if deadline == NO_DEADLINE:
            return result
        overdue_ns = time.monotonic_ns() - deadline
        if overdue_ns <= 0:
            return result
        self.tally.add_late(pending.pipeline.name)
        # (an idempotency entry the store lost was logged as such when the group stored it)
        return _late_answer(pending, result, f"was recorded at audit sequence {result.audit_sequence}, but its "
                            f"answer was ready {overdue_ns / 1e6:.1f} ms after its deadline", False)

    def _unreviewed(self, group: list[Pending], results: list, indices: list[int], exc: Exception) -> None:
        """The reviews of these recorded, escalated decisions could not be stored: each fails with
        UNAVAILABLE saying it was recorded (where, with what action) and what became of its review.
        Logged once for all of them."""
        reason = exc.message if isinstance(exc, KernelError) else f"{type(exc).__name__}: {exc}"
        log.error("the reviews of %d recorded decisions could not be stored", len(indices), exc_info=exc)
        for index in indices:
            decision = results[index]
            if isinstance(decision, KernelError):
                continue
            then = ("the task fails and may be started again" if group[index].task_id else
                    "the review is reopened from that record when the kernel restarts")
            results[index] = Unavailable(
                f"decision {decision.request_id} was made and recorded at audit sequence {decision.audit_sequence} "
                f"(action {decision.action!r}, escalated to a person), but its review could not be stored "
                f"(the review store: {reason}); {then}", trailers=recorded_at(decision.audit_sequence))

    def _store_answers(self, group: list[Pending], results: list, keyed: list[int]) -> set[int] | tuple:
        """Store each keyed decision's answer under its idempotency key; returns the indices of those whose
        entry could not be stored (an empty tuple when all were).

        A decision recorded after its deadline is stored too (its answer is DEADLINE_EXCEEDED, set after
        this): its retry must get it back, not make a second decision and open a second review.

        A decision whose entry cannot be stored (a full disk) is still
        answered: it is made, its audit record is durable, and the entry
        serves only a retry. An error answer would invite exactly that retry
        (UNAVAILABLE is the code gRPC clients retry by themselves), which
        would decide again, write a second audit record and, for an
        escalation, open a second review: the duplicates the key exists to
        prevent. Its entry is kept in memory instead (``keep_unwritten``:
        retries get the answer back; the next write that succeeds stores it);
        only past ``MAX_UNWRITTEN`` such entries does a retry decide again.
        The failures are logged once in full (how many, the first key, why), then counted at most every 30 s,
        and once more when the store takes entries again. A key taken
        meanwhile by a different request is the caller's mistake and stays
        FAILED_PRECONDITION, saying that the decision was recorded.
        """
        store = self.services.idempotency
        unkept = None
        for index in keyed:
            pending, decision = group[index], results[index]
            if isinstance(decision, KernelError):  # (its review could not be stored: not answered, not kept)
                continue
            request = pending.request
            # The record the answer cites, or -1: unaudited (audit_mode off), it cites none, and its sequence 0
            # would read as record #0 seen by the store (a later start with the log on refused: "#0 lost").
            sequence = decision.audit_sequence if decision.audit_hash else -1
            try:
                store.put(request.tenant, request.idempotency_key, pending.request_hash, decision.SerializeToString(),
                          sequence)
            except FailedPrecondition as exc:
                results[index] = FailedPrecondition(
                    f"{exc.message} (this request was decided and recorded all the same: audit sequence "
                    f"{decision.audit_sequence}, action {decision.action!r})")
            except Exception as exc:
                if unkept is None:
                    unkept = []
                kept = store.keep_unwritten(request.tenant, request.idempotency_key, pending.request_hash,
                                            decision.SerializeToString(), sequence)
                unkept.append((index, request.tenant, request.idempotency_key, decision.audit_sequence, exc, kept))
        if unkept is None:
            self._unstored_answers.succeeded()  # (a no-op unless they failed: "... works again, after N failures")
            self._lost_answers.succeeded()
            return ()
        _, tenant, key, sequence, exc, _ = unkept[0]
        lost = {entry[0] for entry in unkept if not entry[5]}
        then = (f"kept in memory ({store.unwritten()} now), so a retry with one of their keys gets its answer back; "
                f"stored once the store takes writes again, or from their audit records at the next start"
                if not lost else
                f"{len(lost)} of them could not be kept in memory either ({MAX_UNWRITTEN} are): a retry with one of "
                f"those keys decides again")
        # Once in full, then a count at most every 30 s, and a line when the store takes them again: a full disk
        # fails every keyed group, and a line per group buried the log (a drill at 20 decisions/s: 856 ERROR lines
        # in 44 s; a storm at the kernel's full rate would be thousands a second).
        (self._lost_answers if lost else self._unstored_answers).failed(
            f"{len(unkept)} answered decisions' entries not stored (the first: tenant {tenant!r}, key {key!r}, audit "
            f"sequence {sequence}: {exc.message if isinstance(exc, KernelError) else f'{type(exc).__name__}: {exc}'}); "
            f"{then}", traceback=False)
        return lost or ()


class _Statics:
    """What every decision of one pipeline version and model version shares (``DecisionEngine._static``)."""

    __slots__ = ("labels", "out_index", "score_names", "template", "record_template", "entries", "_descriptions",
                 "_reasons")

    def __init__(self, pipeline: Pipeline, mv):
        self.labels = _labels(mv, pipeline.output)
        self.out_index = [spec.name for spec in mv.config.outputs].index(pipeline.output)
        self.score_names = tuple("score." + name for name in self.labels)
        policy = pipeline.policy
        self.template = template = kpb.Decision(
            outcome=kpb.AUTOMATED, policy_name=policy.name, policy_hash=policy.hash, policy_version=str(policy.version),
            pipeline=pipeline.name, pipeline_version=pipeline.hash)
        model = template.model
        model.model_name, model.model_version, model.route_arm = mv.name, mv.version, "primary"
        model.model_sha256 = _model_sha256(mv)
        # The audit record's static part too, decision template inside: one C-level merge per decision.
        self.record_template = kpb.AuditRecord(kind=kpb.DECISION, pipeline=pipeline.name,
                                               pipeline_version=pipeline.hash)
        self.record_template.decision.CopyFrom(template)
        self.entries = provenance.output_entries(self.labels)
        self._descriptions = {rule.id: rule.description for rule in policy.rules}
        self._reasons: dict[tuple, bytes] = {}

    def reasons(self, fired: tuple) -> bytes:
        """The ``reasons`` entries of the rules ``fired``, encoded once per distinct set of rules."""
        found = self._reasons.get(fired)
        if found is None:
            if len(self._reasons) >= 4096:  # (a table whose rules combine in very many ways: stay bounded)
                self._reasons.clear()
            found = self._reasons[fired] = reasons_bytes(fired, self._descriptions)
        return found


def _model_sha256(mv) -> str:
    """The SHA-256 of the model.onnx bytes ``mv`` was loaded from ("" for a model not loaded from a file)."""
    return getattr(getattr(mv, "runtime", None), "onnx_sha256", "") or ""


def _labels(mv, output: str) -> tuple[str, ...]:
    for spec in mv.config.outputs:
        if spec.name == output:
            return spec.labels
    raise FailedPrecondition(f"model {mv.name}/{mv.version} has no output '{output}'")
