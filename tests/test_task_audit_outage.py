"""A durable task outlives an audit log that fail-stopped: it waits for the restart that the log's failure
asks for, its attempts not spent, instead of failing for good.

A full disk (any failed write) fail-stops the audit log: nothing can be decided until the operator frees space
and restarts the kernel. Each task attempt then failed UNAVAILABLE "the audit log failed", was retried with
backoff like a model reload, and after task_max_attempts (~4 minutes by default) the task was FAILED "gave up";
after the restart its idempotency key still answered that FAILED task, so the workflow engine could not run the
work again under its key (a workflow engine's audit).

A real kernel serving the claims pipeline, called over gRPC, then a second kernel on the same data dir. The
fault is injected on purpose: the log's own fail-stop, called as a failed write calls it.
"""

from __future__ import annotations

import errno
import threading

import grpc

from conftest import start_claims_kernel
from test_task_retries import automated_claim, final_state
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit.errors import AuditTimeout

TIMEOUT_S = 30
WAITS = "the task runs again once the kernel restarts"


def _parked(tasks, task_id: str) -> kpb.Task:
    for task in tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
        if task.state == kpb.QUEUED and task.history[-1].detail.endswith(WAITS) or task.state == kpb.FAILED:
            return task
    raise AssertionError(f"task {task_id}'s watch ended before it waited")


def test_a_task_waits_out_a_failed_audit_log_for_the_restart(claims_models, tmp_path):
    settings = {"task_max_attempts": 2, "task_backoff_s": 0.05, "task_max_backoff_s": 0.05}
    kernel = start_claims_kernel(claims_models, tmp_path, **settings)
    try:
        kernel.decisions.audit._fail(OSError(errno.ENOSPC, "No space left on device"))  # injected fault
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            started = tasks.StartTask(automated_claim("outage-1"), timeout=TIMEOUT_S)
            parked = _parked(tasks, started.task_id)
    finally:
        kernel.stop(grace=1)
    assert parked.state == kpb.QUEUED and parked.attempts == 0, parked.error  # not spent: nothing could be decided
    assert "UNAVAILABLE: the audit log failed" in parked.history[-1].detail

    kernel = start_claims_kernel(claims_models, tmp_path, **settings)  # the operator freed space and restarted
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            done = final_state(kgrpc.TaskServiceStub(channel), started.task_id)
    finally:
        kernel.stop(grace=1)
    assert done.state == kpb.SUCCEEDED and done.attempts == 1, done


def test_an_attempt_that_outlasts_a_stop_waits_for_the_next_start(claims_models, tmp_path, monkeypatch):
    # A stop waits 5 s for running attempts, then closes the audit log; one still running then (a slow model, a
    # long queue) failed to append its record, "the audit log is closed", and the task was FAILED for good.
    kernel = start_claims_kernel(claims_models, tmp_path)
    decisions, engine = kernel.decisions, kernel.decisions.engine
    running, release, recorded = threading.Event(), threading.Event(), threading.Event()
    real_run, real_close, real_stop = engine.run_blocking, decisions.audit.close, decisions.tasks.stop
    real_outcome = decisions.tasks._run

    def held(pending, on_wait=None):  # fault injected on purpose: the attempt outlasts the stop's wait for it
        running.set()
        release.wait(TIMEOUT_S)
        return real_run(pending, on_wait)

    def outcome_written(task_id):  # (the worker's attempt and the write of its outcome, over)
        try:
            return real_outcome(task_id)
        finally:
            recorded.set()

    def close_then_let_it_end(*args, **kwargs):
        real_close(*args, **kwargs)
        release.set()  # the attempt goes on with the log closed, before the store closes
        recorded.wait(TIMEOUT_S)

    monkeypatch.setattr(engine, "run_blocking", held)
    monkeypatch.setattr(decisions.tasks, "_run", outcome_written)
    monkeypatch.setattr(decisions.audit, "close", close_then_let_it_end)
    monkeypatch.setattr(decisions.tasks, "stop", lambda timeout_s=5.0: real_stop(0.05))  # (not 5 s of the test's)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            started = kgrpc.TaskServiceStub(channel).StartTask(automated_claim("stop-1"), timeout=TIMEOUT_S)
        assert running.wait(TIMEOUT_S)
    finally:
        kernel.stop(grace=1)
    assert recorded.is_set()

    kernel = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            done = final_state(kgrpc.TaskServiceStub(channel), started.task_id)
    finally:
        kernel.stop(grace=1)
    assert done.state == kpb.SUCCEEDED and done.attempts == 1, done.error
    assert any(step.detail.endswith(WAITS) for step in done.history)


def test_an_attempt_whose_record_is_slow_to_be_durable_takes_that_decision(claims_models, tmp_path, monkeypatch):
    # A disk that stalls past the decision's 10 s wait for its record (audit_timeout_s) is slow, not failed: the
    # record is written once it recovers. The attempt was FAILED at once, "UNAVAILABLE: audit record N was not
    # durable within 10 s", and that record then held a decision of a FAILED task.
    kernel = start_claims_kernel(claims_models, tmp_path)
    audit = kernel.decisions.audit
    timed_out, release = threading.Event(), threading.Event()
    real_commit, real_wait = audit._commit_group, audit._wait

    def stalled_disk():  # fault injected on purpose: the disk stalls until the attempt has given up waiting
        release.wait(TIMEOUT_S)
        real_commit()

    def wait(sequence, timeout_s):
        try:
            return real_wait(sequence, timeout_s)
        except AuditTimeout:
            timed_out.set()
            raise

    monkeypatch.setattr(kernel.decisions.engine.services, "audit_timeout_s", 0.2)
    monkeypatch.setattr(audit, "_write_here", lambda: False)  # (the writer thread writes every group)
    monkeypatch.setattr(audit, "_commit_group", stalled_disk)
    monkeypatch.setattr(audit, "_wait", wait)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            started = tasks.StartTask(automated_claim("stall-1"), timeout=TIMEOUT_S)
            assert timed_out.wait(TIMEOUT_S)
            release.set()
            done = final_state(tasks, started.task_id)
        decisions = [r for r in audit.read(from_sequence=0, kind=kpb.DECISION) if r.task_id == started.task_id]
    finally:
        release.set()
        kernel.stop(grace=1)
    assert done.state == kpb.SUCCEEDED and done.attempts == 1, done.error
    assert [r.sequence for r in decisions] == [done.decision.audit_sequence]
