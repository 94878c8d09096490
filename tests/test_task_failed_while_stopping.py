"""An attempt that ends while a stop waits for it keeps its outcome: one that failed for good FAILS the task, one
that failed in a way that may pass is counted and waits out its back-off, across the restart.

A stop gives running attempts 5 s to end (TaskRunner.stop) before it closes what they use. Every failure of an
attempt from the moment the stop began was taken for the stop's doing: the task went back to QUEUED "not
counted: the task runs again once the kernel restarts". A task whose attempt had failed for good was then run
again by the next start (and decided, here: a FAILED task came back SUCCEEDED), and one whose attempt failed in a
way that may pass lost that attempt from its count and its back-off (run at once by the next start).

A real kernel serving the claims pipeline, called over gRPC, stopped, then a second kernel on the same data dir.
The fault is injected on purpose: the attempt's model run is held until the stop waits for it, then fails.
"""

from __future__ import annotations

import threading
import time

import grpc

from conftest import start_claims_kernel
from lane_support import until
from test_task_retries import automated_claim
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.errors import Internal, ResourceExhausted

TIMEOUT_S = 30
BACKOFF = {"task_backoff_s": 60.0, "task_max_backoff_s": 60.0}  # longer than the test: a retry waits it out


def _stop_while_the_attempt_fails(kernel, failure: Exception) -> str:
    """Start a task whose attempt is held in its model run; stop the kernel; once the stop waits for the attempt,
    let it fail with ``failure``. The task's id, once the stop is over."""
    engine = kernel.decisions.engine
    running, release = threading.Event(), threading.Event()

    def held_then_failed(pending, on_wait=None):  # fault injected on purpose
        running.set()
        release.wait(TIMEOUT_S)
        raise failure

    engine.run_blocking = held_then_failed
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        task = kgrpc.TaskServiceStub(channel).StartTask(automated_claim("stopping-1"), timeout=TIMEOUT_S)
    assert running.wait(TIMEOUT_S)
    stopping = threading.Thread(target=kernel.stop, kwargs={"grace": 0.5})
    stopping.start()
    try:
        until(lambda: kernel.decisions.tasks._stopping, "the stop to wait for the running attempt")
    finally:
        release.set()
        stopping.join(TIMEOUT_S)
    return task.task_id


def _after_restart(claims_models, tmp_path, task_id: str) -> kpb.Task:
    kernel = start_claims_kernel(claims_models, tmp_path, **BACKOFF)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            return kgrpc.TaskServiceStub(channel).GetTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S)
    finally:
        kernel.stop(grace=1)


def test_an_attempt_that_fails_for_good_while_the_kernel_stops_fails_its_task(claims_models, tmp_path):
    kernel = start_claims_kernel(claims_models, tmp_path, **BACKOFF)
    task_id = _stop_while_the_attempt_fails(kernel, Internal("injected fault: the model failed"))
    task = _after_restart(claims_models, tmp_path, task_id)
    assert task.state == kpb.FAILED, task
    assert task.attempts == 1 and "INTERNAL: injected fault: the model failed" in task.error
    assert [step.attempt for step in task.history if step.state == kpb.RUNNING] == [1]  # not run again


def test_an_attempt_that_may_pass_while_the_kernel_stops_is_counted_and_backs_off(claims_models, tmp_path):
    kernel = start_claims_kernel(claims_models, tmp_path, **BACKOFF)
    before = time.time_ns()
    task_id = _stop_while_the_attempt_fails(kernel, ResourceExhausted("injected fault: the model's queue is full"))
    task = _after_restart(claims_models, tmp_path, task_id)
    assert task.state == kpb.QUEUED and task.attempts == 1, task
    assert "attempt 1 failed (RESOURCE_EXHAUSTED: injected fault" in task.history[-1].detail, task.history
    assert task.next_attempt_unix_ns > before + 30 * 10**9  # its back-off, not a run at once
