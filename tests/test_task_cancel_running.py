"""A task cancelled while its attempt runs: the review that attempt opens is withdrawn, never left for a reviewer.

The cancel lands while the task is RUNNING, so the task has no review yet when
the cancel's hooks run; the attempt then finishes with an escalated decision
and its review opened. Nobody may work that case: a reviewer who approved it
would put an approval of a cancelled claim on the audit log.

A real kernel serving the claims pipeline, called over gRPC. The only
stand-in is a fault injected on purpose: the attempt is held just after it
decided until the test has cancelled the task (a real cancel lands anywhere
in the attempt; this pins it to the one place that left the review open).
"""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from claims_support import claim_request, hold_attempts_after_deciding
from conftest import module_claims_kernel
from lane_support import until
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

TIMEOUT_S = 20


server, channel = module_claims_kernel()


def large_claim(tenant: str) -> kpb.DecisionRequest:
    case = dict(data.generate_cases(1, seed=5)[0], claim_amount=90000.0)  # R04: always seen by a human
    return claim_request(case, tenant=tenant)




def started_and_decided(tasks, reviews, decided, tenant: str) -> tuple[kpb.Task, kpb.Review]:
    """Start a large claim's task for ``tenant``; once its held attempt decided, the task and the review it opened
    (on the queue, not yet named by the task)."""
    task = tasks.StartTask(kpb.StartTaskRequest(request=large_claim(tenant)), timeout=TIMEOUT_S)
    assert decided.wait(TIMEOUT_S), "the attempt never decided"
    (review,) = reviews.ListReviews(kpb.ListReviewsRequest(tenant=tenant), timeout=TIMEOUT_S).reviews
    return task, review


def test_cancelling_a_running_task_withdraws_the_review_its_attempt_opens(server, channel, monkeypatch):
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    decided, go_on = hold_attempts_after_deciding(monkeypatch, server.decisions.tasks)
    try:
        task, review = started_and_decided(tasks, reviews, decided, "cancel-running")
        assert tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state == kpb.RUNNING
        # The attempt's escalation is on the queue, and the task does not name it yet.
        assert review.task_id == task.task_id and review.state == "OPEN"
        cancelled = tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
        assert cancelled.state == kpb.CANCELLED and cancelled.review_id == ""
    finally:
        go_on.set()  # the attempt ends now, with its escalated decision

    ref = kpb.ReviewRef(review_id=review.review_id)
    withdrawn = _until(lambda: (r := reviews.GetReview(ref, timeout=TIMEOUT_S)).state == "RESOLVED" and r,
                         "the cancelled task's review to be withdrawn")
    assert withdrawn.resolved_action == "" and withdrawn.resolved_by == "kernel"
    assert withdrawn.comment == f"withdrawn: task {task.task_id} was cancelled"
    open_now = reviews.ListReviews(kpb.ListReviewsRequest(tenant="cancel-running", state="UNRESOLVED"),
                                   timeout=TIMEOUT_S)
    assert list(open_now.reviews) == []
    with pytest.raises(grpc.RpcError) as info:  # a reviewer who finds the case anyway cannot take it
        reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review.review_id, reviewer="carol"), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"was withdrawn: task {task.task_id} was cancelled" in info.value.details()
    final = tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    assert final.state == kpb.CANCELLED and not final.HasField("decision")
    # No reviewer's resolution was recorded for it: the attempt's escalated decision, then its withdrawal, linked to
    # it, with no action, by the kernel (an operator walk-through: the escalation was left with no word of its end).
    records = [r for r in server.decisions.audit.read(from_sequence=0) if r.task_id == task.task_id
               or (r.kind == kpb.REVIEW_RESOLUTION and r.decision.review_id == review.review_id)]
    assert [r.kind for r in records] == [kpb.DECISION, kpb.REVIEW_RESOLUTION]
    decision, withdrawal = records
    assert withdrawal.decision.action == "" and withdrawal.principal == "kernel"
    assert withdrawal.has_link and withdrawal.links_to == decision.sequence
    assert withdrawal.decision.reasons[0].rule_id == "WITHDRAWN"
    assert json.loads(withdrawal.payload)["comment"] == f"withdrawn: task {task.task_id} was cancelled"


def _until(predicate, what: str):
    return until(predicate, what, TIMEOUT_S, every_s=0.02)


def test_a_review_resolved_before_its_task_names_it_refuses_the_cancel(server, channel, monkeypatch):
    """The other order (a race audit): a reviewer resolves the review while the attempt that opened it still runs;
    a cancel after that must be refused, not answered OK beside the reviewer's recorded approval."""
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    decided, go_on = hold_attempts_after_deciding(monkeypatch, server.decisions.tasks)
    try:
        task, review = started_and_decided(tasks, reviews, decided, "resolve-first")
        reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review.review_id, reviewer="dana"), timeout=TIMEOUT_S)
        resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(
            review_id=review.review_id, reviewer="dana", action=review.actions[0], comment="checked"), timeout=TIMEOUT_S)
        assert resolved.state == "RESOLVED"
        with pytest.raises(grpc.RpcError) as info:
            tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "can no longer be cancelled" in info.value.details() and "dana" in info.value.details()
    finally:
        go_on.set()
    final = _until(lambda: (t := tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)).state
                   == kpb.SUCCEEDED and t, "the task to finish with the reviewer's action")
    assert final.decision.action == review.actions[0] and final.decision.outcome == kpb.REVIEWED


def test_a_cancel_while_the_attempt_runs_withdraws_its_review_at_once(server, channel, monkeypatch):
    """The cancel finds the attempt's review by the task's id (the task does not name it yet): a reviewer
    cannot even claim it in the time the attempt still takes."""
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    decided, go_on = hold_attempts_after_deciding(monkeypatch, server.decisions.tasks)
    try:
        task, review = started_and_decided(tasks, reviews, decided, "withdraw-now")
        tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
        now = reviews.GetReview(kpb.ReviewRef(review_id=review.review_id), timeout=TIMEOUT_S)
        assert now.state == "RESOLVED" and now.resolved_action == "" and now.resolved_by == "kernel"
        with pytest.raises(grpc.RpcError) as info:
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review.review_id, reviewer="erin"),
                                timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        go_on.set()


def waiting_for_review(tasks, tenant: str) -> kpb.Task:
    """A large claim's task for ``tenant``, once it waits for its review (the review named on it)."""
    task = tasks.StartTask(kpb.StartTaskRequest(request=large_claim(tenant)), timeout=TIMEOUT_S)
    return _until(lambda: (t := tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)).state
                  == kpb.WAITING_FOR_REVIEW and t, "the task to wait for its review")


def test_a_cancel_that_fails_withdraws_nothing(server, channel, monkeypatch):
    """The review was withdrawn before the cancel was written: a cancel whose write then failed (a full disk) left
    the task waiting on a review nobody could resolve (a review audit). The withdrawal now follows the cancel."""
    from kernel.errors import Unavailable

    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    task = waiting = waiting_for_review(tasks, "cancel-fails")

    def full_disk(task_id):  # fault injected on purpose: the cancel's write fails
        raise Unavailable("the store cannot write: no space left on device (injected)")

    monkeypatch.setattr(server.decisions.tasks.store, "cancel", full_disk)
    with pytest.raises(grpc.RpcError) as info:
        tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    monkeypatch.undo()
    ref = kpb.ReviewRef(review_id=waiting.review_id)
    assert reviews.GetReview(ref, timeout=TIMEOUT_S).state == "OPEN"  # still the desk's to decide
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=waiting.review_id, reviewer="gil"), timeout=TIMEOUT_S)
    reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=waiting.review_id, reviewer="gil", action="deny",
                                                   comment="checked"), timeout=TIMEOUT_S)
    done = _until(lambda: (t := tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)).state
                  == kpb.SUCCEEDED and t, "the task to finish with the reviewer's action")
    assert done.decision.action == "deny"


def test_a_review_left_open_by_a_cancel_cut_short_is_withdrawn_at_the_next_start(claims_models, tmp_path,
                                                                                  monkeypatch):
    """(Crash audit) a kill between a cancel's commit and its withdrawal of the task's review left the review OPEN
    for good: claimable, never resolvable (the task is cancelled), no cancel possible (already CANCELLED). The next
    start withdraws it. The kill is stood in for by a withdrawal that fails (a fault injected on purpose: the same
    state, the cancel durable and the review not withdrawn), then a restart on the same data."""
    from conftest import start_claims_kernel

    def cut_short(*args, **kwargs):
        raise OSError("the kernel stopped here (injected)")

    kernel = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as chan:
            tasks = kgrpc.TaskServiceStub(chan)
            task = waiting = waiting_for_review(tasks, "cut-short")
            monkeypatch.setattr(kernel.decisions.reviews, "withdraw", cut_short)
            assert tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
            monkeypatch.undo()
            reviews = kgrpc.ReviewServiceStub(chan)
            assert reviews.GetReview(kpb.ReviewRef(review_id=waiting.review_id), timeout=TIMEOUT_S).state == "OPEN"
    finally:
        kernel.stop(grace=1)

    kernel = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as chan:
            reviews = kgrpc.ReviewServiceStub(chan)
            review = reviews.GetReview(kpb.ReviewRef(review_id=waiting.review_id), timeout=TIMEOUT_S)
            assert review.state == "RESOLVED" and review.comment.startswith("withdrawn: task ")
            assert not review.resolved_action
            with pytest.raises(grpc.RpcError) as info:
                reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=waiting.review_id, reviewer="gil"),
                                    timeout=TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            unresolved = reviews.ListReviews(kpb.ListReviewsRequest(tenant="cut-short", state="UNRESOLVED"),
                                             timeout=TIMEOUT_S)
            assert list(unresolved.reviews) == []
            # The withdrawal was recorded before the cut: the start withdrew the row and did not record it again.
            ends = [r for r in kernel.decisions.audit.read(from_sequence=0)
                    if r.kind == kpb.REVIEW_RESOLUTION and r.decision.review_id == waiting.review_id]
            assert len(ends) == 1 and ends[0].decision.action == ""
    finally:
        kernel.stop(grace=1)


def test_a_withdrawal_reached_twice_at_once_is_recorded_once(claims_models, tmp_path, monkeypatch):
    """(Session review) the cancel's hook and the attempt ending (it opened the review as the cancel landed) can
    both withdraw one review at the same moment: both recorded the withdrawal. A slow audit append (a fault
    injected on purpose) holds the window open that the race fell into."""
    import time as _time

    from conftest import start_claims_kernel
    from kernel.audit import AuditLog

    kernel = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as chan:
            tasks = kgrpc.TaskServiceStub(chan)
            task = waiting = waiting_for_review(tasks, "twice")
        kernel.decisions.tasks.store.cancel(task.task_id)  # (the store's cancel: no hook runs; the test runs two)
        real = AuditLog.append_and_wait

        def slow_resolutions(self, record, *args, **kwargs):
            if record.kind == kpb.REVIEW_RESOLUTION:
                _time.sleep(0.3)
            return real(self, record, *args, **kwargs)

        monkeypatch.setattr(AuditLog, "append_and_wait", slow_resolutions)
        withdraw = kernel.decisions._withdraw
        both = [threading.Thread(target=withdraw, args=(waiting.review_id, task.task_id, "cancelled"))
                for _ in range(2)]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join(TIMEOUT_S)
        monkeypatch.undo()
        ends = [r for r in kernel.decisions.audit.read(from_sequence=0)
                if r.kind == kpb.REVIEW_RESOLUTION and r.decision.review_id == waiting.review_id]
        assert len(ends) == 1
    finally:
        kernel.stop(grace=1)
