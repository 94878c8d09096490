"""TaskService and ReviewService end to end over real gRPC, on the sync and the grpc.aio front end.

A case the model is unsure of is started as a task, escalated to a review, seen by a watching reviewer,
listed, claimed and resolved; the task then completes with the human's action. A real kernel serving the
claims pipeline (its model, policy, audit log and store), once per front end. The one stand-in is a fault
injected on purpose and named so below: an attempt that fails once as a busy model would.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from claims_support import UNSURE_CASE, claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.errors import TransientError

TIMEOUT_S = 20
PIPELINE = "claims_triage"

UNSURE = UNSURE_CASE  # the model's confidence is below the policy's 0.6: R02 sends it to a human
LARGE = dict(data.generate_cases(1, seed=11)[0], claim_amount=90000.0)  # R04: always seen by a human
SMALL = dict(data.generate_cases(1, seed=7)[0], claim_amount=800.0, customer_tier="gold", fraud_score=0.05,
             prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto",
             days_since_incident=3)  # R08: small, clean and confident: fast-tracked with no human


server, channel = module_claims_kernel("tasks", front_ends=("sync", "aio"), task_backoff_s=0.01)


@pytest.fixture
def tasks(channel):
    return kgrpc.TaskServiceStub(channel)


@pytest.fixture
def reviews(channel):
    return kgrpc.ReviewServiceStub(channel)


def start_request(case: dict, key: str = "", tenant: str = "acme", **options) -> kpb.StartTaskRequest:
    return kpb.StartTaskRequest(request=claim_request(case, tenant=tenant, idempotency_key=key, **options))


def until(stream, state: int) -> kpb.Task:
    for task in stream:
        if task.state == state:
            return task
    raise AssertionError(f"the watch ended before {kpb.TaskState.Name(state)}")


def wait_until(predicate, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def code_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=TIMEOUT_S)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return info.value.code(), info.value.details()


def task_records(server, task_id: str) -> list[kpb.AuditRecord]:
    return [r for r in server.decisions.audit.read(from_sequence=0) if r.task_id == task_id]


def test_low_confidence_case_is_escalated_listed_claimed_resolved_and_the_task_completes(server, tasks, reviews):
    tenant = "e2e"
    watcher = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline=PIPELINE, tenant=tenant, include_open=True),
                                   timeout=TIMEOUT_S)
    task = tasks.StartTask(start_request(UNSURE, tenant=tenant), timeout=TIMEOUT_S)
    assert task.state == kpb.QUEUED and task.task_id and not task.replayed

    task_stream = tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    waiting = until(task_stream, kpb.WAITING_FOR_REVIEW)
    assert waiting.review_id and waiting.decision.outcome == kpb.ESCALATED
    assert waiting.decision.model.confidence < 0.6 and waiting.decision.reasons[0].rule_id == "R02"

    seen = next(watcher)  # the reviewer's screen gets the new item
    assert seen.review_id == waiting.review_id and seen.task_id == task.task_id and seen.state == "OPEN"
    assert seen.request.fields["claim_amount"].number_value == UNSURE["claim_amount"]
    assert list(seen.actions) == ["approve", "deny", "request_info"]
    watcher.cancel()

    listed = reviews.ListReviews(kpb.ListReviewsRequest(pipeline=PIPELINE, tenant=tenant, state="OPEN"),
                                 timeout=TIMEOUT_S)
    assert [r.review_id for r in listed.reviews] == [waiting.review_id]
    assert listed.reviews[0].proposed.action == "review" and listed.sla_missed == 0

    claimed = reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=waiting.review_id, reviewer="alice",
                                                         lease_seconds=120), timeout=TIMEOUT_S)
    assert claimed.state == "CLAIMED" and claimed.claimed_by == "alice"
    code, details = code_of(reviews.ClaimReview, kpb.ClaimReviewRequest(review_id=waiting.review_id, reviewer="bob"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "claimed by alice" in details

    resolved = reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=waiting.review_id, reviewer="alice",
                                                              action="deny", comment="duplicate claim"),
                                     timeout=TIMEOUT_S)
    assert resolved.state == "RESOLVED" and resolved.resolved_action == "deny"
    assert resolved.resolution.action == "deny" and resolved.resolution.outcome == kpb.REVIEWED

    done = until(task_stream, kpb.SUCCEEDED)
    assert done.decision.action == "deny" and done.decision.outcome == kpb.REVIEWED
    assert (done.decision.reasons[0].rule_id, done.decision.reasons[0].description) == (
        "REVIEW", "decided by alice: duplicate claim")
    assert list(task_stream) == []  # the watch ends at the final state
    fetched = tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    assert fetched.state == kpb.SUCCEEDED and fetched.review_id == waiting.review_id
    assert [h.state for h in fetched.history] == [kpb.QUEUED, kpb.RUNNING, kpb.WAITING_FOR_REVIEW, kpb.SUCCEEDED]
    assert [r.review_id for r in reviews.ListReviews(kpb.ListReviewsRequest(tenant=tenant, state="RESOLVED"),
                                                     timeout=TIMEOUT_S).reviews] == [waiting.review_id]
    # On the audit log: the escalated decision, then the reviewer's, which the task ended with.
    records = task_records(server, task.task_id)
    assert [(r.kind, r.decision.outcome) for r in records] == [(kpb.DECISION, kpb.ESCALATED),
                                                               (kpb.REVIEW_RESOLUTION, kpb.REVIEWED)]
    assert [r.sequence for r in records] == [waiting.decision.audit_sequence, fetched.decision.audit_sequence]


def fail_first_attempt(monkeypatch, runner, request_id: str) -> None:
    """Fault injected on purpose: the first attempt of the task for ``request_id`` fails as a busy model would
    (TransientError, before the pipeline runs); its later attempts, and every other task, run the real pipeline."""
    real_run = runner.run_fn

    def busy_once(task):
        if task.request.request_id == request_id and task.attempts == 1:
            raise TransientError(f"model busy on attempt {task.attempts}")
        return real_run(task)

    monkeypatch.setattr(runner, "run_fn", busy_once)


def test_confident_case_succeeds_without_review_and_transient_failures_are_retried(server, tasks, monkeypatch):
    fail_first_attempt(monkeypatch, server.decisions.tasks, "busy-once")
    task = tasks.StartTask(start_request(SMALL, request_id="busy-once"), timeout=TIMEOUT_S)
    done = until(tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S), kpb.SUCCEEDED)
    assert done.decision.action == "fast_track" and done.attempts == 2 and done.review_id == ""
    assert done.decision.outcome == kpb.AUTOMATED and done.decision.reasons[0].rule_id == "R08"
    retried = [h.detail for h in done.history if h.state == kpb.QUEUED and "retry in" in h.detail]
    assert len(retried) == 1 and "model busy on attempt 1" in retried[0], list(done.history)
    assert [r.sequence for r in task_records(server, task.task_id)] == [done.decision.audit_sequence]  # decided once


def hold_first_attempt(monkeypatch, runner, request_id: str) -> threading.Event:
    """Fault injected on purpose: the task for ``request_id`` is held at the start of its attempt, before it
    decides, until the returned event is set."""
    release, real_run = threading.Event(), runner.run_fn

    def held(task):
        if task.request.request_id == request_id:
            assert release.wait(TIMEOUT_S), "the test never released the held attempt"
        return real_run(task)

    monkeypatch.setattr(runner, "run_fn", held)
    return release


def test_start_task_with_an_idempotency_key(server, tasks, monkeypatch):
    release = hold_first_attempt(monkeypatch, server.decisions.tasks, "order-17")
    try:
        first = tasks.StartTask(start_request(SMALL, key="order-17", request_id="order-17"), timeout=TIMEOUT_S)
        again = tasks.StartTask(start_request(SMALL, key="order-17", request_id="order-17"), timeout=TIMEOUT_S)
        assert again.task_id == first.task_id and (first.replayed, again.replayed) == (False, True)
        other = dict(SMALL, claim_amount=SMALL["claim_amount"] + 1)
        # Before the task has decided, the task store refuses it, naming the task the key started ...
        code, details = code_of(tasks.StartTask, start_request(other, key="order-17"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"request.idempotency_key 'order-17' already started task {first.task_id} with a different" in details
    finally:
        release.set()
    done = until(tasks.WatchTask(kpb.TaskRef(task_id=first.task_id), timeout=TIMEOUT_S), kpb.SUCCEEDED)
    # ... and once its decision is stored under the key too: the task is named still (it was not: "was used before").
    code, details = code_of(tasks.StartTask, start_request(other, key="order-17"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"request.idempotency_key 'order-17' already started task {first.task_id} with a different" in details
    replayed = tasks.StartTask(start_request(SMALL, key="order-17", request_id="order-17"), timeout=TIMEOUT_S)
    assert (replayed.task_id, replayed.replayed, replayed.state) == (first.task_id, True, kpb.SUCCEEDED)
    assert [r.sequence for r in task_records(server, first.task_id)] == [done.decision.audit_sequence]  # run once


def test_cancel_a_waiting_task_ends_its_watch(tasks, reviews):
    task = tasks.StartTask(start_request(LARGE, tenant="cancel"), timeout=TIMEOUT_S)
    stream = tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    waiting = until(stream, kpb.WAITING_FOR_REVIEW)
    assert tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
    assert [t.state for t in stream] == [kpb.CANCELLED]
    code, details = code_of(tasks.CancelTask, kpb.TaskRef(task_id=task.task_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already CANCELLED" in details
    withdrawn = reviews.GetReview(kpb.ReviewRef(review_id=waiting.review_id), timeout=TIMEOUT_S)
    assert (withdrawn.state, withdrawn.resolved_action) == ("RESOLVED", "")  # nobody is left to decide it


def test_bad_task_calls_get_named_status_codes(tasks):
    S = grpc.StatusCode
    no_pipeline = start_request(SMALL)
    no_pipeline.request.pipeline = ""
    unknown = start_request(SMALL)
    unknown.request.pipeline = "nope"
    cases = [
        (tasks.StartTask, kpb.StartTaskRequest(), S.INVALID_ARGUMENT, "request is required"),
        (tasks.StartTask, no_pipeline, S.INVALID_ARGUMENT, "request.pipeline is required"),
        (tasks.StartTask, unknown, S.NOT_FOUND, "pipeline 'nope'"),
        (tasks.StartTask, start_request(SMALL, key="k" * 300), S.INVALID_ARGUMENT, "request.idempotency_key"),
        (tasks.GetTask, kpb.TaskRef(task_id="nope"), S.NOT_FOUND, "task 'nope' does not exist"),
        (tasks.GetTask, kpb.TaskRef(), S.INVALID_ARGUMENT, "task_id is required"),
        (tasks.CancelTask, kpb.TaskRef(task_id="nope"), S.NOT_FOUND, "task 'nope'"),
        (tasks.WatchTask, kpb.TaskRef(task_id="nope"), S.NOT_FOUND, "task 'nope'"),
        (tasks.ListTasks, kpb.ListTasksRequest(states=[9]), S.INVALID_ARGUMENT, "states: 9 is not a task state"),
        (tasks.ListTasks, kpb.ListTasksRequest(states=[0]), S.INVALID_ARGUMENT, "states: 0 is not a task state"),
        (tasks.ListTasks, kpb.ListTasksRequest(tenant="a\nb"), S.INVALID_ARGUMENT, "tenant must not contain"),
        (tasks.ListTasks, kpb.ListTasksRequest(page_token="junk"), S.INVALID_ARGUMENT, "page_token is not a token"),
    ]
    for call, message, code, text in cases:
        got_code, details = code_of(call, message)
        assert (got_code, text in details) == (code, True), (call, details)


def test_list_tasks_pages_through_a_tenants_tasks_by_state(tasks, reviews):
    """(A workflow engine's audit: no way to find the tasks stuck QUEUED or RUNNING, or a tenant's.) ListTasks,
    oldest first, filtered by tenant and states, in pages whose token keeps its filters."""
    tenant = f"list-{threading.get_ident()}-{time.monotonic_ns()}"
    waiting = [tasks.StartTask(start_request(LARGE, tenant=tenant), timeout=TIMEOUT_S) for _ in range(3)]
    done = tasks.StartTask(start_request(SMALL, tenant=tenant), timeout=TIMEOUT_S)
    until(tasks.WatchTask(kpb.TaskRef(task_id=done.task_id), timeout=TIMEOUT_S), kpb.SUCCEEDED)
    for task in waiting:
        until(tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S), kpb.WAITING_FOR_REVIEW)

    def listed(**filters) -> list[str]:
        found, token = [], ""
        while True:
            page = tasks.ListTasks(kpb.ListTasksRequest(tenant=tenant, page_size=2, page_token=token, **filters),
                                   timeout=TIMEOUT_S)
            assert len(page.tasks) <= 2 and all(t.tenant == tenant for t in [t.request for t in page.tasks])
            found += [t.task_id for t in page.tasks]
            token = page.next_page_token
            if not token:
                return found

    assert listed() == [t.task_id for t in [*waiting, done]]
    assert listed(states=[kpb.WAITING_FOR_REVIEW, kpb.RUNNING]) == [t.task_id for t in waiting]
    assert listed(states=[kpb.SUCCEEDED]) == [done.task_id]
    first = tasks.ListTasks(kpb.ListTasksRequest(tenant=tenant, page_size=1), timeout=TIMEOUT_S)
    other = kpb.ListTasksRequest(tenant=tenant, states=[kpb.FAILED], page_token=first.next_page_token)
    assert code_of(tasks.ListTasks, other)[0] == grpc.StatusCode.INVALID_ARGUMENT  # (a token keeps its filters)


def test_a_client_leaving_a_watch_releases_it_on_the_server(server, tasks):
    store = server.decisions.tasks.store
    task = tasks.StartTask(start_request(LARGE, tenant="leaving"), timeout=TIMEOUT_S)
    stream = tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    until(stream, kpb.WAITING_FOR_REVIEW)
    assert store.watcher_count(task.task_id) == 1
    stream.cancel()
    wait_until(lambda: store.watcher_count(task.task_id) == 0)
