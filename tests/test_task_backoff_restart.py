"""A task waiting out its retry back-off when the kernel stops is run after the restart when the wait is over:
not at once (a restart retried every such task in one burst on whatever had made them fail), and not later
than the longest back-off the restarted kernel allows (a wall clock set back, or a lower task_max_backoff_s).

Real ``aios-kernel serve`` processes on one data directory, killed with SIGKILL and started again. The
attempt fails the way an operator's model reload makes it fail: the model unloaded over Triton's repository
RPC (a failure that may pass, so the task is QUEUED for a retry). The restarted kernel loads it again.
"""

from __future__ import annotations

import os
import re

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing.processes import ServeProcess

TIMEOUT_S = 60
MODEL = "claims_triage"
SMALL = {"claim_amount": 800.0, "policy_age_months": 40, "customer_tier": "gold", "claim_type": "auto",
         "prior_claims": 0, "fraud_score": 0.05, "days_since_incident": 3,
         "has_police_report": True}  # R08: decided without a human


@pytest.fixture
def kernels():
    started: list[ServeProcess] = []
    yield started
    for kernel in started:
        if kernel.proc.poll() is None:
            kernel.kill()


def serve(kernels, models, pipelines, data_dir, backoff_s: float, max_backoff_s: float) -> ServeProcess:
    env = {**os.environ, "AIOS_TASK_BACKOFF_S": str(backoff_s), "AIOS_TASK_MAX_BACKOFF_S": str(max_backoff_s)}
    kernel = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir,
                          env=env)
    kernels.append(kernel)
    return kernel


def watch_until(address: str, task_id: str, predicate) -> kpb.Task:
    with grpc.insecure_channel(address) as channel:
        for task in kgrpc.TaskServiceStub(channel).WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
            if predicate(task):
                return task
    raise AssertionError(f"task {task_id} ended without reaching the expected state")


def waiting_for_a_retry(kernel: ServeProcess, request_id: str) -> kpb.Task:
    """A task whose first attempt found its model unloaded: QUEUED, its next run stored."""
    with grpc.insecure_channel(kernel.address) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=TIMEOUT_S)
        task = kgrpc.TaskServiceStub(channel).StartTask(
            kpb.StartTaskRequest(request=claim_request(SMALL, request_id=request_id)), timeout=TIMEOUT_S)
    queued = watch_until(kernel.address, task.task_id, lambda t: t.state == kpb.QUEUED and t.attempts == 1)
    assert queued.next_attempt_unix_ns > 0, queued
    return queued


def second_run(task: kpb.Task) -> kpb.TaskTransition:
    (run,) = [step for step in task.history if step.state == kpb.RUNNING and step.attempt == 2]
    return run


def test_a_restart_keeps_a_tasks_back_off(tmp_path, kernels):
    models, pipelines, data_dir = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "p"), tmp_path / "d"
    # Longer than a restart takes here (a few seconds), so a retry at once is seen running before its time.
    first = serve(kernels, models, pipelines, data_dir, backoff_s=12, max_backoff_s=12)
    queued = waiting_for_a_retry(first, "backoff-1")
    first.kill()

    second = serve(kernels, models, pipelines, data_dir, backoff_s=12, max_backoff_s=12)
    done = watch_until(second.address, queued.task_id, lambda t: t.state in (kpb.SUCCEEDED, kpb.FAILED))
    assert (done.state, done.attempts) == (kpb.SUCCEEDED, 2), done
    run = second_run(done)
    # (A restart slower than the back-off would run it in time anyway: the test then shows nothing, and passes.)
    assert run.at_unix_ns >= queued.next_attempt_unix_ns, (
        f"attempt 2 ran {(queued.next_attempt_unix_ns - run.at_unix_ns) / 1e9:.1f} s before its back-off ended")
    second.stop()


def test_a_restart_waits_no_longer_than_its_longest_back_off(tmp_path, kernels):
    """The stored next run is an hour away (as after a wall clock set back by an hour, or a lower setting): the
    restarted kernel, whose longest back-off is 1 s, runs the task within that, not in an hour."""
    models, pipelines, data_dir = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "p"), tmp_path / "d"
    first = serve(kernels, models, pipelines, data_dir, backoff_s=3600, max_backoff_s=3600)
    queued = waiting_for_a_retry(first, "backoff-2")
    assert queued.next_attempt_unix_ns - queued.updated_unix_ns == 3600 * 10**9
    first.kill()

    second = serve(kernels, models, pipelines, data_dir, backoff_s=0.5, max_backoff_s=1)
    done = watch_until(second.address, queued.task_id, lambda t: t.state in (kpb.SUCCEEDED, kpb.FAILED))
    assert (done.state, done.attempts) == (kpb.SUCCEEDED, 2), done
    assert second_run(done).at_unix_ns < queued.next_attempt_unix_ns
    # The next run the restart stored in its place (`task get`'s "next run" said "in 59 min" meanwhile).
    (moved,) = [step.detail for step in done.history if step.detail.startswith("next run in ")]
    assert re.match(r"next run in 1 s: the one stored was 3\d{3} s away, past task_max_backoff_s", moved), moved
    second.stop()
