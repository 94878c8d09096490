"""Retention (``store_retention_days``, kernel/store/retention.py): resolved reviews and finished tasks are deleted
a set time after they ended; open, claimed and still-running ones stay; each sweep is on the audit log; nothing
deleted comes back after a restart; and a store from before retention gets its finished tasks' end times.

A real claims kernel over gRPC. The sweep is called with a "now" some days ahead instead of waiting days: the
rows' end times are real wall-clock times written by the kernel.
"""

from __future__ import annotations

import json
import sqlite3
import time

import grpc
import pytest

from claims_support import claim_request
from conftest import start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.config import SettingsError, load_settings
from kernel.store import open_database
from kernel.store.retention import DAY_NS
from kernel.store.schema import MIGRATIONS, migrate

TIMEOUT_S = 20


def _reviews(stub, state: str) -> set[str]:
    found, token = set(), ""
    while True:
        page = stub.ListReviews(kpb.ListReviewsRequest(pipeline="claims_triage", state=state, page_size=100,
                                                       page_token=token), timeout=TIMEOUT_S)
        found |= {review.review_id for review in page.reviews}
        token = page.next_page_token
        if not token:
            return found


def _wait_for(tasks, task_id: str, states: tuple) -> kpb.Task:
    for task in tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
        if task.state in states:
            return task
    raise AssertionError(f"task {task_id} ended its watch before {states}")


def test_a_sweep_deletes_only_what_ended_before_its_cutoff_and_nothing_comes_back(claims_models, tmp_path):
    server = start_claims_kernel(claims_models, tmp_path, store_retention_days=30)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        decide = kgrpc.DecisionServiceStub(channel)
        reviews = kgrpc.ReviewServiceStub(channel)
        tasks = kgrpc.TaskServiceStub(channel)
        escalated = []
        for i, case in enumerate(data.generate_cases(60, seed=5)):
            decision = decide.Decide(claim_request(case, request_id=f"r{i}"), timeout=TIMEOUT_S)
            if decision.review_id:
                escalated.append(decision.review_id)
        assert len(escalated) >= 6
        resolved, claimed, still_open = escalated[:3], escalated[3], set(escalated[4:])
        for review_id in [*resolved, claimed]:
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review_id, reviewer="alice"), timeout=TIMEOUT_S)
        for review_id in resolved:
            reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer="alice", action="deny"),
                                  timeout=TIMEOUT_S)

        finished, waiting = [], None  # tasks: some decided automatically, one waiting for its review
        for i, case in enumerate(data.generate_cases(40, seed=9)):
            task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(case, request_id=f"t{i}")),
                                   timeout=TIMEOUT_S)
            task = _wait_for(tasks, task.task_id, (kpb.SUCCEEDED, kpb.FAILED, kpb.WAITING_FOR_REVIEW))
            if task.state == kpb.WAITING_FOR_REVIEW and waiting is None:
                waiting = task
            elif task.state == kpb.SUCCEEDED:
                finished.append(task.task_id)
            if waiting is not None and len(finished) >= 3:
                break
        assert waiting is not None and len(finished) >= 3

        sweeper = server.decisions._retention
        early = sweeper.sweep(time.time_ns() + 29 * DAY_NS)  # nothing has ended 30 days ago yet
        assert (early.reviews, early.tasks) == (0, 0)
        swept = sweeper.sweep(time.time_ns() + 31 * DAY_NS)
        assert (swept.reviews, swept.tasks) == (len(resolved), len(finished))

        assert _reviews(reviews, "RESOLVED") == set()
        assert claimed in _reviews(reviews, "CLAIMED")
        assert still_open <= _reviews(reviews, "OPEN") | {waiting.review_id}
        for task_id in finished:
            with pytest.raises(grpc.RpcError) as gone:
                tasks.GetTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert tasks.GetTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S).state == \
            kpb.WAITING_FOR_REVIEW
    server.stop(grace=1)

    records = [json.loads(r.payload) for r in iter_directory(tmp_path / "data" / "audit",
                                                             wanted=RecordFilter(kind=kpb.CONFIG_CHANGE))]
    events = [r for r in records if r.get("event", "").startswith("retention")]  # (the early sweep deleted nothing)
    assert [r["event"] for r in events] == ["retention starting", "retention"]  # the cut-off first, then the counts
    assert (events[1]["reviews_deleted"], events[1]["tasks_deleted"]) == (len(resolved), len(finished))
    assert {r["ended_before_unix_ns"] for r in events} == {swept.cutoff_unix_ns}
    assert events[1]["store_retention_days"] == 30

    # A restart reopens reviews from the audit log where rows are missing: deleted ones must not come back, and the
    # task still waiting finishes with its reviewer's action.
    server = start_claims_kernel(claims_models, tmp_path, store_retention_days=30)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reviews = kgrpc.ReviewServiceStub(channel)
        tasks = kgrpc.TaskServiceStub(channel)
        kept = _reviews(reviews, "")
        assert not set(resolved) & kept and claimed in kept and still_open <= kept
        reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=waiting.review_id, reviewer="bob"), timeout=TIMEOUT_S)
        reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=waiting.review_id, reviewer="bob",
                                                       action="approve"), timeout=TIMEOUT_S)
        done = _wait_for(tasks, waiting.task_id, (kpb.SUCCEEDED, kpb.FAILED))
        assert done.state == kpb.SUCCEEDED and done.decision.action == "approve"
    server.stop(grace=1)


def test_a_kernel_without_retention_keeps_everything(claims_models, tmp_path):
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        assert server.decisions._retention is None
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("days", [0.5, -1, 40_000])
def test_a_retention_outside_its_range_is_refused_naming_the_setting(days):
    with pytest.raises(SettingsError, match=r"store_retention_days \(from .*\) must be 0 \(keep for good\) or "):
        load_settings(None, {"store_retention_days": days}, environ={})


def test_tasks_finished_before_the_upgrade_count_as_finished_at_it(tmp_path):
    """A store from before retention (schema version 3) has the finished tasks' end times in their bodies only:
    the migration dates them at the upgrade, so none is deleted sooner than a retention period after it."""
    path = tmp_path / "kernel.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:3], str(path))
    for task_id, state in (("done", kpb.SUCCEEDED), ("running", kpb.RUNNING), ("cancelled", kpb.CANCELLED)):
        body = kpb.Task(task_id=task_id, state=state, updated_unix_ns=1).SerializeToString()
        conn.execute("INSERT INTO tasks (task_id, state, tenant, idempotency_key, request_hash, review_id, revision,"
                     " body) VALUES (?, ?, 'acme', '', '', '', 1, ?)", (task_id, state, body))
    conn.close()
    before = time.time_ns()
    db = open_database(tmp_path)
    try:
        with db.read() as read:
            ended = dict(read.execute("SELECT task_id, finished_unix_ns FROM tasks").fetchall())
        assert ended["running"] == 0
        assert before - 2 * 10**9 <= ended["done"] == ended["cancelled"] <= time.time_ns()
        assert db.tasks.delete_finished_before(before - DAY_NS, 100) == 0
        assert db.tasks.delete_finished_before(time.time_ns() + 10**9, 100) == 2
    finally:
        db.close()


def test_a_sweep_whose_starting_record_fails_deletes_nothing(tmp_path):
    """(Review audit) the record came only after the deletes: a kill or a failing log in between left rows gone
    with nothing on the log. The cut-off is recorded first; if that fails (the injected fault), nothing goes."""
    from kernel.store.retention import RetentionSweeper

    db = open_database(tmp_path)
    try:
        with db.write() as conn:
            conn.executemany("INSERT INTO tasks (task_id, state, tenant, idempotency_key, request_hash, review_id,"
                             " revision, body, finished_unix_ns) VALUES (?, ?, 'acme', '', '', '', 1, x'', 5)",
                             [(f"t{i}", kpb.SUCCEEDED) for i in range(3)])

        def log_that_fails(cutoff):
            raise OSError("the audit log cannot take records (injected)")

        sweeper = RetentionSweeper(db, 1, on_sweeping=log_that_fails)
        with pytest.raises(OSError, match="injected"):
            sweeper.sweep(time.time_ns())
        with db.read() as conn:
            assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 3
        assert RetentionSweeper(db, 1).sweep(time.time_ns()).tasks == 3  # (a working log: they go)
    finally:
        db.close()


def test_withdrawn_reviews_go_too(tmp_path):
    """A withdrawn review (its task cancelled) keeps the case's request, free text included, like a resolved one:
    retention deletes it as well (a review audit found them kept for good)."""
    from kernel.review import ReviewQueue
    from kernel.store.retention import RetentionSweeper

    db = open_database(tmp_path)
    try:
        queue = ReviewQueue(db)
        request = kpb.DecisionRequest(pipeline="claims_triage", tenant="acme", request_id="w1")
        request.text_fields["description"] = "the customer's own words"
        review = queue.create(kpb.Decision(request_id="w1", action="approve"), request, ["approve"], 60.0)
        queue.withdraw(review.review_id, "its task was cancelled")
        queue.close()
        assert RetentionSweeper(db, 1).sweep(time.time_ns() + 2 * DAY_NS).reviews == 1
        with db.read() as conn:
            assert conn.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
    finally:
        db.close()


@pytest.mark.parametrize("link", ["opened", "adopted"])
def test_a_resolved_review_stays_while_its_task_has_not_finished(tmp_path, link):
    """The resolved review is what refuses its task's cancel (one winner between a cancel and a reviewer): retention
    keeps it until the task that opened it (its task_id) or adopted it (a keyed Decide's review, named by the task's
    review_id) has finished, however long ago it was resolved."""
    from kernel.review import ReviewQueue
    from kernel.store.retention import RetentionSweeper

    db = open_database(tmp_path)
    try:
        queue = ReviewQueue(db)
        request = kpb.DecisionRequest(pipeline="claims_triage", tenant="acme", request_id="k1")
        opened_by = "task-1" if link == "opened" else ""
        review = queue.create(kpb.Decision(request_id="k1", action="approve"), request, ["approve", "deny"], 60.0,
                              task_id=opened_by)
        task = kpb.Task(task_id="task-1", state=kpb.WAITING_FOR_REVIEW, review_id=review.review_id)
        task.request.CopyFrom(request)
        db.tasks.insert(task, "hash")
        queue.claim(review.review_id, "alice")
        queue.resolve(review.review_id, "alice", "deny")
        queue.close()
        later = time.time_ns() + 2 * DAY_NS
        assert RetentionSweeper(db, 1).sweep(later).reviews == 0  # its task still waits (or runs) on it

        def succeed(task: kpb.Task) -> bool:
            task.state = kpb.SUCCEEDED
            task.updated_unix_ns = time.time_ns()
            return True

        db.tasks.update("task-1", succeed)
        swept = RetentionSweeper(db, 1).sweep(later)
        assert swept.reviews == 1  # the task finished: the review goes (the task itself a retention period later)
        with db.read() as conn:
            assert conn.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
    finally:
        db.close()


def test_a_list_tasks_token_still_finds_tasks_started_after_a_sweep_deleted_the_newest(claims_models, tmp_path):
    """ListTasks' token is a task's position (its rowid). The tasks table has no AUTOINCREMENT, so a sweep that
    deleted the newest tasks (they finished first) let the next task take a position a token had already passed:
    that task was never listed on the pages after the token (a review of ListTasks paging)."""
    from test_tasks_grpc import LARGE, SMALL, start_request

    server = start_claims_kernel(claims_models, tmp_path, store_retention_days=30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            waiting = tasks.StartTask(start_request(LARGE, tenant="paging"), timeout=TIMEOUT_S)
            _wait_for(tasks, waiting.task_id, (kpb.WAITING_FOR_REVIEW,))
            done = []
            for _ in range(2):
                task = tasks.StartTask(start_request(SMALL, tenant="paging"), timeout=TIMEOUT_S)
                done.append(_wait_for(tasks, task.task_id, (kpb.SUCCEEDED,)).task_id)
            first = tasks.ListTasks(kpb.ListTasksRequest(tenant="paging", page_size=2), timeout=TIMEOUT_S)
            assert [t.task_id for t in first.tasks] == [waiting.task_id, done[0]] and first.next_page_token
            assert server.decisions._retention.sweep(time.time_ns() + 31 * DAY_NS).tasks == 2  # both finished ones
            later = tasks.StartTask(start_request(LARGE, tenant="paging"), timeout=TIMEOUT_S)
            rest, token = [], first.next_page_token
            while token:
                page = tasks.ListTasks(kpb.ListTasksRequest(tenant="paging", page_size=2, page_token=token),
                                       timeout=TIMEOUT_S)
                rest += [t.task_id for t in page.tasks]
                token = page.next_page_token
            assert rest == [later.task_id]
    finally:
        server.stop(grace=1)
