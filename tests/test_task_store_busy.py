"""A task whose outcome the store refused for a while (StoreBusy: its write lock held by another process) ends
once the store takes writes again; it stayed RUNNING for good (no worker would touch it until a restart).

A real kernel serving the claims pipeline, called over gRPC. Two faults injected on purpose, named so: the attempt
is held after it decided until the store is locked (a real lock lands anywhere; this pins it to the write of the
outcome), and the kernel's SQLite busy timeout is cut from 10 s to 100 ms so the refusal comes quickly. The lock
itself is real: another connection holds kernel.sqlite3's write transaction, as an operator's tool would.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import grpc

from claims_support import claim_request, hold_attempts_after_deciding
from conftest import start_claims_kernel
from lane_support import until
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.store import sqlite as sqlite_store
from kernel.tasks import runner as runner_module

TIMEOUT_S = 20
FINAL = (kpb.SUCCEEDED, kpb.FAILED, kpb.CANCELLED)


def automated_claim() -> kpb.DecisionRequest:
    """R08: small, clean and confident: decided with no human."""
    case = dict(data.generate_cases(1, seed=7)[0], claim_amount=800.0, customer_tier="gold", fraud_score=0.05,
                prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    return claim_request(case, tenant="store-busy")


def test_a_task_whose_outcome_the_store_refused_for_a_while_still_ends(claims_models, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)  # fault injected on purpose: a refusal in 100 ms
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        decided, go_on = hold_attempts_after_deciding(monkeypatch, server.decisions.tasks)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            task = tasks.StartTask(kpb.StartTaskRequest(request=automated_claim()), timeout=TIMEOUT_S)
            ref = kpb.TaskRef(task_id=task.task_id)
            assert decided.wait(TIMEOUT_S), "the attempt never decided"
            lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")  # another writer holds the store: the task's outcome is refused
                with caplog.at_level(logging.ERROR, logger="aios.tasks"):
                    go_on.set()
                    until(lambda: [r for r in caplog.records if r.name == "aios.tasks" and task.task_id in r.getMessage()],
                          "the store's refusal of the task's outcome", TIMEOUT_S, every_s=0.01)
                assert tasks.GetTask(ref, timeout=TIMEOUT_S).state == kpb.RUNNING
            finally:
                lock.execute("ROLLBACK")  # the store takes writes again
                lock.close()
            states = [t.state for t in tasks.WatchTask(ref, timeout=TIMEOUT_S)]
        assert states[-1] == kpb.SUCCEEDED, states
        done = server.decisions.tasks.get(task.task_id)
        assert done.attempts == 1 and done.decision.action  # the attempt's own decision, not a second attempt
        decisions = [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)
                     if r.task_id == task.task_id]
        assert [r.sequence for r in decisions] == [done.decision.audit_sequence]  # decided once
    finally:
        server.stop(grace=1)


def test_a_store_refusing_for_long_is_logged_once_a_task_not_once_a_retry(claims_models, tmp_path, monkeypatch,
                                                                            caplog):
    """A store that stays busy (a backup holding its lock, a full disk) refused the task's outcome once a second,
    each refusal an ERROR line for good: one line says it, and another when the store took the change."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)  # fault injected on purpose: a refusal in 100 ms
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        runner = server.decisions.tasks
        decided, go_on = hold_attempts_after_deciding(monkeypatch, runner)
        refusals, transition = [], runner.store.transition

        def counted(*args, **kwargs):  # (counts the refusals; changes nothing)
            try:
                return transition(*args, **kwargs)
            except sqlite_store.StoreBusy:
                refusals.append(args[0])
                raise

        monkeypatch.setattr(runner.store, "transition", counted)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            task = tasks.StartTask(kpb.StartTaskRequest(request=automated_claim()), timeout=TIMEOUT_S)
            assert decided.wait(TIMEOUT_S), "the attempt never decided"
            lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None)
            with caplog.at_level(logging.WARNING, logger="aios.tasks"):
                try:
                    lock.execute("BEGIN IMMEDIATE")  # another writer holds the store, refusal after refusal
                    go_on.set()
                    until(lambda: len(refusals) >= 3, "three refusals", TIMEOUT_S, every_s=0.01)
                finally:
                    lock.execute("ROLLBACK")
                    lock.close()
                states = [t.state for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)]
                until(lambda: [r for r in caplog.records if r.levelname == "WARNING" and task.task_id in r.getMessage()],
                      "the line saying the store took it", TIMEOUT_S, every_s=0.01)
        assert states[-1] == kpb.SUCCEEDED, states
        lines = [(r.levelname, r.getMessage()) for r in caplog.records
                 if r.name == "aios.tasks" and task.task_id in r.getMessage()]
        assert [level for level, _ in lines] == ["ERROR", "WARNING"], lines  # (was an ERROR a refusal)
        assert "took its change after refusing it" in lines[1][1]
    finally:
        server.stop(grace=1)


def test_a_task_whose_review_resolution_the_store_refused_as_it_began_waiting_still_ends(
        claims_models, tmp_path, monkeypatch, caplog):
    """The review was resolved while the attempt ran (the resolution parked for the task); the task's move to
    WAITING_FOR_REVIEW committed, and its move on to SUCCEEDED with that resolution was refused (StoreBusy). The
    worker wrote the outcome again: the task was WAITING already, so that write changed nothing, and the parked
    resolution was never applied: the task waited for a review already resolved until a restart (a race review).

    Faults injected on purpose, named so: the attempt is held after it decided; the kernel's busy timeout is cut to
    100 ms; and the store's read of the parked resolution, the first time it finds one, locks the store (a real
    lock, from another connection) before returning it, pinning the lock between the two writes."""
    from test_tasks_grpc import LARGE

    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)
    server = start_claims_kernel(claims_models, tmp_path)
    lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None,
                           check_same_thread=False)
    try:
        runner = server.decisions.tasks
        decided, go_on = hold_attempts_after_deciding(monkeypatch, runner)
        records = runner.store._records
        real_completion, locked = records.completion, threading.Event()

        def completion_then_lock(review_id):  # the named hold point: lock the store once a resolution is found
            found = real_completion(review_id)
            if found is not None and not locked.is_set():
                lock.execute("BEGIN IMMEDIATE")
                locked.set()
            return found

        monkeypatch.setattr(records, "completion", completion_then_lock)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(LARGE, tenant="store-busy")),
                                   timeout=TIMEOUT_S)
            ref = kpb.TaskRef(task_id=task.task_id)
            assert decided.wait(TIMEOUT_S), "the attempt never decided"
            review = reviews.ListReviews(kpb.ListReviewsRequest(tenant="store-busy", state="OPEN"),
                                         timeout=TIMEOUT_S).reviews[0]
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=review.review_id, reviewer="alice"), timeout=TIMEOUT_S)
            reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=review.review_id, reviewer="alice",
                                                           action="approve"), timeout=TIMEOUT_S)
            with caplog.at_level(logging.ERROR, logger="aios.tasks"):
                go_on.set()
                until(lambda: [r for r in caplog.records if r.name == "aios.tasks" and task.task_id in r.getMessage()],
                      "the store's refusal of the task's change", TIMEOUT_S, every_s=0.01)
            assert tasks.GetTask(ref, timeout=TIMEOUT_S).state == kpb.WAITING_FOR_REVIEW
            lock.execute("ROLLBACK")  # the store takes writes again
            states = [t.state for t in tasks.WatchTask(ref, timeout=5)]
        assert states[-1] == kpb.SUCCEEDED, states
        done = runner.get(task.task_id)
        assert done.decision.action == "approve" and done.attempts == 1
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        server.stop(grace=1)


def test_an_attempt_whose_review_the_store_refused_after_its_decision_was_recorded_takes_that_decision(
        claims_models, tmp_path, monkeypatch):
    """The store's write lock held by another process while an attempt ran: its escalated decision was recorded,
    the review it opens refused (StoreBusy), and taking the recorded decision refused again: the task ended FAILED
    at once, its decision on the log and no review open (a race review). It runs again once the store takes writes,
    taking the decision its attempt recorded (one decision), and waits for its review.

    Faults injected on purpose, named so: the first attempt runs with another connection's real write transaction
    held; the kernel's busy timeout is cut to 100 ms."""
    from test_tasks_grpc import LARGE

    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)
    server = start_claims_kernel(claims_models, tmp_path)
    lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None,
                           check_same_thread=False)
    runner = server.decisions.tasks
    real_run, ran = runner.run_fn, []

    def run_with_the_store_locked(task):  # hold point: the first attempt runs with another process's lock held
        if not ran:
            lock.execute("BEGIN IMMEDIATE")
        ran.append(task.attempts)
        try:
            return real_run(task)
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")

    monkeypatch.setattr(runner, "run_fn", run_with_the_store_locked)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            tasks = kgrpc.TaskServiceStub(channel)
            task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(LARGE, tenant="busy")), timeout=20)
            ref = kpb.TaskRef(task_id=task.task_id)
            final = until(lambda: (t := tasks.GetTask(ref, timeout=20)).state in (
                kpb.WAITING_FOR_REVIEW, kpb.FAILED, kpb.SUCCEEDED, kpb.CANCELLED) and t, "the task settled", 20)
        decisions = [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)
                     if r.task_id == task.task_id]
        assert final.state == kpb.WAITING_FOR_REVIEW, (kpb.TaskState.Name(final.state), final.error)
        assert len(ran) == 2 and final.attempts == 1  # run again, as the same attempt
        assert [r.sequence for r in decisions] == [final.decision.audit_sequence]  # decided once
    finally:
        lock.close()
        server.stop(grace=1)


def _refused_then_stopped(claims_models, tmp_path, monkeypatch, caplog, release_before_stop: bool):
    """A task whose outcome the store refused (another connection's real write lock), then the kernel stopped
    (with the lock released first, or still held); the task as a restart on the same data finds it."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 100)  # fault injected on purpose: a refusal in 100 ms
    # Fault injected on purpose: the worker's own retry of the refused write comes after the stop, as it does for
    # any stop within a second of the refusal (the store's retry hint).
    monkeypatch.setattr(runner_module, "STORE_RETRY_S", 600.0)
    server = start_claims_kernel(claims_models, tmp_path)
    lock = sqlite3.connect(Path(server.settings.data_dir) / "kernel.sqlite3", isolation_level=None,
                           check_same_thread=False)
    try:
        decided, go_on = hold_attempts_after_deciding(monkeypatch, server.decisions.tasks)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            task = kgrpc.TaskServiceStub(channel).StartTask(kpb.StartTaskRequest(request=automated_claim()),
                                                            timeout=TIMEOUT_S)
        assert decided.wait(TIMEOUT_S), "the attempt never decided"
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the store: the task's outcome is refused
        with caplog.at_level(logging.ERROR, logger="aios.tasks"):
            go_on.set()
            until(lambda: [r for r in caplog.records if r.name == "aios.tasks" and task.task_id in r.getMessage()],
                  "the store's refusal of the task's outcome", TIMEOUT_S, every_s=0.01)
            if release_before_stop:
                lock.execute("ROLLBACK")  # the store takes writes again, and the kernel stops before the retry
            server.stop(grace=1)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        if server._server is not None:
            server.stop(grace=1)
    stop_lines = [r.getMessage() for r in caplog.records if r.name == "aios.tasks" and "stopping" in r.getMessage()]
    again = start_claims_kernel(claims_models, tmp_path, pipelines=tmp_path / "pipelines")
    try:
        done = until(lambda: (t := again.decisions.tasks.get(task.task_id)).state in FINAL and t, "the task ended",
                     TIMEOUT_S)
        decisions = [r for r in again.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)
                     if r.task_id == task.task_id]
    finally:
        again.stop(grace=1)
    assert done.state == kpb.SUCCEEDED and done.attempts == 1, done
    assert [r.sequence for r in decisions] == [done.decision.audit_sequence]  # decided once
    return done, stop_lines


def test_an_outcome_the_store_refused_is_written_by_the_stop_once_the_store_takes_it(claims_models, tmp_path,
                                                                                     monkeypatch, caplog):
    """The stop ended the workers, and with them the retry of the refused outcome: the task stayed RUNNING, and
    the restart ran it again (taking the recorded decision; a transient failure's back-off, or a failure's error,
    was lost with the write)."""
    done, stop_lines = _refused_then_stopped(claims_models, tmp_path, monkeypatch, caplog, release_before_stop=True)
    assert not [step for step in done.history if "kernel stopped" in step.detail], done.history
    assert not stop_lines, stop_lines


def test_an_outcome_the_store_still_refuses_at_the_stop_is_named_in_one_line(claims_models, tmp_path, monkeypatch,
                                                                             caplog):
    done, stop_lines = _refused_then_stopped(claims_models, tmp_path, monkeypatch, caplog, release_before_stop=False)
    assert len(stop_lines) == 1 and done.task_id in stop_lines[0], stop_lines
    assert "the store would not take the outcome of 1 task " in stop_lines[0], stop_lines
    assert [step for step in done.history if "recorded its decision" in step.detail], done.history  # taken over
