"""Reviews reopened from the audit log after a crash (kernel/review/reopen.py).

Review rows of audited decisions are stored without an fsync of their own
(in either audit mode: the record is written before the answer, and fsynced
too in the default mode); the database keeps, in the same transactions, the
audit sequence below which every escalation has its row. Here a real kernel
is killed with SIGKILL and the database then loses the tail of its review
rows, as an operating-system crash would lose an unsynced write-ahead log;
the restarted kernel must open every lost review again, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.decision_client import make_request
from kernel.store.sqlite import DATABASE_FILE
from kernel.store.sqlite_reviews import RECORDED_BEFORE
from kernel.testing.processes import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
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


def _reviews_after_a_restart(models, serve, data_dir) -> tuple[dict[str, kpb.Review], str]:
    """Start the kernel again on ``data_dir`` (after an injected loss), read every review, stop it; the reviews
    and its log (a clean stop asserted)."""
    restarted = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            after = _all_reviews(channel)
    finally:
        code, log = restarted.stop()
    assert code == 0, log
    return after, log


@pytest.mark.parametrize("audit_mode", ["fsync", "async"])
def test_reviews_lost_with_the_database_tail_are_reopened_unchanged(models, tmp_path, audit_mode):
    """(In "async" mode the records were only written to the OS: a killed process keeps them, so its
    lost rows come back the same way.)"""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING", "--audit-mode", audit_mode)
    server = ServeProcess(models, *serve, data_dir=data_dir)
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

    after, log = _reviews_after_a_restart(models, serve, data_dir)
    assert set(after) == set(escalated), "every escalated decision has its review again"
    assert f"reopened {LOST} reviews from the audit log" in log
    records = {r.sequence: r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.DECISION))}
    for review_id, review in before.items():  # stored ones are dated by their record too, as reopened ones are
        assert review.created_unix_ns == records[escalated[review_id].audit_sequence].time_unix_ns
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
    again = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(again.address) as channel:
            assert set(_all_reviews(channel)) == set(escalated)
    finally:
        code, log = again.stop()
    assert code == 0 and "reopened" not in log, log


def test_a_reopened_review_tells_the_fields_sent_from_the_defaults_used(models, tmp_path):
    """(Review desk audit) a review reopened from its record showed every recorded input as sent, the pipeline's
    defaults among them; a review stored at the decision had only the fields sent. Reopened, it is the same review:
    the fields sent in ``request``, the defaults the record names in ``defaults``."""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=data_dir)
    sent = [{"claim_amount": 90000.0 + i, "customer_tier": "gold"} for i in range(3)]  # R04; six fields left out
    with grpc.insecure_channel(server.address) as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        decided = [stub.Decide(make_request("claims_triage", fields, request_id=f"d{i}"), timeout=10)
                   for i, fields in enumerate(sent)]
        before = _all_reviews(channel)
    server.kill()
    lost = _lose_the_database_tail(data_dir / DATABASE_FILE, 2)

    after, log = _reviews_after_a_restart(models, serve, data_dir)
    assert "reopened 2 reviews from the audit log" in log, log
    for review_id in lost:
        original, reopened = before[review_id], after[review_id]
        assert set(reopened.request.fields) == {"claim_amount", "customer_tier"}
        assert dict(reopened.request.fields) == dict(original.request.fields)
        assert len(reopened.defaults) == 6 and dict(reopened.defaults) == dict(original.defaults)
    assert {d.review_id for d in decided} == set(after)


def test_a_reopened_review_says_which_texts_it_no_longer_has(models, tmp_path):
    """(Review desk audit) a review reopened from its record had no trace of its free text (the record keeps only
    each text's digest): the reviewer could not know a description was sent. Its ``text_digests`` name them."""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=data_dir)
    with grpc.insecure_channel(server.address) as channel:
        decision = kgrpc.DecisionServiceStub(channel).Decide(
            make_request("claims_triage", {"claim_amount": 90000.0}, {"description": "water in the basement"}),
            timeout=10)
        before = _all_reviews(channel)[decision.review_id]
    server.kill()
    assert dict(before.request.text_fields) == {"description": "water in the basement"} and not before.text_digests
    assert _lose_the_database_tail(data_dir / DATABASE_FILE, 1) == [decision.review_id]

    after, log = _reviews_after_a_restart(models, serve, data_dir)
    review = after[decision.review_id]
    assert "reopened 1 reviews from the audit log" in log, log
    assert not review.request.text_fields  # (the text was never on the record)
    assert dict(review.text_digests) == {"description": "sha256:" + hashlib.sha256(b"water in the basement").hexdigest()}


class _ReviewStoreFault(Exception):
    """The injected fault: the review store fails."""


def _decide_all(server, cases, prefix: str) -> list[kpb.Decision]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        return [stub.Decide(claim_request(case, request_id=f"{prefix}{i}"), timeout=10) for i, case in enumerate(cases)]


def _failing(reviews, times: int | None):
    """reviews.create_many failing its first ``times`` calls (None: every call); returns the calls' log."""
    real = reviews.create_many
    calls: list[tuple[bool, int]] = []  # (failed, first audit sequence)

    def create_many(items, **kwargs):
        fail = times is None or sum(failed for failed, _ in calls) < times
        calls.append((fail, items[0][0].audit_sequence))
        if fail:
            raise _ReviewStoreFault("the review store failed (injected)")
        return real(items, **kwargs)
    reviews.create_many = create_many
    return calls, real


def test_a_review_row_that_failed_to_store_is_stored_by_a_retry(claims_models, tmp_path):
    """Rows are stored after the answer (kernel/review/deferred.py): a failed store is retried, and a
    read of the queue never misses a review whose decision was answered before it."""
    from conftest import start_kernel

    server = start_kernel(claims_models, pipelines=str(copy_pipelines(tmp_path / "pipelines")),
                          data_dir=str(tmp_path / "data"), pipeline_poll_s=0)
    engine, reviews = server.decisions.engine, server.decisions.reviews
    calls, real = _failing(reviews, times=1)
    try:
        decisions = _decide_all(server, data.generate_cases(120, seed=23), "t")
        escalated = [d.review_id for d in decisions if d.review_id]
        assert escalated, "no case escalated"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            listed = _all_reviews(channel)  # settles: queued rows (the failed ones included) are stored first
        assert calls and calls[0][0], "the fault was not injected"
        assert set(escalated) <= set(listed)
        for review_id in escalated:
            assert listed[review_id].proposed.review_id == review_id
        # Every group is stored, so the mark has caught up with the whole log.
        assert engine.recorded_before() == server.decisions.audit.size
    finally:
        reviews.create_many = real
        server.stop(grace=1)


@pytest.mark.parametrize("audit_mode", ["fsync", "async"])
def test_review_rows_that_never_stored_are_reopened_at_the_next_start(claims_models, tmp_path, audit_mode):
    from conftest import start_kernel

    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    server = start_kernel(claims_models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0,
                          audit_mode=audit_mode)
    engine, reviews = server.decisions.engine, server.decisions.reviews
    calls, real = _failing(reviews, times=None)
    try:
        decisions = _decide_all(server, data.generate_cases(120, seed=29), "n")
        escalated = {d.review_id: d for d in decisions if d.review_id}
        assert escalated, "no case escalated"
        first_failed = min(sequence for _, sequence in calls) if calls else min(
            d.audit_sequence for d in escalated.values())
        # Answered, recorded, but not stored: the mark stays below the first unstored group.
        assert engine.recorded_before() <= first_failed < server.decisions.audit.size
        assert reviews.recorded_before() <= first_failed
        server.stop(grace=1)  # closing tries once more, fails, and logs it: the rows are lost with the process
    finally:
        reviews.create_many = real
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        stored = {row[0] for row in conn.execute("SELECT review_id FROM reviews")}
    assert not set(escalated) & stored

    restarted = start_kernel(claims_models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0,
                             audit_mode=audit_mode)
    try:
        for review_id, decision in escalated.items():
            review = restarted.decisions.reviews.get(review_id)
            assert review.proposed.audit_sequence == decision.audit_sequence
            assert review.proposed.action == decision.action
        assert restarted.decisions.reviews.recorded_before() == restarted.decisions.audit.size
    finally:
        restarted.stop(grace=1)


def test_a_review_store_that_keeps_failing_fails_decisions_once_the_backlog_is_full(claims_models, tmp_path,
                                                                                     monkeypatch):
    """Rows queue in memory only up to a bound: past it a new decision is refused before it is decided (UNAVAILABLE,
    retry-after-ms), and a group already past the entry stores its own before answering, so a broken review store
    shows as refused or failed decisions instead of a backlog that only grows."""
    from conftest import start_kernel
    from kernel.pipelines import group_finish

    monkeypatch.setattr(group_finish, "MAX_REVIEW_BACKLOG", 3)
    server = start_kernel(claims_models, pipelines=str(copy_pipelines(tmp_path / "pipelines")),
                          data_dir=str(tmp_path / "data"), pipeline_poll_s=0)
    reviews = server.decisions.reviews
    calls, real = _failing(reviews, times=None)
    codes: list[str] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(60, seed=31)):
                try:
                    stub.Decide(claim_request(case, request_id=f"b{i}"), timeout=10)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    if "this decision was not started" in exc.details():  # refused at entry: the backlog is full
                        assert dict(exc.trailing_metadata())["retry-after-ms"] == "1000"
                        codes.append("REFUSED")
                        continue
                    codes.append(exc.code().name)
                    # Recorded all the same, and said so (never "nothing kept"): its review is reopened at start.
                    assert f"decision b{i} was made and recorded at audit sequence " in exc.details(), exc.details()
                    assert "review could not be stored" in exc.details() and "injected" in exc.details()
        assert "REFUSED" in codes, codes  # the store's fault, past the bound, reaches the caller before deciding
        assert set(codes) <= {"OK", "UNAVAILABLE", "REFUSED"}
        assert server.decisions.engine._review_rows.backlog <= 3 + 8  # (at most one more group past the bound)
    finally:
        reviews.create_many = real
        server.stop(grace=1)


def _six_keyed_decisions(claims_models, tmp_path, seed: int, prefix: str):
    """An async-mode kernel decides six keyed claims (keys ``<prefix>-0`` …) and stops: (its options, data dir,
    the requests, their answers, the log's record count then)."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    options = dict(pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0, audit_mode="async")
    requests = [claim_request(case, request_id=f"{prefix[0]}{i}", idempotency_key=f"{prefix}-{i}")
                for i, case in enumerate(data.generate_cases(6, seed=seed))]
    server = start_kernel(claims_models, **options)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        first = [kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10) for request in requests]
    server.stop(grace=1)
    return options, data_dir, requests, first, sum(1 for _ in iter_directory(data_dir / "audit", 0, RecordFilter()))


def _lost_keys_are_forgotten(claims_models, options, caplog, data_dir, opened: int, requests, first) -> None:
    """The log ends at #``opened`` while the store saw two records past it: fsync mode refuses the start, nothing
    changed; async mode forgets the three keys whose records were lost, so their retries are decided anew (each
    answer naming its own new record), and the three kept ones replay their first answers."""
    from conftest import start_kernel
    from kernel.audit import AuditCorrupt

    with pytest.raises(AuditCorrupt, match=f"ends at record #{opened} but the review and idempotency store saw "
                                           f"records up to #{opened + 2}"):
        start_kernel(claims_models, **{**options, "audit_mode": "fsync"})  # fsync mode: refused, nothing changed
    restarted = start_kernel(claims_models, **options)
    try:
        assert f"forgot the idempotency entries of 3 decisions whose records #{opened} on were lost" in caplog.text
        with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            retried = [kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10) for request in requests]
    finally:
        restarted.stop(grace=1)
    assert [answer.replayed for answer in retried] == [True] * 3 + [False] * 3
    assert [a.audit_sequence for a in retried[:3]] == [a.audit_sequence for a in first[:3]]
    on_record = {r.sequence: r.idempotency_key
                 for r in iter_directory(data_dir / "audit", opened, RecordFilter(kind=kpb.DECISION))}
    for request, answer in zip(requests[3:], retried[3:]):  # each new answer names its own record
        assert on_record[answer.audit_sequence] == request.idempotency_key


def _set_proposed_hash(database, review_id: str, audit_hash: str) -> None:
    """The injected fault: the stored review's proposal names another record hash, as a review whose
    decision's record a power cut took (async mode) would once a new decision has that sequence number."""
    with sqlite3.connect(database) as conn:
        (body,) = conn.execute("SELECT body FROM reviews WHERE review_id = ?", (review_id,)).fetchone()
        review = kpb.Review.FromString(body)
        review.proposed.audit_hash = audit_hash
        conn.execute("UPDATE reviews SET body = ? WHERE review_id = ?", (review.SerializeToString(), review_id))


def test_a_resolution_links_only_to_the_record_its_review_was_opened_for(claims_models, tmp_path, caplog):
    from conftest import start_kernel

    data_dir = tmp_path / "data"
    server = start_kernel(claims_models, pipelines=str(copy_pipelines(tmp_path / "pipelines")),
                          data_dir=str(data_dir), pipeline_poll_s=0, audit_mode="async")
    try:
        escalated = [d for d in _decide_all(server, data.generate_cases(40, seed=43), "l") if d.review_id][:2]
        assert len(escalated) == 2, "fewer than two cases escalated"
        kept, lost = escalated
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            _all_reviews(channel)  # (every row stored)
            _set_proposed_hash(data_dir / DATABASE_FILE, lost.review_id, "00" * 32)
            stub = kgrpc.ReviewServiceStub(channel)
            answers = {}
            for decision in (kept, lost):
                stub.ClaimReview(kpb.ClaimReviewRequest(review_id=decision.review_id, reviewer="ana"), timeout=5)
                answers[decision.review_id] = stub.ResolveReview(kpb.ResolveReviewRequest(
                    review_id=decision.review_id, reviewer="ana", action="approve"), timeout=10).resolution
    finally:
        server.stop(grace=1)
    assert answers[kept.review_id].links_to_audit_sequence == kept.audit_sequence
    assert answers[lost.review_id].links_to_audit_sequence == 0
    resolutions = {r.decision.review_id: r for r in
                   iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.REVIEW_RESOLUTION))}
    assert resolutions[kept.review_id].has_link and resolutions[kept.review_id].links_to == kept.audit_sequence
    assert not resolutions[lost.review_id].has_link
    assert f"does not hold record #{lost.audit_sequence}" in caplog.text


def test_a_review_mark_past_the_end_of_the_log_comes_down_to_it(claims_models, tmp_path, caplog):
    """After a power cut in async mode the review store can have seen records the log lost: the mark
    comes down to the log's end, so escalations recorded from there on are still reopened after a crash."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    server = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0,
                          audit_mode="async")
    _decide_all(server, data.generate_cases(10, seed=47), "m")
    server.stop(grace=1)
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        conn.execute("UPDATE meta SET value = value + 50 WHERE key = ?", (RECORDED_BEFORE,))
        (mark,) = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()
    opened = sum(1 for _ in iter_directory(data_dir / "audit", 0, RecordFilter()))
    restarted = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0,
                             audit_mode="async")
    try:
        size = restarted.decisions.audit.size
        assert restarted.decisions.reviews.recorded_before() == size
        assert mark > size > opened
        # The range is the log's end when the kernel opened it (not after this start's own records).
        assert (f"the audit log ends at record #{opened} but the review and idempotency store saw records up to #{mark - 1}: "
                f"records #{opened}-#{mark - 1} were lost") in caplog.text
        (started,) = iter_directory(data_dir / "audit", opened, RecordFilter(kind=kpb.CONFIG_CHANGE))
        assert json.loads(started.payload)["lost_records"] == {"first": opened, "last": mark - 1,
                                                              "audit_mode": "async"}
    finally:
        restarted.stop(grace=1)


def test_stored_answers_citing_lost_records_are_forgotten_when_the_loss_is_accepted(claims_models, tmp_path,
                                                                                     caplog):
    """(Upgrade audit) a start that accepts lost records hands their sequence numbers to new decisions; a key
    whose stored answer cited one was replayed naming another caller's decision. Such entries are forgotten: the
    retry is decided anew, on the record; keys whose records survived still replay. The loss is found from the
    stored answers, with the review mark below it."""
    options, data_dir, requests, first, opened = _six_keyed_decisions(claims_models, tmp_path, 49, "order")
    # The injected fault, as a power cut in async mode leaves it: the last three answers' records are past the
    # log's end (stored answers and the review mark had seen them; the log lost them).
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        for offset, request in enumerate(requests[3:]):
            answer = kpb.Decision.FromString(conn.execute("SELECT response FROM idempotency WHERE key = ?",
                                                          (request.idempotency_key,)).fetchone()[0])
            answer.audit_sequence = opened + offset
            conn.execute("UPDATE idempotency SET response = ?, audit_sequence = ? WHERE key = ?",
                         (answer.SerializeToString(), answer.audit_sequence, request.idempotency_key))
        # (The review mark is left below the loss: it rises only with escalations, and a loss after the last one is
        # seen from the stored answers alone — a review audit found it was not.)

    _lost_keys_are_forgotten(claims_models, options, caplog, data_dir, opened, requests, first)


def test_answers_an_older_kernel_stored_are_checked_against_the_log_too(claims_models, tmp_path, caplog):
    """(Upgrade audit) the answers a kernel before schema version 5 stored have no audit_sequence column (the
    migration leaves -1): the start's check read the column alone, so records lost past the review mark (an
    async-mode power cut under the old kernel) went unseen. fsync mode started instead of refusing, and in async
    mode a retried key was answered with a sequence number the new kernel's own records had taken."""
    from kernel.store.idempotency import OLD_SEQUENCES_FILLED

    options, data_dir, requests, first, opened = _six_keyed_decisions(claims_models, tmp_path, 50, "old")
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        # As an older kernel's store is after the upgrade's migration: every answer's column -1, no meta key.
        conn.execute("UPDATE idempotency SET audit_sequence = -1")
        conn.execute("DELETE FROM meta WHERE key = ?", (OLD_SEQUENCES_FILLED,))
        # The injected fault: the last three answers' records are past the log's end, the review mark below them.
        for offset, request in enumerate(requests[3:]):
            answer = kpb.Decision.FromString(conn.execute("SELECT response FROM idempotency WHERE key = ?",
                                                          (request.idempotency_key,)).fetchone()[0])
            answer.audit_sequence = opened + offset
            conn.execute("UPDATE idempotency SET response = ? WHERE key = ?",
                         (answer.SerializeToString(), request.idempotency_key))
        (mark,) = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()
    assert mark <= opened

    _lost_keys_are_forgotten(claims_models, options, caplog, data_dir, opened, requests, first)
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:  # the kept answers' column filled from their bytes
        kept = dict(conn.execute("SELECT key, audit_sequence FROM idempotency WHERE key LIKE 'old-%'").fetchall())
    assert [kept[r.idempotency_key] for r in requests[:3]] == [a.audit_sequence for a in first[:3]]


def test_in_fsync_mode_records_missing_from_the_log_refuse_the_start(claims_models, tmp_path):
    """In fsync mode a record is on disk before its decision is answered: a log that lacks records the review
    store saw was rolled back or replaced (or its storage failed). The kernel refuses to start, naming the
    range and the way out, instead of handing those sequence numbers to new decisions and signing over them."""
    from conftest import start_kernel
    from kernel.audit import AuditCorrupt

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    server = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    _decide_all(server, data.generate_cases(10, seed=48), "f")
    server.stop(grace=1)
    opened = sum(1 for _ in iter_directory(data_dir / "audit", 0, RecordFilter()))
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:  # the injected fault: the log is 5 records short
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (opened + 5, RECORDED_BEFORE))
    with pytest.raises(AuditCorrupt) as refused:
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    message = refused.value.message
    assert f"ends at record #{opened} but the review and idempotency store saw records up to #{opened + 4}" in message
    assert "refusing to start" in message and "AIOS_AUDIT_MODE=async" in message
    assert sum(1 for _ in iter_directory(data_dir / "audit", 0, RecordFilter())) == opened  # nothing appended
    accepted = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0,
                            audit_mode="async")  # the documented way to accept the loss
    accepted.stop(grace=1)


KEYS_LOST = 6  # idempotency entries the injected fault removes


def keyed_decisions_then_kill(models, tmp_path, prefix: str, key: str, count: int, seed: int):
    """A served kernel (a process of its own) decides ``count`` claims under keys ``<key>-<i>`` and is killed
    (SIGKILL): its pipelines folder, data dir, serve arguments, the requests and their answers."""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=data_dir)
    requests = [claim_request(case, request_id=f"{prefix}{i}", idempotency_key=f"{key}-{i}")
                for i, case in enumerate(data.generate_cases(count, seed=seed))]
    with grpc.insecure_channel(server.address) as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        first = [stub.Decide(request, timeout=10) for request in requests]
    server.kill()
    return pipelines, data_dir, serve, requests, first


def test_keyed_decisions_recorded_before_a_kill_replay_to_their_retries(models, tmp_path):
    """(Crash audit, 2026-11-27) a kill between a keyed decision's durable record and its idempotency entry let
    the retry after the restart decide again: two records, and two reviews, for one key. The start stores the
    keys of the records past the mark from the records themselves, which carry their request's hash."""
    pipelines, data_dir, serve, requests, first = keyed_decisions_then_kill(models, tmp_path, "k", "order", 20, seed=23)

    # The injected fault: the newest entries never reached the store, and the mark is below their records.
    # (Lowered, never raised: review rows are stored after the answers, so the kill may have left the mark
    # below some of the 20 already; raising it hid their reviews from the start's reopening: failed once.)
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        lost = [request.idempotency_key for request in requests[-KEYS_LOST:]]
        conn.executemany("DELETE FROM idempotency WHERE key = ?", [(key,) for key in lost])
        conn.execute("UPDATE meta SET value = MIN(value, ?) WHERE key = ?",
                     (first[-KEYS_LOST].audit_sequence, RECORDED_BEFORE))

    restarted = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            retried = [stub.Decide(request, timeout=10) for request in requests]
            reviews = _all_reviews(channel)
    finally:
        code, log = restarted.stop()
    assert code == 0, log
    assert f"stored the idempotency keys of {KEYS_LOST} decisions from the audit log" in log
    for before, after in zip(first, retried):
        assert after.replayed and after.audit_sequence == before.audit_sequence and after.action == before.action
        assert after.review_id == before.review_id
    decided = [r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.DECISION))]
    assert sorted(r.idempotency_key for r in decided) == sorted(r.idempotency_key for r in requests)  # one each
    assert set(reviews) == {d.review_id for d in first if d.review_id}


def test_a_resolution_recorded_before_a_kill_is_not_recorded_again(models, tmp_path):
    """(Crash audit, 2026-11-27) a kill between a resolution's audit record and its done entry made the next
    start record the resolution a second time (two REVIEW_RESOLUTION records for one review; the task took the
    second). The start finishes the delivery with the record already on the log."""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=data_dir)
    large = dict(data.generate_cases(1, seed=40)[0], claim_amount=75000.0)  # R04: a person decides
    with grpc.insecure_channel(server.address) as channel:
        escalated = kgrpc.DecisionServiceStub(channel).Decide(claim_request(large, request_id="big"), timeout=10)
        reviews = kgrpc.ReviewServiceStub(channel)
        reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated.review_id, reviewer="alice"), timeout=10)
        resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(
            review_id=escalated.review_id, reviewer="alice", action="deny", comment="forged"), timeout=10)
    assert resolved.resolution.audit_sequence > escalated.audit_sequence
    server.kill()

    # The injected fault: the kill came after the resolution's record, before its done entry.
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        conn.execute("UPDATE reviews SET delivered = 0 WHERE review_id = ?", (escalated.review_id,))
        conn.execute("DELETE FROM idempotency WHERE key = ?", ("review:" + escalated.review_id,))

    restarted = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            review = kgrpc.ReviewServiceStub(channel).GetReview(kpb.ReviewRef(review_id=escalated.review_id),
                                                                timeout=10)
    finally:
        code, log = restarted.stop()
    assert code == 0, log
    records = [r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.REVIEW_RESOLUTION))
               if r.decision.review_id == escalated.review_id]
    assert [r.sequence for r in records] == [resolved.resolution.audit_sequence]
    assert review.resolution.audit_sequence == resolved.resolution.audit_sequence


def test_a_review_reopened_for_a_pipeline_no_longer_served_offers_its_stored_reviews_actions(models, tmp_path):
    """(Review desk audit) a review reopened after a crash whose pipeline file was removed meanwhile offered only
    the proposed action, 'review' for an escalation: no reviewer could decide the case. It offers what the
    pipeline's reviews still stored offer."""
    pipelines = copy_pipelines(tmp_path / "pipelines")
    data_dir = tmp_path / "data"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    server = ServeProcess(models, *serve, data_dir=data_dir)
    with grpc.insecure_channel(server.address) as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        for i in range(3):
            stub.Decide(make_request("claims_triage", {"claim_amount": 90000.0 + i, "customer_tier": "gold"},
                                     request_id=f"g{i}"), timeout=10)
        before = _all_reviews(channel)
    server.kill()
    lost = _lose_the_database_tail(data_dir / DATABASE_FILE, 2)
    (pipelines / "claims_triage.toml").unlink()

    restarted = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            after = _all_reviews(channel)
            reviews = kgrpc.ReviewServiceStub(channel)
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=lost[0], reviewer="al"), timeout=10)
            resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=lost[0], reviewer="al",
                                                                      action="deny"), timeout=10)
    finally:
        code, log = restarted.stop()
    assert code == 0 and "as its newest stored review does" in log, log
    kept = next(review for review_id, review in before.items() if review_id not in lost)
    for review_id in lost:
        assert set(after[review_id].actions) == {after[review_id].proposed.action, *kept.actions}
    assert resolved.resolved_action == "deny"


def test_answers_an_unaudited_kernel_stored_cite_no_record_at_the_next_start_with_the_log_on(claims_models, tmp_path):
    """A kernel with audit_mode off stored each keyed answer with audit_sequence 0 (the unrecorded answer's own 0),
    which the next start with the log on read as record #0 seen by the store: fsync mode refused to start ("the
    audit log ends at record #0 but the review and idempotency store saw records up to #0 ... refusing to start"),
    and async mode would have forgotten every such answer as citing a lost record. A store such a kernel left is
    read right too (its rows at 0 whose answer cites no record are set back to -1)."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    options = dict(pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    requests = [claim_request(case, request_id=f"u{i}", idempotency_key=f"unaudited-{i}")
                for i, case in enumerate(data.generate_cases(3, seed=51))]
    server = start_kernel(claims_models, **options, audit_mode="off")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        first = [kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10) for request in requests]
    server.stop(grace=1)
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        assert {s for (s,) in conn.execute("SELECT audit_sequence FROM idempotency")} == {-1}
        conn.execute("UPDATE idempotency SET audit_sequence = 0")  # as the kernel before this fix stored them

    restarted = start_kernel(claims_models, **options, audit_mode="fsync")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            retried = [kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10) for request in requests]
    finally:
        restarted.stop(grace=1)
    assert [answer.replayed for answer in retried] == [True] * 3
    assert [answer.action for answer in retried] == [answer.action for answer in first]
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        assert {s for (s,) in conn.execute("SELECT audit_sequence FROM idempotency WHERE key LIKE 'unaudited-%'")} \
            == {-1}


def test_a_start_that_fails_leaves_the_reviews_and_keys_a_crash_lost_for_the_next_start(models, tmp_path):
    """(Kill-loop audit, 2026-11-28) a start that failed after opening the log (a full disk failed its first
    record) released the kernel with its stop steps, and one of them raised the review mark to the log's end
    without the start having reopened anything: the next start, with space freed, reopened no review and
    stored no key from the records the crash had left past the mark. 76 escalations answered OK had no review
    from then on, and a retry of a keyed decision was decided again (a second record for the key)."""
    pipelines, data_dir, serve, requests, first = keyed_decisions_then_kill(models, tmp_path, "f", "claim", 60, seed=31)
    escalated = {d.review_id for d in first if d.review_id}
    assert len(escalated) > LOST

    # The injected fault (as the kill can leave it): the newest review rows and keys never reached the store.
    lost_reviews = _lose_the_database_tail(data_dir / DATABASE_FILE, LOST)
    lost_keys = [request.idempotency_key for request in requests[-KEYS_LOST:]]
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        conn.executemany("DELETE FROM idempotency WHERE key = ?", [(key,) for key in lost_keys])
        conn.execute("UPDATE meta SET value = MIN(value, ?) WHERE key = ?",
                     (first[-KEYS_LOST].audit_sequence, RECORDED_BEFORE))
        mark = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()[0]

    failed = subprocess.run([sys.executable, str(ROOT / "tests" / "_start_failing_kernel.py"), "serve", "--models",
                             str(models), "--port", "0", "--data-dir", str(data_dir), *serve],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert failed.returncode != 0 and "injected" in failed.stderr, failed.stderr
    with sqlite3.connect(data_dir / DATABASE_FILE) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()[0] == mark

    restarted = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            reviews = _all_reviews(channel)
            stub = kgrpc.DecisionServiceStub(channel)
            retried = [stub.Decide(request, timeout=10) for request in requests[-KEYS_LOST:]]
    finally:
        code, log = restarted.stop()
    assert code == 0, log
    assert set(lost_reviews) <= set(reviews) and escalated == set(reviews)
    for before, after in zip(first[-KEYS_LOST:], retried):
        assert after.replayed and after.audit_sequence == before.audit_sequence
    decided = [r.idempotency_key for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.DECISION))]
    assert sorted(decided) == sorted(request.idempotency_key for request in requests)  # one record each
