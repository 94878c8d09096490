"""Reviews reopened from the audit log after a crash (kernel/review/reopen.py).

Review rows of fsync-audited decisions are stored without an fsync of their
own; the database keeps, in the same transactions, the audit sequence below
which every escalation has its row. Here a real kernel is killed with
SIGKILL and the database then loses the tail of its review rows, as an
operating-system crash would lose an unsynced write-ahead log; the restarted
kernel must open every lost review again, unchanged.
"""

from __future__ import annotations

import sqlite3

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.store.sqlite_reviews import RECORDED_BEFORE
from kernel.testing.processes import ServeProcess

LOST = 12  # review rows the injected fault removes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("claims_models"))


def _all_reviews(channel) -> dict[str, kpb.Review]:
    stub = kgrpc.ReviewServiceStub(channel)
    found, token = {}, ""
    while True:
        page = stub.ListReviews(kpb.ListReviewsRequest(pipeline="claims_triage", page_size=100, page_token=token),
                                timeout=10)
        found.update((review.review_id, review) for review in page.reviews)
        token = page.next_page_token
        if not token:
            return found


def _lose_the_database_tail(path, count: int) -> list[str]:
    """The injected fault: the last ``count`` review rows vanish, and the mark is the highest value
    any surviving transaction can have written (the lowest audit sequence among the lost rows)."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT seq, review_id, body FROM reviews ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
        lowest = min(kpb.Review.FromString(body).proposed.audit_sequence for _, _, body in rows)
        conn.execute("DELETE FROM reviews WHERE seq >= ?", (min(seq for seq, _, _ in rows),))
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (lowest, RECORDED_BEFORE))
    return [review_id for _, review_id, _ in rows]


def test_reviews_lost_with_the_database_tail_are_reopened_unchanged(models, tmp_path):
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    server = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    escalated: dict[str, kpb.Decision] = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        for i, case in enumerate(data.generate_cases(120, seed=21)):
            decision = stub.Decide(claim_request(case, request_id=f"c{i}"), timeout=10)
            if decision.review_id:
                escalated[decision.review_id] = decision
        before = _all_reviews(channel)
    assert len(escalated) > LOST and set(before) == set(escalated)
    server.kill()

    lost = _lose_the_database_tail(data_dir / "kernel.sqlite3", LOST)
    assert len(lost) == LOST

    restarted = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            after = _all_reviews(channel)
    finally:
        code, log = restarted.stop()
    assert code == 0, log
    assert set(after) == set(escalated), "every escalated decision has its review again"
    assert f"reopened {LOST} reviews from the audit log" in log
    records = {r.sequence: r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.DECISION))}
    for review_id in lost:
        review, decision = after[review_id], escalated[review_id]
        original = before[review_id]
        assert review.proposed.audit_sequence == decision.audit_sequence
        assert review.proposed.audit_hash == decision.audit_hash
        assert review.proposed.action == decision.action and review.proposed.outcome == decision.outcome
        assert review.created_unix_ns == records[decision.audit_sequence].time_unix_ns
        assert review.sla_deadline_unix_ns - review.created_unix_ns == original.sla_deadline_unix_ns - original.created_unix_ns
        assert list(review.actions) == list(original.actions) and review.state == "OPEN"
        assert dict(review.request.fields) == dict(original.request.fields)
        assert review.request.request_id == original.request.request_id and review.tenant == original.tenant

    # A clean stop leaves the mark at the end of the log: the next start reopens nothing.
    again = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    try:
        with grpc.insecure_channel(again.address) as channel:
            assert set(_all_reviews(channel)) == set(escalated)
    finally:
        code, log = again.stop()
    assert code == 0 and "reopened" not in log, log


class _ReviewStoreFault(Exception):
    """The injected fault: the review store fails once."""


def test_a_review_that_failed_to_store_is_reopened_at_the_next_start(claims_models, tmp_path):
    from conftest import start_kernel

    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    server = start_kernel(claims_models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0)
    engine, reviews = server.decisions.engine, server.decisions.reviews
    cases = [c for c in data.generate_cases(200, seed=23)]
    real_create_many = reviews.create_many
    failed: list[int] = []

    def failing_once(items, **kwargs):
        if not failed:
            failed.append(items[0][0].audit_sequence)
            raise _ReviewStoreFault("the review store failed (injected)")
        return real_create_many(items, **kwargs)

    reviews.create_many = failing_once
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(cases):
                try:
                    stub.Decide(claim_request(case, request_id=f"f{i}"), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INTERNAL and failed
            assert failed, "no case escalated"
            # Later groups stored their rows, but the mark stays below the failed group's record.
            assert engine.recorded_before() <= failed[0] < server.decisions.audit.size
            assert reviews.recorded_before() <= failed[0]
            lost = [r for r in iter_directory(data_dir / "audit", failed[0], RecordFilter(kind=kpb.DECISION))
                    if r.decision.review_id and not reviews.exists(r.decision.review_id)]
            assert lost and all(r.sequence >= failed[0] for r in lost)
    finally:
        reviews.create_many = real_create_many
        server.stop(grace=1)

    restarted = start_kernel(claims_models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        for record in lost:
            review = restarted.decisions.reviews.get(record.decision.review_id)
            assert review.proposed.audit_sequence == record.sequence
        assert restarted.decisions.reviews.recorded_before() == restarted.decisions.audit.size
    finally:
        restarted.stop(grace=1)
