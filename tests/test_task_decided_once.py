"""A task whose decision was recorded just before the kernel stopped is not decided again after a restart.

The kernel stops (here: the task's worker dies) after the attempt's audit
record is durable but before the task store hears the outcome. The task is
still RUNNING in the store, so the restarted kernel runs it again; it must
take the recorded decision rather than record a second one for the same task.
"""

from __future__ import annotations


import grpc
import pytest

from claims_support import claim_request, copy_pipelines
from conftest import start_kernel
from lane_support import until
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

TIMEOUT_S = 30


class WorkerDied(Exception):
    """Fault injected on purpose: the task's worker stops before the task store records its outcome."""


def _automated_case() -> dict:
    case = dict(data.generate_cases(1, seed=7)[0], claim_amount=800.0, customer_tier="gold", fraud_score=0.05,
                prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    return case


def _task_records(server, task_id: str) -> list[kpb.AuditRecord]:
    return [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION) if r.task_id == task_id]




def stop_before_success(monkeypatch, store) -> None:
    """Fault injected on purpose: a task's attempt recorded its decision, and the kernel stops before the task is
    marked SUCCEEDED (the worker dies there). ``monkeypatch.undo()`` (or the test's end) lifts it."""
    real_transition = store.transition

    def dies_before_success(task_id, state, *args, **kwargs):
        if state == kpb.SUCCEEDED:
            raise WorkerDied("the kernel stopped here")
        return real_transition(task_id, state, *args, **kwargs)

    monkeypatch.setattr(store, "transition", dies_before_success)


@pytest.mark.parametrize("max_attempts", [3, 1], ids=["attempts-left", "last-attempt"])
def test_a_task_cut_off_after_its_decision_was_recorded_takes_that_decision(claims_models, tmp_path, monkeypatch,
                                                                            max_attempts):
    """Also when the cut-off attempt was the task's last: it was failed at restart ("the kernel stopped while
    attempt 1 of 1 ran") with its decision on the log (a tasks audit, 2026-11-27)."""
    pipelines, data_dir = copy_pipelines(tmp_path / "pipelines"), tmp_path / "data"
    first = start_kernel(claims_models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0,
                         task_max_attempts=max_attempts)
    stop_before_success(monkeypatch, first.decisions.tasks.store)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            task = kgrpc.TaskServiceStub(channel).StartTask(
                kpb.StartTaskRequest(request=claim_request(_automated_case())), timeout=10)
        (recorded,) = _until(lambda: _task_records(first, task.task_id), "the attempt's decision record")
        assert first.decisions.tasks.get(task.task_id).state == kpb.RUNNING
    finally:
        first.stop(grace=1)

    second = start_kernel(claims_models, pipelines=str(pipelines), data_dir=str(data_dir), pipeline_poll_s=0,
                          task_max_attempts=max_attempts)
    try:
        done = _until(lambda: (t := second.decisions.tasks.get(task.task_id)).state == kpb.SUCCEEDED and t,
                     "the task to succeed after the restart")
        assert done.attempts == 1  # taking the recorded decision is no new attempt
        details = [h.detail for h in done.history]
        assert "re-queued: the kernel stopped after attempt 1 recorded its decision" in details
        assert "taking the decision attempt 1 recorded" in details
        assert done.decision.audit_sequence == recorded.sequence and done.decision.action == recorded.decision.action
        assert [r.sequence for r in _task_records(second, task.task_id)] == [recorded.sequence]  # decided once
    finally:
        second.stop(grace=1)


def _until(predicate, what: str):
    return until(predicate, what, TIMEOUT_S, every_s=0.02)
