"""A task's cancel and its review's resolution have one winner, decided inside the store's transactions.

The decision layer withdraws a cancelled task's review, but only after the
cancel committed, and while the attempt that opened the review still runs
the task does not name it at all: a race audit had both a CancelTask and a
reviewer's ResolveReview answered OK, the approval recorded for a cancelled
claim. These drive the store directly (a real SQLite database, no hooks), so
that only the store's own checks stand between the two.
"""

from __future__ import annotations

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import FailedPrecondition
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.tasks import TaskStore


@pytest.fixture
def stores(tmp_path):
    db = open_database(tmp_path)
    queue, tasks = ReviewQueue(db), TaskStore(db)
    yield queue, tasks
    queue.close()
    db.close()


def running_task_with_claimed_review(queue: ReviewQueue, tasks: TaskStore, reviewer: str):
    request = kpb.DecisionRequest(pipeline="claims_triage", tenant="t", request_id="r1")
    task, _ = tasks.create(request)
    tasks.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), "attempt 1")
    decision = kpb.Decision(request_id="r1", action="approve", outcome=kpb.ESCALATED)
    review = queue.create(decision, request, ["approve", "deny"], 3600.0, task_id=task.task_id)
    queue.claim(review.review_id, reviewer)
    return task, review


def test_a_cancelled_task_s_review_cannot_be_resolved(stores):
    queue, tasks = stores
    task, review = running_task_with_claimed_review(queue, tasks, "ann")
    assert tasks.cancel(task.task_id).state == kpb.CANCELLED
    with pytest.raises(FailedPrecondition, match="its task .* was cancelled"):
        queue.resolve(review.review_id, "ann", "approve")
    assert queue.get(review.review_id).state != "RESOLVED"


def test_a_task_whose_review_was_resolved_cannot_be_cancelled(stores):
    queue, tasks = stores
    task, review = running_task_with_claimed_review(queue, tasks, "ann")
    queue.resolve(review.review_id, "ann", "deny")
    with pytest.raises(FailedPrecondition, match="can no longer be cancelled.*ann"):
        tasks.cancel(task.task_id)
    assert tasks.get(task.task_id).state == kpb.RUNNING


def test_a_withdrawn_review_does_not_hold_the_cancel(stores):
    queue, tasks = stores
    task, review = running_task_with_claimed_review(queue, tasks, "ann")
    queue.withdraw(review.review_id, "test")
    assert tasks.cancel(task.task_id).state == kpb.CANCELLED
