"""TaskService and ReviewService end to end over real gRPC, on the sync and the grpc.aio front end.

A low-confidence case is started as a task, escalated to a review, seen by a
watching reviewer, listed, claimed and resolved; the task then completes
with the human's action. The pipeline is the deterministic fake of
``_task_server.py``; storage is a real SQLite file.
"""

from __future__ import annotations

import time

import grpc
import pytest

from _task_server import serve_task_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

TIMEOUT_S = 20


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    k, stop = serve_task_kernel(tmp_path_factory.mktemp(f"tasks-{request.param}"), request.param)
    yield k
    stop()
    k.close()


@pytest.fixture
def channel(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as ch:
        yield ch


@pytest.fixture
def tasks(channel):
    return kgrpc.TaskServiceStub(channel)


@pytest.fixture
def reviews(channel):
    return kgrpc.ReviewServiceStub(channel)


def start_request(key: str = "", pipeline: str = "claims", tenant: str = "acme", **fields) -> kpb.StartTaskRequest:
    req = kpb.StartTaskRequest()
    req.request.pipeline, req.request.tenant, req.request.idempotency_key = pipeline, tenant, key
    for name, value in fields.items():
        if isinstance(value, int):
            req.request.fields[name].int_value = value
        else:
            req.request.fields[name].number_value = value
    return req


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


def test_low_confidence_case_is_escalated_listed_claimed_resolved_and_the_task_completes(tasks, reviews):
    pipeline = "claims-e2e"
    watcher = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline=pipeline, include_open=True), timeout=TIMEOUT_S)
    task = tasks.StartTask(start_request(pipeline=pipeline, amount=250.0, confidence=0.2), timeout=TIMEOUT_S)
    assert task.state == kpb.QUEUED and task.task_id

    task_stream = tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    waiting = until(task_stream, kpb.WAITING_FOR_REVIEW)
    assert waiting.review_id and waiting.decision.outcome == kpb.ESCALATED

    seen = next(watcher)  # the reviewer's screen gets the new item
    assert seen.review_id == waiting.review_id and seen.task_id == task.task_id and seen.state == "OPEN"
    assert seen.request.fields["amount"].number_value == 250.0 and list(seen.actions) == ["approve", "deny"]
    watcher.cancel()

    listed = reviews.ListReviews(kpb.ListReviewsRequest(pipeline=pipeline, state="OPEN"), timeout=TIMEOUT_S)
    assert [r.review_id for r in listed.reviews] == [waiting.review_id]
    assert listed.reviews[0].proposed.action == "approve" and listed.sla_missed == 0

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
    assert done.decision.reasons[0].rule_id == "reviewer:alice" and done.decision.reasons[0].description == "duplicate claim"
    assert list(task_stream) == []  # the watch ends at the final state
    fetched = tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    assert fetched.state == kpb.SUCCEEDED and fetched.review_id == waiting.review_id
    assert [h.state for h in fetched.history] == [kpb.QUEUED, kpb.RUNNING, kpb.WAITING_FOR_REVIEW, kpb.SUCCEEDED]
    assert [r.review_id for r in reviews.ListReviews(kpb.ListReviewsRequest(pipeline=pipeline, state="RESOLVED"),
                                                     timeout=TIMEOUT_S).reviews] == [waiting.review_id]


def test_confident_case_succeeds_without_review_and_transient_failures_are_retried(tasks):
    task = tasks.StartTask(start_request(amount=5000.0, transient_failures=1), timeout=TIMEOUT_S)
    done = until(tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S), kpb.SUCCEEDED)
    assert done.decision.action == "deny" and done.attempts == 2 and done.review_id == ""


def test_start_task_with_an_idempotency_key(tasks):
    first = tasks.StartTask(start_request(key="order-17", amount=1.0), timeout=TIMEOUT_S)
    again = tasks.StartTask(start_request(key="order-17", amount=1.0), timeout=TIMEOUT_S)
    assert again.task_id == first.task_id
    code, details = code_of(tasks.StartTask, start_request(key="order-17", amount=2.0))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "request.idempotency_key 'order-17'" in details


def test_cancel_a_waiting_task_ends_its_watch(tasks):
    task = tasks.StartTask(start_request(confidence=0.1), timeout=TIMEOUT_S)
    stream = tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    until(stream, kpb.WAITING_FOR_REVIEW)
    assert tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
    assert [t.state for t in stream] == [kpb.CANCELLED]
    code, details = code_of(tasks.CancelTask, kpb.TaskRef(task_id=task.task_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already CANCELLED" in details


def test_bad_task_calls_get_named_status_codes(tasks):
    cases = [
        (tasks.StartTask, kpb.StartTaskRequest(), grpc.StatusCode.INVALID_ARGUMENT, "request is required"),
        (tasks.StartTask, start_request(pipeline=""), grpc.StatusCode.INVALID_ARGUMENT, "request.pipeline is required"),
        (tasks.StartTask, start_request(key="k" * 300), grpc.StatusCode.INVALID_ARGUMENT, "request.idempotency_key"),
        (tasks.GetTask, kpb.TaskRef(task_id="nope"), grpc.StatusCode.NOT_FOUND, "task 'nope' does not exist"),
        (tasks.GetTask, kpb.TaskRef(), grpc.StatusCode.INVALID_ARGUMENT, "task_id is required"),
        (tasks.CancelTask, kpb.TaskRef(task_id="nope"), grpc.StatusCode.NOT_FOUND, "task 'nope'"),
        (tasks.WatchTask, kpb.TaskRef(task_id="nope"), grpc.StatusCode.NOT_FOUND, "task 'nope'"),
    ]
    for call, message, code, text in cases:
        got_code, details = code_of(call, message)
        assert (got_code, text in details) == (code, True), (call, details)


def test_a_client_leaving_a_watch_releases_it_on_the_server(kernel, tasks):
    task = tasks.StartTask(start_request(confidence=0.1), timeout=TIMEOUT_S)
    stream = tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
    until(stream, kpb.WAITING_FOR_REVIEW)
    assert kernel.store.watcher_count(task.task_id) == 1
    stream.cancel()
    wait_until(lambda: kernel.store.watcher_count(task.task_id) == 0)
