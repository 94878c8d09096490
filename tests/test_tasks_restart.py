"""Tasks survive a kernel restart: the server process is killed with SIGKILL and started again.

``_task_server.py`` runs in a subprocess over a data directory. One task is
RUNNING (its fake pipeline waits for a marker file) and another is
WAITING_FOR_REVIEW when the process is killed. After a restart on the same
data directory the RUNNING task runs again (attempt 2) to SUCCEEDED, and the
waiting one is resolved through ReviewService and completes with the
reviewer's action.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

SERVER = Path(__file__).resolve().parent / "_task_server.py"
TIMEOUT_S = 30


class ServerProcess:
    def __init__(self, data_dir: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.port = self._read_port()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.tasks = kgrpc.TaskServiceStub(self.channel)
        self.reviews = kgrpc.ReviewServiceStub(self.channel)

    def _read_port(self) -> int:
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(TIMEOUT_S):
                self.proc.kill()
                raise AssertionError("the task server printed no port in time")
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise AssertionError(f"the task server did not start: {line!r} {self.proc.stderr.read()}")
        return int(line.split()[1])

    def kill(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT_S)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT_S)
        self.proc.stdout.close()
        self.proc.stderr.close()


def start_request(**fields) -> kpb.StartTaskRequest:
    req = kpb.StartTaskRequest()
    req.request.pipeline, req.request.tenant = "claims", "acme"
    for name, value in fields.items():
        if isinstance(value, str):
            req.request.fields[name].string_value = value
        else:
            req.request.fields[name].number_value = value
    return req


def watch_until(server: ServerProcess, task_id: str, predicate) -> kpb.Task:
    for task in server.tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
        if predicate(task):
            return task
    raise AssertionError(f"task {task_id} ended without reaching the expected state")


@pytest.fixture
def servers():
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc.returncode is None:
            server.stop()


def test_running_and_waiting_tasks_survive_sigkill(tmp_path, servers):
    data_dir, marker = tmp_path / "var", tmp_path / "release-running-task"
    first = ServerProcess(data_dir)
    servers.append(first)
    running = first.tasks.StartTask(start_request(amount=20.0, block_until=str(marker)), timeout=TIMEOUT_S)
    waiting = first.tasks.StartTask(start_request(amount=30.0, confidence=0.1), timeout=TIMEOUT_S)
    watch_until(first, running.task_id, lambda t: t.state == kpb.RUNNING)
    review_id = watch_until(first, waiting.task_id, lambda t: t.state == kpb.WAITING_FOR_REVIEW).review_id
    assert first.tasks.GetTask(kpb.TaskRef(task_id=running.task_id), timeout=TIMEOUT_S).state == kpb.RUNNING

    first.kill()
    assert first.proc.returncode == -signal.SIGKILL

    second = ServerProcess(data_dir)
    servers.append(second)
    rerun = watch_until(second, running.task_id, lambda t: t.state == kpb.RUNNING and t.attempts == 2)
    assert "re-queued: the kernel stopped while attempt 1 ran" in [h.detail for h in rerun.history]
    marker.touch()
    done = watch_until(second, running.task_id, lambda t: t.state == kpb.SUCCEEDED)
    assert done.decision.action == "approve" and done.attempts == 2

    assert second.tasks.GetTask(kpb.TaskRef(task_id=waiting.task_id), timeout=TIMEOUT_S).state == kpb.WAITING_FOR_REVIEW
    listed = second.reviews.ListReviews(kpb.ListReviewsRequest(state="OPEN"), timeout=TIMEOUT_S)
    assert [(r.review_id, r.task_id) for r in listed.reviews] == [(review_id, waiting.task_id)]
    second.reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review_id, reviewer="dana", lease_seconds=60),
                               timeout=TIMEOUT_S)
    second.reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review_id, reviewer="dana", action="deny",
                                                          comment="after the restart"), timeout=TIMEOUT_S)
    finished = watch_until(second, waiting.task_id, lambda t: t.state == kpb.SUCCEEDED)
    assert finished.decision.action == "deny" and finished.decision.outcome == kpb.REVIEWED
    assert finished.attempts == 1  # waiting for a human is not re-run
    second.stop()
    assert second.proc.returncode == 0, "the server stops cleanly on SIGTERM"
    assert os.path.exists(data_dir / "kernel.sqlite3")
