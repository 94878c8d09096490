"""Tasks survive a kernel restart: the kernel process is killed with SIGKILL and started again.

A real ``aios-kernel serve`` with the claims pipeline runs in a subprocess over a data directory. One task
is RUNNING and another WAITING_FOR_REVIEW when the process is killed. After a restart on the same data
directory the RUNNING task runs again (attempt 2) to SUCCEEDED, deciding once, and the waiting one is
resolved through ReviewService and completes with the reviewer's action.

The one stand-in is a fault injected on purpose: a real attempt takes milliseconds, so the kernel runs
under tests/_held_attempt_kernel.py, which holds the attempts of tenant ``held`` at their start until a
marker file appears (in both processes: the re-run is seen RUNNING too, then released).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import grpc
import pytest

from claims_support import UNSURE_CASE, build_small_model, claim_request, copy_pipelines
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory, verify_directory
from kernel.testing.processes import ServeProcess

HELD_KERNEL = [sys.executable, str(Path(__file__).resolve().parent / "_held_attempt_kernel.py")]
TIMEOUT_S = 30
SMALL = {"claim_amount": 800.0, "policy_age_months": 40, "customer_tier": "gold", "claim_type": "auto",
         "prior_claims": 0, "fraud_score": 0.05, "days_since_incident": 3,
         "has_police_report": True}  # R08: small, clean and confident: fast-tracked with no human


class Kernel:
    """The held-attempt kernel on ``data_dir``, with a channel and stubs to it."""

    def __init__(self, models: Path, pipelines: Path, data_dir: Path, marker: Path):
        self.process = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING",
                                    data_dir=data_dir, cli=[*HELD_KERNEL, str(marker)])
        self.channel = grpc.insecure_channel(self.process.address)
        self.tasks = kgrpc.TaskServiceStub(self.channel)
        self.reviews = kgrpc.ReviewServiceStub(self.channel)

    def watch_until(self, task_id: str, predicate) -> kpb.Task:
        for task in self.tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
            if predicate(task):
                return task
        raise AssertionError(f"task {task_id} ended without reaching the expected state")

    def close(self) -> None:
        self.channel.close()
        if self.process.proc.poll() is None:
            self.process.stop()


@pytest.fixture
def kernels():
    started: list[Kernel] = []
    yield started
    for kernel in started:
        kernel.close()


def test_running_and_waiting_tasks_survive_sigkill(tmp_path, kernels):
    models, pipelines = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "pipelines")
    data_dir, marker = tmp_path / "data", tmp_path / "release-running-task"
    first = Kernel(models, pipelines, data_dir, marker)
    kernels.append(first)
    running = first.tasks.StartTask(kpb.StartTaskRequest(request=claim_request(SMALL, tenant="held")),
                                    timeout=TIMEOUT_S)
    waiting = first.tasks.StartTask(kpb.StartTaskRequest(request=claim_request(UNSURE_CASE)), timeout=TIMEOUT_S)
    first.watch_until(running.task_id, lambda t: t.state == kpb.RUNNING)
    review_id = first.watch_until(waiting.task_id, lambda t: t.state == kpb.WAITING_FOR_REVIEW).review_id
    assert first.tasks.GetTask(kpb.TaskRef(task_id=running.task_id), timeout=TIMEOUT_S).state == kpb.RUNNING

    first.channel.close()
    first.process.kill()
    assert first.process.proc.returncode == -signal.SIGKILL

    second = Kernel(models, pipelines, data_dir, marker)
    kernels.append(second)
    rerun = second.watch_until(running.task_id, lambda t: t.state == kpb.RUNNING and t.attempts == 2)
    assert "re-queued: the kernel stopped while attempt 1 ran" in [h.detail for h in rerun.history]
    marker.touch()
    done = second.watch_until(running.task_id, lambda t: t.state == kpb.SUCCEEDED)
    assert (done.decision.action, done.decision.outcome, done.attempts) == ("fast_track", kpb.AUTOMATED, 2)

    assert second.tasks.GetTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S).state == kpb.WAITING_FOR_REVIEW
    listed = second.reviews.ListReviews(kpb.ListReviewsRequest(state="OPEN"), timeout=TIMEOUT_S)
    assert [(r.review_id, r.task_id) for r in listed.reviews] == [(review_id, waiting.task_id)]
    second.reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review_id, reviewer="dana", lease_seconds=60),
                               timeout=TIMEOUT_S)
    second.reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer="dana", action="deny",
                                                          comment="after the restart"), timeout=TIMEOUT_S)
    finished = second.watch_until(waiting.task_id, lambda t: t.state == kpb.SUCCEEDED)
    assert finished.decision.action == "deny" and finished.decision.outcome == kpb.REVIEWED
    assert finished.attempts == 1  # waiting for a human is not re-run
    second.channel.close()
    code, err = second.process.stop()
    assert code == 0, f"the kernel stops cleanly on SIGTERM: {err}"
    assert (data_dir / "kernel.sqlite3").exists()

    # The log the two processes wrote is sound, and holds one decision per task: the held attempt that was
    # killed had decided nothing, and the escalated one's resolution is linked to it.
    result = verify_directory(data_dir / "audit")
    assert result.ok, result.describe()
    records = list(iter_directory(data_dir / "audit", 0, RecordFilter()))
    by_task = lambda task_id: [(r.kind, r.decision.action) for r in records if r.task_id == task_id]  # noqa: E731
    assert by_task(running.task_id) == [(kpb.DECISION, "fast_track")]
    assert by_task(waiting.task_id) == [(kpb.DECISION, "review"), (kpb.REVIEW_RESOLUTION, "deny")]


KILLED_BEFORE_REVIEW_KERNEL = [sys.executable,
                               str(Path(__file__).resolve().parent / "_killed_before_task_review_kernel.py")]


def test_a_cancelled_tasks_escalation_cut_off_from_its_review_by_a_kill_is_withdrawn_on_the_record(tmp_path):
    """(Random-kill harness, tests/kill_cycles.py) a task cancelled while its attempt ran; the attempt recorded its
    escalation, and the kernel was killed before it stored the review. The restarted task does not run again (it is
    CANCELLED) and the start reopened no review for a task's record: the log held an escalation with no review and no
    word of how the case ended. Now the start opens it and withdraws it on the record, as a cancel does live."""
    models, pipelines = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "pipelines")
    data_dir, marker = tmp_path / "data", tmp_path / "release-running-task"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    first = ServeProcess(models, *serve, data_dir=data_dir, cli=[*KILLED_BEFORE_REVIEW_KERNEL, str(marker)])
    with grpc.insecure_channel(first.address) as channel:
        tasks = kgrpc.TaskServiceStub(channel)
        task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(UNSURE_CASE, tenant="held")),
                               timeout=TIMEOUT_S)
        for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S):
            if update.state == kpb.RUNNING:
                break
        assert tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
    marker.touch()  # the attempt goes on: records its escalation, then the kernel is killed before the review row
    first.proc.wait(timeout=TIMEOUT_S)
    first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    escalation = [r for r in iter_directory(data_dir / "audit", 0, RecordFilter()) if r.task_id == task.task_id]
    assert [r.decision.outcome for r in escalation] == [kpb.ESCALATED]
    review_id = escalation[0].decision.review_id

    second = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(second.address) as channel:
            review = kgrpc.ReviewServiceStub(channel).GetReview(kpb.ReviewRef(review_id=review_id), timeout=TIMEOUT_S)
            assert (review.state, review.resolved_action, review.task_id) == ("RESOLVED", "", task.task_id)
            assert kgrpc.TaskServiceStub(channel).GetTask(kpb.TaskRef(task_id=task.task_id),
                                                          timeout=TIMEOUT_S).state == kpb.CANCELLED
    finally:
        code, err = second.stop()
    assert code == 0, err
    records = [r for r in iter_directory(data_dir / "audit", 0, RecordFilter()) if r.task_id == task.task_id]
    assert [(r.kind, r.links_to) for r in records] == [(kpb.DECISION, 0), (kpb.REVIEW_RESOLUTION, records[0].sequence)]
    assert records[1].decision.reasons[0].rule_id == "WITHDRAWN"
