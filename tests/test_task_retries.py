"""Durable tasks outlive a model reload and a busy queue: those failures are retried with the kernel's backoff
settings, and a decision an attempt recorded is never made twice.

A real kernel serving the claims pipeline, called over gRPC; the model is
unloaded and loaded with Triton's repository RPCs, as an operator does. A
busy queue and a stalled kernel are faults injected on purpose (named so
below): the attempt's wait is stretched past its deadline, at the one place
each case happens.
"""

from __future__ import annotations

import time

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel, start_claims_kernel
from lane_support import until
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

TIMEOUT_S = 30
FINAL = (kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED)
MODEL = "claims_triage"


# Quick retries for the test, many of them: the kernel's settings, not the runner's own defaults.
server, channel = module_claims_kernel("retries", task_max_attempts=40, task_backoff_s=0.05, task_max_backoff_s=0.2)


def automated_claim(request_id: str, timeout_ms: int = 0) -> kpb.StartTaskRequest:
    """A claim the policy decides alone (R08: small, clean, confident): the task ends SUCCEEDED."""
    case = dict(data.generate_cases(1, seed=7)[0], claim_amount=800.0, customer_tier="gold", fraud_score=0.05,
                prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    return kpb.StartTaskRequest(request=claim_request(case, request_id=request_id, timeout_ms=timeout_ms))


def final_state(tasks, task_id: str) -> kpb.Task:
    last = None
    for last in tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
        if last.state in FINAL:
            break
    return last




def task_decisions(server, task_id: str) -> list[kpb.AuditRecord]:
    return [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION) if r.task_id == task_id]


def retries(task: kpb.Task) -> list[str]:
    return [step.detail for step in task.history if step.state == kpb.QUEUED and "retry in" in step.detail]


def test_a_task_outlives_a_model_reload(server, channel):
    tasks, repository = kgrpc.TaskServiceStub(channel), pb_grpc.GRPCInferenceServiceStub(channel)
    repository.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=TIMEOUT_S)
    try:
        with pytest.raises(grpc.RpcError) as refused:  # a caller is told to retry: the pipeline is there
            kgrpc.DecisionServiceStub(channel).Decide(automated_claim("reload-0").request, timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "decides again once the model is loaded" in refused.value.details()
        task = tasks.StartTask(automated_claim("reload-1"), timeout=TIMEOUT_S)  # the pipeline is still loaded
        ref = kpb.TaskRef(task_id=task.task_id)
        failed_once = _until(lambda: retries(t := tasks.GetTask(ref, timeout=TIMEOUT_S)) and t,
                               "a retry of the attempt that found no model")
        assert f"UNAVAILABLE: pipeline 'claims_triage' cannot decide now: model '{MODEL}' is not loaded" in retries(failed_once)[0]
        assert retries(failed_once)[0].endswith("retry in 0.05 s")  # task_backoff_s
    finally:
        repository.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=TIMEOUT_S)
    done = final_state(tasks, task.task_id)
    assert done.state == kpb.SUCCEEDED and done.attempts >= 2, done
    assert [r.sequence for r in task_decisions(server, task.task_id)] == [done.decision.audit_sequence]


def test_an_attempt_whose_deadline_passes_in_a_busy_queue_is_retried(server, channel, monkeypatch):
    engine, held = server.decisions.engine, []
    real_run = engine.run_blocking

    def busy_queue_once(pending, on_wait=None):  # fault injected on purpose: the first attempt waits past its deadline
        if not held:
            held.append(pending.request_id)
            time.sleep(max(0, pending.item.deadline_ns - time.monotonic_ns()) / 1e9 + 0.02)
        return real_run(pending, on_wait)

    monkeypatch.setattr(engine, "run_blocking", busy_queue_once)
    tasks = kgrpc.TaskServiceStub(channel)
    task = tasks.StartTask(automated_claim("busy-1", timeout_ms=500), timeout=TIMEOUT_S)  # 500 ms per attempt
    done = final_state(tasks, task.task_id)
    assert done.state == kpb.SUCCEEDED and done.attempts == 2, done
    (retry,) = retries(done)
    assert retry.startswith("attempt 1 failed (DEADLINE_EXCEEDED: ") and retry.endswith("; retry in 0.05 s")
    assert [r.sequence for r in task_decisions(server, task.task_id)] == [done.decision.audit_sequence]


def test_a_decision_recorded_after_its_deadline_is_the_tasks_outcome_not_a_retry(server, channel, monkeypatch):
    engine = server.decisions.engine
    real_run = engine.run_blocking

    def stalls_after_the_model(pending, on_wait=None):  # fault injected on purpose: the model answers in time,
        real_run(pending, on_wait)  # then the kernel stalls past the deadline before it decides and records
        time.sleep(max(0, pending.item.deadline_ns - time.monotonic_ns()) / 1e9 + 0.02)

    monkeypatch.setattr(engine, "run_blocking", stalls_after_the_model)
    tasks = kgrpc.TaskServiceStub(channel)
    task = tasks.StartTask(automated_claim("late-1", timeout_ms=500), timeout=TIMEOUT_S)
    done = final_state(tasks, task.task_id)
    (recorded,) = task_decisions(server, task.task_id)  # decided once
    assert done.state == kpb.SUCCEEDED and done.attempts == 1 and retries(done) == [], done
    assert done.decision.audit_sequence == recorded.sequence and done.decision.action == recorded.decision.action


def test_a_task_gives_up_after_the_settings_attempts(claims_models, tmp_path):
    kernel = start_claims_kernel(claims_models, tmp_path, task_max_attempts=3, task_backoff_s=0.05, task_max_backoff_s=0.08)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=TIMEOUT_S)
            tasks = kgrpc.TaskServiceStub(channel)
            task = tasks.StartTask(automated_claim("gone-1"), timeout=TIMEOUT_S)
            done = final_state(tasks, task.task_id)
    finally:
        kernel.stop(grace=1)
    assert done.state == kpb.FAILED and done.attempts == 3
    assert done.error.startswith(f"gave up after 3 attempts; last error: UNAVAILABLE: pipeline 'claims_triage' cannot "
                                 f"decide now: model '{MODEL}' is not loaded")
    assert [detail.rsplit("; ", 1)[1] for detail in retries(done)] == ["retry in 0.05 s", "retry in 0.08 s"]


def _until(predicate, what: str):
    return until(predicate, what, TIMEOUT_S, every_s=0.02)


def test_a_deadline_shorter_than_the_model_s_own_run_fails_the_task_at_once(claims_models, tmp_path):
    # The lane refuses such a request DEADLINE_EXCEEDED "retrying as it is would fail the same way" (nothing is
    # ahead of it: the wait it predicts is the model's own run), and the task retried it all the same, 10 times
    # over ~4 minutes by default, before failing with "gave up after 10 attempts" (a workflow engine's poisoned case).
    kernel = start_claims_kernel(claims_models, tmp_path, task_max_attempts=5, task_backoff_s=0.05,
                                 task_max_backoff_s=0.05)
    try:
        model = kernel.hub.get(MODEL)
        lane = kernel.lanes.for_model(model)
        for _ in range(60):  # fault injected on purpose: the model measured slow (~10 s a row), as on a busy host
            lane.scheduler.observe(model, 1, 10 * 10**9)
        assert lane.predict(model, 1) > 1_000_000_000, "the fit no longer learns from observed runs"
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            task = tasks.StartTask(automated_claim("too-short-1", timeout_ms=200), timeout=TIMEOUT_S)
            done = final_state(tasks, task.task_id)
    finally:
        kernel.stop(grace=1)
    assert done.state == kpb.FAILED and done.attempts == 1 and retries(done) == [], done
    assert done.error.startswith(f"DEADLINE_EXCEEDED: model {MODEL}/1 cannot finish this request within its deadline")


def test_an_attempt_the_environment_refuses_is_retried_not_failed(server, channel, monkeypatch):
    """An attempt that met the kernel's environment running out (EMFILE: no descriptor left; kernel/os_faults.py)
    failed the task at once, for good, with a traceback and a reason quoting the server's file. That may pass: it is
    retried with the backoff, as an UNAVAILABLE is, and the reason names no file."""
    import errno

    engine, failed = server.decisions.engine, []
    real_run = engine.run_blocking

    def out_of_descriptors_once(pending, on_wait=None):  # fault injected on purpose: the OS's EMFILE, once
        if not failed:
            failed.append(pending.request_id)
            raise OSError(errno.EMFILE, "Too many open files", "/srv/aios-private/models/x.onnx")
        return real_run(pending, on_wait)

    monkeypatch.setattr(engine, "run_blocking", out_of_descriptors_once)
    tasks = kgrpc.TaskServiceStub(channel)
    task = tasks.StartTask(automated_claim("emfile-1"), timeout=TIMEOUT_S)
    done = final_state(tasks, task.task_id)
    assert done.state == kpb.SUCCEEDED and done.attempts == 2, done
    (retry,) = retries(done)
    assert retry.startswith("attempt 1 failed (UNAVAILABLE: the kernel's process ran out of file descriptors "
                            "(EMFILE: Too many open files)"), retry
    assert "aios-private" not in retry, retry
