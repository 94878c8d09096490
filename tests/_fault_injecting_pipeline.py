"""A fault-injecting stand-in pipeline, for the unit tests of TaskRunner as a Python object (test_tasks_runner).

Those tests need outcomes a test sets per request: a given number of transient failures, a failure with a
given message, a chosen confidence. ``make_decide`` returns a ``run_fn`` for TaskRunner that decides by a
fixed rule of the request's fields (no model, no policy, no audit log), and ``wire_reviews`` does what
kernel/decisions.py does when a review is resolved (build the human's decision and finish the waiting task).

Nothing here is served over gRPC: the task and review RPCs are tested on a real kernel serving the claims
pipeline (test_tasks_grpc, test_review_grpc, test_tasks_restart, test_watch_backlog, test_review_desk,
test_task_retries, test_task_cancel_running, test_task_decided_once, test_retention), where the faults those
tests need are injected at the one place each happens and named so.

Fields the stand-in reads from ``DecisionRequest.fields``:

- ``amount`` (number): approve below 1000, deny from 1000;
- ``confidence`` (number, default 1.0): below 0.5 the case goes to review;
- ``transient_failures`` (int): fault: the first N attempts raise TransientError;
- ``fail`` (string): fault: raise InvalidArgument with this message.
"""

from __future__ import annotations

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import InvalidArgument, TransientError
from kernel.review import ReviewQueue
from kernel.tasks import TaskRunner, WaitingForReview

ACTIONS = ["approve", "deny"]
SLA_SECONDS = 3600.0


def number(request: kpb.DecisionRequest, name: str, default: float) -> float:
    value = request.fields.get(name)
    if value is None:
        return default
    return value.number_value if value.HasField("number_value") else float(value.int_value)


def proposed_decision(request: kpb.DecisionRequest) -> kpb.Decision:
    amount = number(request, "amount", 0.0)
    decision = kpb.Decision(
        request_id=request.request_id, action="approve" if amount < 1000 else "deny", outcome=kpb.AUTOMATED,
        pipeline=request.pipeline, tenant=request.tenant, idempotency_key=request.idempotency_key,
    )
    decision.model.confidence = number(request, "confidence", 1.0)
    return decision


def make_decide(queue: ReviewQueue, runs: list | None = None):
    """The stand-in pipeline: a run_fn for TaskRunner. ``runs`` (if given) collects (task_id, attempt)."""

    def decide(task: kpb.Task):
        request = task.request
        if runs is not None:
            runs.append((task.task_id, task.attempts))
        if "fail" in request.fields:
            raise InvalidArgument(request.fields["fail"].string_value)
        if task.attempts <= number(request, "transient_failures", 0):
            raise TransientError(f"model busy on attempt {task.attempts}")
        decision = proposed_decision(request)
        if decision.model.confidence < 0.5:
            decision.outcome = kpb.ESCALATED
            decision.escalation_reasons.append(f"confidence {decision.model.confidence:.2f} is below 0.5")
            review = queue.create(decision, request, ACTIONS, SLA_SECONDS, task_id=task.task_id)
            decision.review_id = review.review_id
            return WaitingForReview(review.review_id, decision)
        return decision

    return decide


def wire_reviews(queue: ReviewQueue, runner: TaskRunner) -> None:
    """What the decision layer does on a resolution: the human's decision finishes the task."""

    def on_resolved(review: kpb.Review) -> kpb.Decision:
        decision = kpb.Decision(
            request_id=review.request_id, action=review.resolved_action, outcome=kpb.REVIEWED,
            review_id=review.review_id, pipeline=review.pipeline, tenant=review.tenant,
        )
        decision.reasons.add(rule_id=f"reviewer:{review.resolved_by}", description=review.comment)
        if review.task_id:
            runner.complete_from_review(review.review_id, decision, task_id=review.task_id)
        return decision

    queue.on_resolved(on_resolved)
