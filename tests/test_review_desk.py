"""The review desk's records: who may sign a resolution, what a withdrawn case counts as, what a resolution names.

- A reviewer's name becomes the principal of an audit record for good: blank,
  padded (" gus" is not "gus") or invisible names are refused, naming
  ``reviewer``.
- A case withdrawn because its task was cancelled was taken away from the
  desk: it never counts as an SLA the desk missed, and a reviewer who still
  tries it is told it was withdrawn (not "already resolved ( by kernel)").
- A resolution's audit record carries its task's id, as the escalated
  decision's does, so a task's final decision is found by its task.

A real kernel serving the claims pipeline (its SLA cut to 1 s), over gRPC.
"""

from __future__ import annotations

import time

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.review import ReviewQueue
from kernel.store import open_database

TIMEOUT_S = 20
SLA_S = 1


def _short_sla(pipelines) -> None:
    spec = pipelines / "claims_triage.toml"
    text = spec.read_text(encoding="utf-8")
    assert "review_sla_s = 14400" in text, "the claims pipeline no longer has the SLA line this replaces"
    spec.write_text(text.replace("review_sla_s = 14400", f"review_sla_s = {SLA_S}"), encoding="utf-8")


server, channel = module_claims_kernel(edit_pipelines=_short_sla)


@pytest.fixture
def reviews(channel):
    return kgrpc.ReviewServiceStub(channel)


@pytest.fixture
def tasks(channel):
    return kgrpc.TaskServiceStub(channel)


def large_claim(tenant: str) -> kpb.DecisionRequest:
    case = dict(data.generate_cases(1, seed=11)[0], claim_amount=90000.0)  # R04: always seen by a human
    return claim_request(case, tenant=tenant)


def escalated(channel, tenant: str) -> str:
    decision = kgrpc.DecisionServiceStub(channel).Decide(large_claim(tenant), timeout=TIMEOUT_S)
    assert decision.outcome == kpb.ESCALATED
    return decision.review_id


def waiting_task(tasks, tenant: str) -> kpb.Task:
    task = tasks.StartTask(kpb.StartTaskRequest(request=large_claim(tenant)), timeout=TIMEOUT_S)
    for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S):
        if update.state == kpb.WAITING_FOR_REVIEW:
            return update
    raise AssertionError(f"task {task.task_id} never waited for its review")


def refused(call, message) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(message, timeout=TIMEOUT_S)
    return info.value.code(), info.value.details()


def past_its_sla(reviews, review_id: str) -> None:
    deadline = reviews.GetReview(kpb.ReviewRef(review_id=review_id), timeout=TIMEOUT_S).sla_deadline_unix_ns
    assert deadline
    time.sleep(max(0.0, (deadline - time.time_ns()) / 1e9) + 0.1)


def resolutions(server, review_id: str) -> list[kpb.AuditRecord]:
    return [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.REVIEW_RESOLUTION)
            if r.decision.review_id == review_id]


@pytest.mark.parametrize("name, why", [
    ("   ", "reviewer must not be blank"),
    (" gus", "reviewer must not begin or end with whitespace, got ' gus'; send 'gus'"),
    ("gus\u00a0", "reviewer must not begin or end with whitespace"),
    ("\u200b", "reviewer must not contain invisible characters (Unicode format characters or line separators); "
               "it has '\\u200b' (U+200B) at position 0"),
    ("al\u200dice", "it has '\\u200d' (U+200D) at position 2"),
    ("\u202eecila", "it has '\\u202e' (U+202E) at position 0"),  # a right-to-left override: shows as "alice"
    ("a\u2028b", "it has '\\u2028' (U+2028) at position 1"),  # a line separator: breaks a log line
    ("a\tb", "reviewer must not contain control characters"),  # (refused before too)
])
def test_blank_padded_and_invisible_reviewer_names_are_refused(channel, reviews, name, why):
    review_id = escalated(channel, "names")
    for call, message in ((reviews.ClaimReview, kpb.ClaimReviewRequest(review_id=review_id, reviewer=name)),
                          (reviews.ResolveReview, kpb.ResolveReviewRequest(review_id=review_id, reviewer=name,
                                                                           action="approve"))):
        code, details = refused(call, message)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("reviewer must not"), details
        assert why in details


def test_a_name_with_inner_spaces_and_accents_signs_the_record_as_written(server, channel, reviews):
    review_id, name = escalated(channel, "names-ok"), "José Álvarez-Núñez"
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review_id, reviewer=name), timeout=TIMEOUT_S)
    resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer=name, action="deny"),
                                     timeout=TIMEOUT_S)
    assert resolved.resolved_by == name
    assert [r.principal for r in resolutions(server, review_id)] == [name]


def test_a_withdrawn_review_is_no_missed_sla_and_says_it_was_withdrawn(tasks, reviews):
    task = waiting_task(tasks, "sla-withdrawn")
    past_its_sla(reviews, task.review_id)
    listed = reviews.ListReviews(kpb.ListReviewsRequest(tenant="sla-withdrawn"), timeout=TIMEOUT_S)
    assert listed.sla_missed == 1 and listed.reviews[0].sla_missed  # open past its deadline: missed, so far

    tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    for state in ("", "RESOLVED"):
        listed = reviews.ListReviews(kpb.ListReviewsRequest(tenant="sla-withdrawn", state=state), timeout=TIMEOUT_S)
        assert listed.sla_missed == 0 and [r.review_id for r in listed.reviews] == [task.review_id]
        assert listed.reviews[0].state == "RESOLVED" and not listed.reviews[0].sla_missed
    got = reviews.GetReview(kpb.ReviewRef(review_id=task.review_id), timeout=TIMEOUT_S)
    assert got.resolved_action == "" and not got.sla_missed

    withdrawn = f"review '{task.review_id}' was withdrawn: task {task.task_id} was cancelled; there is nothing to decide"
    assert refused(reviews.ClaimReview, kpb.ClaimReviewRequest(review_id=task.review_id, reviewer="carol")) == (
        grpc.StatusCode.FAILED_PRECONDITION, withdrawn)
    assert refused(reviews.ResolveReview, kpb.ResolveReviewRequest(review_id=task.review_id, reviewer="carol",
                                                                   action="approve")) == (
        grpc.StatusCode.FAILED_PRECONDITION, withdrawn)


def test_a_case_decided_after_its_sla_still_counts_as_missed(channel, reviews):
    review_id = escalated(channel, "sla-late")
    past_its_sla(reviews, review_id)
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review_id, reviewer="dave"), timeout=TIMEOUT_S)
    reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer="dave", action="approve"),
                          timeout=TIMEOUT_S)
    listed = reviews.ListReviews(kpb.ListReviewsRequest(tenant="sla-late", state="RESOLVED"), timeout=TIMEOUT_S)
    assert listed.sla_missed == 1 and listed.reviews[0].sla_missed
    code, details = refused(reviews.ResolveReview, kpb.ResolveReviewRequest(review_id=review_id, reviewer="erin",
                                                                            action="deny"))
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION,
                               f"review '{review_id}' is already resolved (approve by dave)")


def test_a_resolution_record_names_its_task(server, channel, tasks, reviews):
    task = waiting_task(tasks, "resolution")
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=task.review_id, reviewer="alice"), timeout=TIMEOUT_S)
    reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=task.review_id, reviewer="alice", action="deny"),
                          timeout=TIMEOUT_S)
    (record,) = resolutions(server, task.review_id)
    assert record.task_id == task.task_id and record.principal == "alice"
    finished = tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    assert finished.decision.audit_sequence == record.sequence
    # A case no task waits on (a Decide's escalation): its resolution names no task.
    review_id = escalated(channel, "resolution")
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review_id, reviewer="alice"), timeout=TIMEOUT_S)
    reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer="alice", action="deny"),
                          timeout=TIMEOUT_S)
    assert [r.task_id for r in resolutions(server, review_id)] == [""]


def test_reviews_an_older_kernel_withdrew_stop_counting_as_missed(tmp_path):
    """Before withdrawn rows were told apart, they were stored like decided ones: the first open marks them."""
    clock = [1_000 * 10**9]
    with open_database(tmp_path) as db:
        queue = ReviewQueue(db, clock=lambda: clock[0])
        decision = kpb.Decision(action="review", outcome=kpb.ESCALATED, pipeline="claims")
        request = kpb.DecisionRequest(pipeline="claims", tenant="acme")
        withdrawn, decided = (queue.create(decision, request, ["approve"], 1.0, task_id=f"t{n}") for n in (1, 2))
        clock[0] += 5 * 10**9  # both past their SLA
        queue.claim(decided.review_id, "alice")
        queue.resolve(decided.review_id, "alice", "approve")
        queue.withdraw(withdrawn.review_id, "task t1 was cancelled")
        assert queue.sla_missed_count() == 1
        with db.write() as conn:  # as an older kernel stored it, before it kept the mark
            conn.execute("UPDATE reviews SET resolved = 1")
            conn.execute("DELETE FROM meta WHERE key = 'reviews.withdrawn_rows_marked'")
    with open_database(tmp_path) as db:
        queue = ReviewQueue(db, clock=lambda: clock[0])
        assert queue.sla_missed_count() == 1 and queue.sla_missed_count(state="RESOLVED") == 1
        assert [r.review_id for r in queue.list(state="RESOLVED").reviews] == [withdrawn.review_id, decided.review_id]
        writes = db.writes
    with open_database(tmp_path) as db:  # marked once: a later open writes nothing
        ReviewQueue(db).sla_missed_count()
        assert db.writes == 0 and writes >= 1
