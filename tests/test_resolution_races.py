"""Races around a resolution: a cancel of the waiting task, and the same resolution sent several times at once.

A reviewer's resolution and a CancelTask on the same waiting task have one winner.

Found by a tasks audit (2026-11-27): with the resolution's audit record being written, a cancel was answered
OK too: the task ended CANCELLED while the review was RESOLVED and the reviewer's decision sat on the audit log
with the task's id (7 of 10 races). A cancel now withdraws the review first, on the review's row, so whichever
comes first there wins and the other is refused with FAILED_PRECONDITION.

Found by a review-UI audit (2026-11-27): ten identical ResolveReview calls at once (a double click, a
retrying client) were all answered OK with six different audit sequences, and the log held ten
REVIEW_RESOLUTION records for one review; a watcher of updates was sent each resolution twice, the first
without its audited decision.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from lane_support import until

server, channel = module_claims_kernel("resolution_races")
TIMEOUT_S = 30


def _escalating(tenant: str) -> kpb.StartTaskRequest:
    case = dict(data.generate_cases(1, seed=3)[0], claim_amount=90000.0, customer_tier="gold")  # sent for review
    return kpb.StartTaskRequest(request=claim_request(case, tenant=tenant))


def _waiting_and_claimed(channel, tenant: str) -> kpb.Task:
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    task = tasks.StartTask(_escalating(tenant), timeout=TIMEOUT_S)
    waiting = until(lambda: (t := tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)).state
                    == kpb.WAITING_FOR_REVIEW and t, "the task to wait for its review")
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=waiting.review_id, reviewer="al"), timeout=TIMEOUT_S)
    return waiting


def _audit_kinds(server, task_id: str) -> list[str]:
    return [kpb.AuditKind.Name(r.kind) for r in server.decisions.audit.read(from_sequence=0) if r.task_id == task_id]


def test_a_cancel_while_the_resolution_is_being_recorded_is_refused(server, channel):
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    waiting = _waiting_and_claimed(channel, "resolve-first")
    # Fault injected on purpose: the resolution's follow-up (its audit record, the task's completion) waits
    # until the test has cancelled, holding the window the race fell into.
    queue = server.decisions.reviews
    hook, release, entered = queue._hooks[0], threading.Event(), threading.Event()

    def held_hook(review):
        entered.set()
        assert release.wait(TIMEOUT_S)
        return hook(review)

    queue._hooks[0] = held_hook
    try:
        resolving = reviews.ResolveReview.future(kpb.ResolveReviewRequest(
            review_id=waiting.review_id, reviewer="al", action="approve"), timeout=TIMEOUT_S)
        assert entered.wait(TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as refused:
            tasks.CancelTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S)
    finally:
        release.set()
        queue._hooks[0] = hook
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert "resolved by al" in refused.value.details() and "can no longer be cancelled" in refused.value.details()
    assert resolving.result().resolution.action == "approve"
    done = until(lambda: (t := tasks.GetTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S)).state
                 == kpb.SUCCEEDED and t, "the task to finish with the reviewer's action")
    assert done.decision.action == "approve" and done.decision.outcome == kpb.REVIEWED
    assert _audit_kinds(server, waiting.task_id) == ["DECISION", "REVIEW_RESOLUTION"]


def test_a_resolution_after_the_cancel_is_refused_and_records_nothing(server, channel):
    tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    waiting = _waiting_and_claimed(channel, "cancel-first")
    assert tasks.CancelTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
    with pytest.raises(grpc.RpcError) as refused:
        reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=waiting.review_id, reviewer="al", action="approve"),
                              timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "withdrawn" in refused.value.details()
    assert tasks.GetTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
    # The escalation, then the withdrawal the cancel recorded (no action, by the kernel): never the reviewer's.
    assert _audit_kinds(server, waiting.task_id) == ["DECISION", "REVIEW_RESOLUTION"]
    withdrawal = [r for r in server.decisions.audit.read(from_sequence=0) if r.task_id == waiting.task_id][-1]
    assert withdrawal.decision.action == "" and withdrawal.principal == "kernel"


def test_the_same_resolution_sent_at_once_is_one_resolution_on_the_log(server, channel):
    decisions, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    case = dict(data.generate_cases(1, seed=3)[0], claim_amount=90000.0, customer_tier="gold")
    escalated = decisions.Decide(claim_request(case, tenant="clicks"), timeout=TIMEOUT_S)
    assert escalated.review_id
    watching = server.decisions.reviews.watcher_count()
    watch = reviews.WatchReviews(kpb.WatchReviewsRequest(tenant="clicks", updates=True), timeout=TIMEOUT_S)
    # (The call is sent at once, but the kernel subscribes it on a handler thread: a claim before that is
    # news the watch never hears, as a make test run under load found.)
    until(lambda: server.decisions.reviews.watcher_count() > watching, "the watch to be subscribed")
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated.review_id, reviewer="al"), timeout=TIMEOUT_S)
    resolve = kpb.ResolveReviewRequest(review_id=escalated.review_id, reviewer="al", action="deny", comment="dbl")
    start = threading.Barrier(10)

    def one():
        start.wait()
        return reviews.ResolveReview(resolve, timeout=TIMEOUT_S)

    threads, answers = [], []
    for _ in range(10):
        threads.append(threading.Thread(target=lambda: answers.append(one())))
        threads[-1].start()
    for thread in threads:
        thread.join()
    assert len(answers) == 10 and {a.resolution.audit_sequence for a in answers} != {0}
    assert len({a.resolution.audit_sequence for a in answers}) == 1  # every caller gets the one resolution
    records = [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.REVIEW_RESOLUTION)
               if r.decision.review_id == escalated.review_id]
    assert [r.sequence for r in records] == [answers[0].resolution.audit_sequence]
    events = [next(watch), next(watch)]  # the claim, then the resolution: once, with its audited decision
    assert [e.state for e in events] == ["CLAIMED", "RESOLVED"]
    assert events[1].resolution.audit_sequence == answers[0].resolution.audit_sequence
    later = decisions.Decide(claim_request(case, tenant="clicks", request_id="later"), timeout=TIMEOUT_S)
    assert next(watch).review_id == later.review_id  # next comes the new case, no second RESOLVED
    watch.cancel()
