"""TaskRunner in-process: outcomes, retries with backoff, failures, cancellation, reviews, restart recovery.

Unit tests of TaskRunner as a Python object (no gRPC, no kernel): the pipeline is the fault-injecting
stand-in of ``_fault_injecting_pipeline.py`` (or a small run_fn written here), so each test sets the
outcomes, failures and timings it checks the runner against; the store is a real SQLite file. Tests wait
on task watches, never on sleeps. The same behaviours over gRPC on a real claims kernel: test_tasks_grpc,
test_tasks_restart, test_task_retries, test_task_cancel_running, test_task_decided_once.
"""

from __future__ import annotations

import threading

import pytest

from _fault_injecting_pipeline import ACTIONS, make_decide, wire_reviews
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.errors import FailedPrecondition, NotFound, TransientError
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.tasks import TaskRunner, TaskStore, WaitingForReview

TIMEOUT_S = 20


def decision_request(key: str = "", **fields) -> kpb.DecisionRequest:
    req = kpb.DecisionRequest(pipeline="claims", tenant="acme", idempotency_key=key)
    for name, value in fields.items():
        if isinstance(value, str):
            req.fields[name].string_value = value
        elif isinstance(value, int):
            req.fields[name].int_value = value
        else:
            req.fields[name].number_value = value
    return req


def wait_for(runner: TaskRunner, task_id: str, *states: int) -> kpb.Task:
    """Watch the task until it is in one of ``states`` (DeadlineExceeded after TIMEOUT_S without a change)."""
    watch = runner.watch(task_id, timeout_s=TIMEOUT_S)
    try:
        for task in watch:
            if task.state in states:
                return task
    finally:
        watch.close()
    raise AssertionError(f"task {task_id} ended as {runner.get(task_id).state}, not in {states}")


class Kernel:
    """A store, a queue and a runner with the stand-in pipeline over one data dir."""

    def __init__(self, data_dir, run_fn=None, start: bool = True, **runner_args):
        self.db = open_database(data_dir)
        self.queue = ReviewQueue(self.db)
        self.store = TaskStore(self.db)
        self.runs: list = []
        run_fn = run_fn or make_decide(self.queue, self.runs)
        self.runner = TaskRunner(self.store, run_fn, **{"workers": 2, "backoff_s": 0.01, **runner_args})
        wire_reviews(self.queue, self.runner)
        if start:
            self.runner.start()

    def close(self, timeout_s: float = 5.0) -> None:
        self.runner.stop(timeout_s)
        self.db.close()


@pytest.fixture
def kernel(tmp_path):
    k = Kernel(tmp_path / "var")
    yield k
    k.close()


def test_a_task_runs_to_succeeded_with_its_decision(kernel):
    task = kernel.runner.submit(decision_request(amount=2000.0))
    states = [t.state for t in kernel.runner.watch(task.task_id, timeout_s=TIMEOUT_S)]
    assert states[-1] == kpb.SUCCEEDED and kpb.RUNNING in states
    done = kernel.runner.get(task.task_id)
    assert done.decision.action == "deny" and done.attempts == 1 and done.error == ""
    assert done.decision.request_id == done.request.request_id != ""


def test_transient_failures_are_retried_with_exponential_backoff(tmp_path):
    k = Kernel(tmp_path, backoff_s=0.05, max_attempts=3)
    try:
        task = k.runner.submit(decision_request(amount=1.0, transient_failures=2))
        done = wait_for(k.runner, task.task_id, kpb.SUCCEEDED, kpb.FAILED)
        assert done.state == kpb.SUCCEEDED and done.attempts == 3 and done.decision.action == "approve"
        steps = [(h.state, h.attempt) for h in done.history]
        assert steps == [(kpb.QUEUED, 0), (kpb.RUNNING, 1), (kpb.QUEUED, 1), (kpb.RUNNING, 2), (kpb.QUEUED, 2),
                         (kpb.RUNNING, 3), (kpb.SUCCEEDED, 3)]
        assert "retry in 0.05 s" in done.history[2].detail and "model busy on attempt 1" in done.history[2].detail
        assert "retry in 0.1 s" in done.history[4].detail
        assert done.next_attempt_unix_ns == 0  # (set while QUEUED for a retry only)
        # The waits between a failure and the next attempt grow: 0.05 s, then 0.1 s (wall clock, 5 ms slack).
        gap1 = done.history[3].at_unix_ns - done.history[2].at_unix_ns
        gap2 = done.history[5].at_unix_ns - done.history[4].at_unix_ns
        assert gap1 >= 45_000_000 and gap2 >= 95_000_000, (gap1, gap2)
    finally:
        k.close()


def test_transient_failures_give_up_after_max_attempts(tmp_path):
    k = Kernel(tmp_path, max_attempts=2)
    try:
        task = k.runner.submit(decision_request(transient_failures=5))
        done = wait_for(k.runner, task.task_id, kpb.FAILED, kpb.SUCCEEDED)
        assert done.state == kpb.FAILED and done.attempts == 2
        assert done.error == "gave up after 2 attempts; last error: model busy on attempt 2"
    finally:
        k.close()


def test_other_errors_fail_at_once_with_the_message(kernel):
    task = kernel.runner.submit(decision_request(fail="field 'amount' is negative"))
    done = wait_for(kernel.runner, task.task_id, kpb.FAILED, kpb.SUCCEEDED)
    assert done.state == kpb.FAILED and done.attempts == 1
    assert done.error == "INVALID_ARGUMENT: field 'amount' is negative"


def test_a_bug_in_the_pipeline_fails_the_task_and_the_runner_goes_on(tmp_path):
    def run_fn(task):
        if task.request.fields["amount"].number_value < 0:
            raise ZeroDivisionError("division by zero")
        if task.request.fields["amount"].number_value == 0:
            return "not a decision"
        return kpb.Decision(action="approve")

    k = Kernel(tmp_path, run_fn=run_fn, workers=1)
    try:
        crash = k.runner.submit(decision_request(amount=-1.0))
        odd = k.runner.submit(decision_request(amount=0.0))
        fine = k.runner.submit(decision_request(amount=1.0))
        assert wait_for(k.runner, crash.task_id, kpb.FAILED).error == "ZeroDivisionError: division by zero"
        assert "returned str, not a Decision" in wait_for(k.runner, odd.task_id, kpb.FAILED).error
        assert wait_for(k.runner, fine.task_id, kpb.SUCCEEDED).decision.action == "approve"
    finally:
        k.close()


def test_same_idempotency_key_starts_one_task(kernel):
    first = kernel.runner.submit(decision_request(key="k1", amount=5.0))
    second = kernel.runner.submit(decision_request(key="k1", amount=5.0))
    assert second.task_id == first.task_id
    wait_for(kernel.runner, first.task_id, kpb.SUCCEEDED)
    assert kernel.runner.submit(decision_request(key="k1", amount=5.0)).state == kpb.SUCCEEDED
    with pytest.raises(FailedPrecondition, match="different request"):
        kernel.runner.submit(decision_request(key="k1", amount=6.0))
    assert [run[0] for run in kernel.runs] == [first.task_id]


def test_validate_refuses_before_a_task_exists(tmp_path):
    def validate(request):
        if request.pipeline != "claims":
            raise NotFound(f"pipeline '{request.pipeline}' does not exist")

    k = Kernel(tmp_path, validate=validate)
    try:
        with pytest.raises(NotFound, match="pipeline 'nope'"):
            k.runner.submit(kpb.DecisionRequest(pipeline="nope"))
        assert k.store.in_states((kpb.QUEUED, kpb.RUNNING, kpb.SUCCEEDED, kpb.FAILED)) == []
    finally:
        k.close()


def test_low_confidence_waits_for_review_and_finishes_with_the_human_action(kernel):
    task = kernel.runner.submit(decision_request(amount=50.0, confidence=0.2))
    waiting = wait_for(kernel.runner, task.task_id, kpb.WAITING_FOR_REVIEW)
    assert waiting.review_id and waiting.decision.outcome == kpb.ESCALATED
    assert waiting.decision.action == "approve"  # the proposal
    review = kernel.queue.get(waiting.review_id)
    assert review.task_id == task.task_id and review.state == "OPEN" and list(review.actions) == ACTIONS
    kernel.queue.claim(review.review_id, "alice", 60)
    resolved = kernel.queue.resolve(review.review_id, "alice", "deny", "receipt is forged")
    assert resolved.resolution.action == "deny" and resolved.resolution.outcome == kpb.REVIEWED
    done = wait_for(kernel.runner, task.task_id, kpb.SUCCEEDED)
    assert done.decision.action == "deny" and done.decision.outcome == kpb.REVIEWED
    assert done.history[-1].detail == f"review {review.review_id} resolved: deny"
    assert [h.state for h in done.history] == [kpb.QUEUED, kpb.RUNNING, kpb.WAITING_FOR_REVIEW, kpb.SUCCEEDED]


def test_a_review_resolved_before_the_task_says_it_waits_still_finishes_it(tmp_path):
    holder = {}

    def run_fn(task):
        queue = holder["queue"]
        proposal = kpb.Decision(action="approve", outcome=kpb.ESCALATED)
        review = queue.create(proposal, task.request, ACTIONS, 60, task_id=task.task_id)
        queue.claim(review.review_id, "fast", 60)
        queue.resolve(review.review_id, "fast", "deny")  # before the runner records WAITING_FOR_REVIEW
        return WaitingForReview(review.review_id, proposal)

    k = Kernel(tmp_path, run_fn=run_fn)
    holder["queue"] = k.queue
    try:
        task = k.runner.submit(decision_request())
        done = wait_for(k.runner, task.task_id, kpb.SUCCEEDED)
        assert done.decision.action == "deny"
        assert [h.state for h in done.history][-2:] == [kpb.WAITING_FOR_REVIEW, kpb.SUCCEEDED]
    finally:
        k.close()


def test_cancel_queued_running_and_waiting_tasks(tmp_path):
    release = threading.Event()
    started = threading.Event()

    def run_fn(task):
        if task.request.fields["amount"].number_value == 1:
            started.set()
            assert release.wait(TIMEOUT_S)
        return kpb.Decision(action="approve")

    k = Kernel(tmp_path, run_fn=run_fn, workers=1, start=False)
    try:
        queued = k.runner.submit(decision_request(amount=0.0))
        assert k.runner.cancel(queued.task_id).state == kpb.CANCELLED
        running = k.runner.submit(decision_request(amount=1.0))
        k.runner.start()
        assert started.wait(TIMEOUT_S)
        assert k.runner.cancel(running.task_id).state == kpb.CANCELLED
        release.set()
        after = k.runner.submit(decision_request(amount=2.0))  # one worker: runs after the cancelled attempt ends
        wait_for(k.runner, after.task_id, kpb.SUCCEEDED)
        assert k.runner.get(running.task_id).state == kpb.CANCELLED  # the late outcome was dropped
        assert k.runner.get(queued.task_id).attempts == 0  # never ran
        with pytest.raises(FailedPrecondition, match="already SUCCEEDED"):
            k.runner.cancel(after.task_id)
    finally:
        k.close()


def test_cancelled_waiting_task_ignores_its_review(kernel):
    task = kernel.runner.submit(decision_request(confidence=0.1))
    waiting = wait_for(kernel.runner, task.task_id, kpb.WAITING_FOR_REVIEW)
    assert kernel.runner.cancel(task.task_id).state == kpb.CANCELLED
    kernel.queue.claim(waiting.review_id, "bob", 60)
    with pytest.raises(FailedPrecondition, match="was cancelled"):  # one winner: the cancel came first
        kernel.queue.resolve(waiting.review_id, "bob", "approve")
    assert kernel.runner.get(task.task_id).state == kpb.CANCELLED
    again = kernel.runner.complete_from_review(waiting.review_id, kpb.Decision(action="approve"))
    assert again is None  # no task waits on it: kept, harmless
    assert kernel.runner.get(task.task_id).state == kpb.CANCELLED


def test_restart_requeues_running_tasks_and_keeps_waiting_ones(tmp_path, caplog):
    release = threading.Event()
    started = threading.Event()
    holder = {}

    def blocking(task):
        if task.request.fields["confidence"].number_value < 0.5:
            return make_decide(holder["queue"])(task)
        started.set()
        release.wait(TIMEOUT_S)
        return kpb.Decision(action="too-late")

    first = Kernel(tmp_path, run_fn=blocking)
    holder["queue"] = first.queue
    running = first.runner.submit(decision_request(amount=3.0, confidence=0.9))
    waiting = first.runner.submit(decision_request(amount=4.0, confidence=0.1))
    assert started.wait(TIMEOUT_S)
    review_id = wait_for(first.runner, waiting.task_id, kpb.WAITING_FOR_REVIEW).review_id
    assert first.runner.get(running.task_id).state == kpb.RUNNING
    first.close(timeout_s=0)  # the attempt is still running: as if the process had died
    try:
        with caplog.at_level("INFO", logger="aios"):
            second = Kernel(tmp_path)
        try:
            assert "1 re-queued for another attempt, 0 to take the decision their attempt recorded, 0 failed" in caplog.text  # the operator is told
            redone = wait_for(second.runner, running.task_id, kpb.SUCCEEDED)
            assert redone.attempts == 2 and redone.decision.action == "approve"
            assert "re-queued: the kernel stopped while attempt 1 ran" in [h.detail for h in redone.history]
            assert second.runner.get(waiting.task_id).state == kpb.WAITING_FOR_REVIEW
            second.queue.claim(review_id, "carol", 60)
            second.queue.resolve(review_id, "carol", "deny")
            assert wait_for(second.runner, waiting.task_id, kpb.SUCCEEDED).decision.action == "deny"
        finally:
            second.close()
    finally:
        release.set()  # the first process's worker ends; its late write finds the database closed


def test_restart_fails_a_task_whose_last_attempt_was_cut_off(tmp_path, caplog):
    with open_database(tmp_path) as db:
        store = TaskStore(db)
        task, _ = store.create(decision_request())
        store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=3)
    with caplog.at_level("INFO", logger="aios"):
        k = Kernel(tmp_path, max_attempts=3)
    try:
        assert "0 re-queued for another attempt, 0 to take the decision their attempt recorded, 1 failed" in caplog.text
        done = k.runner.get(task.task_id)
        assert done.state == kpb.FAILED and done.error == "the kernel stopped while attempt 3 of 3 ran"
    finally:
        k.close()


def test_a_task_waiting_for_a_retry_fails_when_the_restart_lowered_its_attempts(tmp_path, caplog):
    """(A workflow engine's audit) task_max_attempts lowered from 5 to 1 across a restart: a task waiting for its
    retry after attempt 1 ran "attempt 2 of 1". It has made its attempts: FAILED, saying why."""
    k = Kernel(tmp_path, max_attempts=5, backoff_s=600.0)
    try:
        task = k.runner.submit(decision_request(transient_failures=5))
        watch = k.runner.watch(task.task_id, timeout_s=TIMEOUT_S)
        try:
            waiting = next(t for t in watch if t.state == kpb.QUEUED and t.attempts == 1)
        finally:
            watch.close()
        assert "retry in 30 s" in waiting.history[-1].detail  # (max_backoff_s: the restart comes first)
        # (a workflow engine's audit: when the retry is due was in that text alone)
        assert waiting.next_attempt_unix_ns == waiting.history[-1].at_unix_ns + 30 * 10**9
    finally:
        k.close()
    with caplog.at_level("INFO", logger="aios"):
        k = Kernel(tmp_path, max_attempts=1)
    try:
        done = k.runner.get(task.task_id)
        assert done.state == kpb.FAILED and done.attempts == 1, done
        assert done.error == "gave up after 1 attempts: task_max_attempts is 1 since the kernel restarted"
        assert "1 waiting for a retry failed: they have made task_max_attempts (1) attempts" in caplog.text
        assert [run for run in k.runs if run[0] == task.task_id] == []  # (never run again)
    finally:
        k.close()


def test_restart_applies_a_resolution_that_arrived_while_nobody_could_finish_the_task(tmp_path):
    with open_database(tmp_path) as db:
        store = TaskStore(db)
        task, _ = store.create(decision_request())
        store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=1)
        store.transition(task.task_id, kpb.WAITING_FOR_REVIEW, (kpb.RUNNING,), review_id="r1")
        db.tasks.put_completion("r1", kpb.Decision(action="deny"))  # stored; the crash came before applying it
    k = Kernel(tmp_path)
    try:
        done = k.runner.get(task.task_id)
        assert done.state == kpb.SUCCEEDED and done.decision.action == "deny"
    finally:
        k.close()


def test_a_task_cut_off_after_queueing_its_review_reuses_it_when_run_again(tmp_path):
    created = threading.Event()
    never = threading.Event()
    holder = {}

    def dies_after_escalating(task):
        proposal = kpb.Decision(request_id=task.request.request_id, action="approve", outcome=kpb.ESCALATED)
        holder["review"] = holder["queue"].create(proposal, task.request, ACTIONS, 60, task_id=task.task_id)
        created.set()
        never.wait(TIMEOUT_S)  # the process "dies" here, before the runner records WAITING_FOR_REVIEW
        raise TransientError("gone")

    first = Kernel(tmp_path, run_fn=dies_after_escalating)
    holder["queue"] = first.queue
    task = first.runner.submit(decision_request(confidence=0.1))
    assert created.wait(TIMEOUT_S)
    first.close(timeout_s=0)
    try:
        second = Kernel(tmp_path, start=False)
        try:
            rid = holder["review"].review_id
            # A reviewer resolves the case while the task is still recorded as RUNNING.
            second.queue.claim(rid, "erin", 60)
            second.queue.resolve(rid, "erin", "deny")
            assert second.runner.get(task.task_id).state == kpb.RUNNING
            second.runner.start()  # re-runs the task: the same review, already resolved
            done = wait_for(second.runner, task.task_id, kpb.SUCCEEDED, kpb.FAILED)
            assert done.state == kpb.SUCCEEDED and done.decision.action == "deny" and done.review_id == rid
            assert len(second.queue.list().reviews) == 1
        finally:
            second.close()
    finally:
        never.set()
