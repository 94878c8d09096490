"""Crashes and restarts of a real kernel process: nothing acknowledged is lost, tasks carry on."""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory, verify_directory
from kernel.testing.processes import ServeProcess

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("claims_models"))


@pytest.fixture
def pipelines(tmp_path):
    return copy_pipelines(tmp_path / "pipelines")


_request = claim_request


def _wait_for_state(tasks, task_id: str, wanted: int, timeout: float = 20.0) -> kpb.Task:
    for update in tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=timeout):
        if update.state == wanted:
            return update
    raise AssertionError(f"task {task_id} never reached {kpb.TaskState.Name(wanted)}")


def test_kill_9_mid_load_loses_no_acknowledged_decision(models, pipelines, tmp_path):
    data_dir = tmp_path / "data"
    server = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    cases = data.generate_cases(400, seed=8)
    acknowledged: dict[str, tuple[int, str]] = {}
    lock = threading.Lock()
    enough = threading.Event()
    failures: list[str] = []

    def client(k: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i in range(k, 100_000, 4):
                try:
                    d = stub.Decide(_request(cases[i % len(cases)], request_id=f"r{i}"), timeout=10)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                    return  # the server is gone: this request was never acknowledged
                with lock:
                    acknowledged[d.request_id] = (d.audit_sequence, d.audit_hash)
                    if len(acknowledged) >= 300:
                        enough.set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    assert enough.wait(120), f"the kernel answered {len(acknowledged)} decisions; client errors: {failures}"
    server.kill()  # while the four clients still have calls in flight
    for t in threads:
        t.join(timeout=30)

    restarted = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    with grpc.insecure_channel(restarted.address) as channel:  # it serves again, on the recovered log
        after = kgrpc.DecisionServiceStub(channel).Decide(_request(cases[0], request_id="after"), timeout=10)
    code, err = restarted.stop()
    assert code == 0, err
    audit = data_dir / "audit"
    result = verify_directory(audit)
    assert result.ok, result.describe()
    records = {r.sequence: r for r in iter_directory(audit, 0, RecordFilter())}
    for request_id, (sequence, digest) in acknowledged.items():
        record = records.get(sequence)
        assert record is not None, f"acknowledged decision {request_id} (#{sequence}) is missing"
        assert record.request_id == request_id and record.hash.hex() == digest
    assert records[after.audit_sequence].request_id == "after"
    # The last decision, then the clean stop's own record (tests/test_audit_governance.py).
    assert after.audit_sequence == max(records) - 1
    assert json.loads(records[max(records)].payload)["event"] == "kernel stopping"


def test_tasks_survive_a_kill_9(models, pipelines, tmp_path):
    data_dir = tmp_path / "data"
    server = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    small = dict(data.generate_cases(1, seed=99)[0], claim_amount=800.0, customer_tier="bronze", fraud_score=0.05,
                 prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    large = dict(small, claim_amount=90000.0)  # R04: a human decides
    with grpc.insecure_channel(server.address) as channel:
        tasks = kgrpc.TaskServiceStub(channel)
        done = tasks.StartTask(kpb.StartTaskRequest(request=_request(small, idempotency_key="t-small")), timeout=10)
        waiting = tasks.StartTask(kpb.StartTaskRequest(request=_request(large, idempotency_key="t-large")), timeout=10)
        done = _wait_for_state(tasks, done.task_id, kpb.SUCCEEDED)
        waiting = _wait_for_state(tasks, waiting.task_id, kpb.WAITING_FOR_REVIEW)
    server.kill()

    restarted = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            again = tasks.GetTask(kpb.TaskRef(task_id=done.task_id), timeout=5)
            assert again.state == kpb.SUCCEEDED and again.decision == done.decision
            # The same idempotency key finds the same task instead of starting another.
            same = tasks.StartTask(kpb.StartTaskRequest(request=_request(large, idempotency_key="t-large")), timeout=5)
            assert same.task_id == waiting.task_id
            still = tasks.GetTask(kpb.TaskRef(task_id=waiting.task_id), timeout=5)
            assert still.state == kpb.WAITING_FOR_REVIEW and still.review_id == waiting.review_id
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=still.review_id, reviewer="carol", lease_seconds=30), timeout=5)
            reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=still.review_id, reviewer="carol", action="approve",
                                                           comment="documents check out"), timeout=10)
            final = _wait_for_state(tasks, waiting.task_id, kpb.SUCCEEDED)
            assert final.decision.action == "approve" and final.decision.outcome == kpb.REVIEWED
    finally:
        code, err = restarted.stop()
    assert code == 0, err
    assert verify_directory(data_dir / "audit").ok
