"""StartTask's answers: a request that could never be decided is refused up front, the answer says whether it
started the task or found the one its idempotency key had started, and unknown ids are quoted short.

A real kernel serving the claims pipeline, called over gRPC and with the
``aios-kernel task`` commands (run in this process, talking to the server as
from a terminal).
"""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.cli import main

TIMEOUT_S = 20
LARGE_CLAIM = ["--field", "claim_amount=90000", "--field", "customer_tier=gold"]


server, channel = module_claims_kernel()


@pytest.fixture
def tasks(channel):
    return kgrpc.TaskServiceStub(channel)


@pytest.fixture
def cli(server, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--address", f"127.0.0.1:{server.port}"])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def start(key: str = "", tenant: str = "start", **text) -> kpb.StartTaskRequest:
    request = claim_request(data.generate_cases(1, seed=3)[0], tenant=tenant, idempotency_key=key)
    for name, value in text.items():
        request.text_fields[name] = value
    return kpb.StartTaskRequest(request=request)


def refused(call, message) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        answer = call(message, timeout=TIMEOUT_S)
        if not hasattr(answer, "ListFields"):  # a stream: its first message brings the error
            next(answer)
    return info.value.code(), info.value.details()


def test_a_text_field_the_pipeline_does_not_take_is_refused_before_a_task_exists(tasks):
    assert refused(tasks.StartTask, start(key="text-1", bogus="x")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "text_fields['bogus'] is not a text field of pipeline 'claims_triage' (text fields: description, notes)")
    code, details = refused(tasks.StartTask, start(key="text-1", claim_amount="90000"))  # a typed field, as text
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is a typed field of pipeline 'claims_triage'" in details
    # Nothing was stored under the key: the corrected request starts the task.
    task = tasks.StartTask(start(key="text-1", description="water in the basement"), timeout=TIMEOUT_S)
    assert task.state == kpb.QUEUED and not task.replayed


def test_start_task_says_whether_it_started_the_task(tasks):
    first = tasks.StartTask(start(key="order-1"), timeout=TIMEOUT_S)
    again = tasks.StartTask(start(key="order-1"), timeout=TIMEOUT_S)
    assert not first.replayed and again.replayed and again.task_id == first.task_id
    assert not tasks.GetTask(kpb.TaskRef(task_id=first.task_id), timeout=TIMEOUT_S).replayed  # never stored
    assert not tasks.StartTask(start(key="order-1", tenant="other"), timeout=TIMEOUT_S).replayed  # keys are per tenant


def test_task_start_without_wait_says_already_started(cli):
    code, out, err = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "cli", "--idempotency-key", "k-1")
    assert code == 0, err
    task_id = out.split()[1]
    assert out.startswith(f"task {task_id} started\ntask {task_id}  ")  # the line, then the task as `task get`
    code, out, err = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "cli", "--idempotency-key", "k-1")
    first_line = out.splitlines()[0]
    assert code == 0 and first_line.startswith(f"task {task_id} was already started with idempotency key 'k-1' ")
    assert "following" not in first_line and out.splitlines()[1].startswith(f"task {task_id}  ")
    code, out, _ = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "cli", "--idempotency-key", "k-1",
                       "--json")
    assert code == 0 and json.loads(out)["replayed"] is True and json.loads(out)["task_id"] == task_id


def test_unknown_task_ids_are_quoted_short(tasks):
    long_id = "x" * 100_000
    for call in (tasks.GetTask, tasks.CancelTask, tasks.WatchTask):
        code, details = refused(call, kpb.TaskRef(task_id=long_id))
        assert code == grpc.StatusCode.NOT_FOUND, (call, details)
        assert details == f"task '{'x' * 80}'… (99920 more characters) does not exist"
    assert refused(tasks.GetTask, kpb.TaskRef(task_id="no\nsuch")) == (
        grpc.StatusCode.NOT_FOUND, "task 'no\\nsuch' does not exist")  # escaped, never a line break


def test_a_key_a_decide_used_with_another_request_is_refused_before_a_task_exists(channel, tasks):
    # (A tasks audit: StartTask answered QUEUED, then the task failed FAILED_PRECONDITION.) Tasks and Decide
    # share a tenant's keys; the same request under the key is replayed either way.
    decided = kgrpc.DecisionServiceStub(channel).Decide(start(key="shared-1").request, timeout=TIMEOUT_S)
    other = start(key="shared-1")
    other.request.fields["claim_amount"].number_value += 1
    code, details = refused(tasks.StartTask, other)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'shared-1' was used before with a different request" in details
    same = tasks.StartTask(start(key="shared-1"), timeout=TIMEOUT_S)
    done = _finished(tasks, same.task_id)
    assert done.state == kpb.SUCCEEDED or done.state == kpb.WAITING_FOR_REVIEW
    assert done.decision.audit_sequence == decided.audit_sequence  # the Decide's decision, not a second one


def _finished(tasks, task_id: str) -> kpb.Task:
    for task in tasks.WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
        if task.state in (kpb.SUCCEEDED, kpb.WAITING_FOR_REVIEW, kpb.FAILED):
            return task
    raise AssertionError("the task's watch ended before it finished")


def test_a_start_without_a_pipeline_names_the_field_as_sent(tasks):
    code, details = refused(tasks.StartTask, kpb.StartTaskRequest(request=kpb.DecisionRequest(tenant="start")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request.pipeline is required"), details


def test_a_decide_with_the_key_of_a_task_not_decided_yet_yields_to_the_task(server, channel, tasks, monkeypatch):
    """StartTask took key K; before its attempt decides, a Decide with K must not be decided (a test-port audit: a
    Decide with another request was, and the task then failed on its own key). Another request is refused as
    StartTask refuses one; the same request is ABORTED with a retry hint, and once the task decided, a retry gets
    the task's decision."""
    runner = server.decisions.tasks
    release, real = threading.Event(), runner.run_fn

    def held(task):  # fault injected on purpose: the attempt waits, as behind a busy queue
        release.wait(TIMEOUT_S)
        return real(task)

    monkeypatch.setattr(runner, "run_fn", held)
    decide = kgrpc.DecisionServiceStub(channel)
    try:
        task = tasks.StartTask(start(key="held-key", tenant="yield"), timeout=TIMEOUT_S)
        other = claim_request(dict(data.generate_cases(1, seed=3)[0], claim_amount=801.0), tenant="yield",
                              idempotency_key="held-key")
        code, details = refused(decide.Decide, other)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and f"already started task {task.task_id}" in details
        with pytest.raises(grpc.RpcError) as info:
            decide.Decide(start(key="held-key", tenant="yield").request, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.ABORTED and "has not decided yet" in info.value.details()
        assert dict(info.value.trailing_metadata()).get("retry-after-ms")
    finally:
        release.set()
    done = next(t for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
                if t.state in (kpb.SUCCEEDED, kpb.FAILED, kpb.WAITING_FOR_REVIEW))
    assert done.state != kpb.FAILED, done.error
    again = decide.Decide(start(key="held-key", tenant="yield").request, timeout=TIMEOUT_S)
    assert again.audit_sequence == done.decision.audit_sequence  # the task's decision, replayed


def test_a_start_task_with_the_key_a_decide_is_deciding_now_for_another_request_is_refused(server, channel, tasks,
                                                                                          monkeypatch):
    """The other order (a review audit: sent at once, both were answered and the task then failed on its own key):
    a Decide holds key K while it decides; a StartTask with K and another request is refused, the Decide answered."""
    engine = server.decisions.engine
    deciding, release, real = threading.Event(), threading.Event(), engine._replayed

    def held(request, request_hash):  # fault injected on purpose: the Decide stops here, its key claimed
        if request.request_id == "deciding-now":
            deciding.set()
            release.wait(TIMEOUT_S)
        return real(request, request_hash)

    monkeypatch.setattr(engine, "_replayed", held)
    decide = kgrpc.DecisionServiceStub(channel)
    request = claim_request(data.generate_cases(1, seed=3)[0], tenant="race", idempotency_key="race-key",
                            request_id="deciding-now")
    answer = decide.Decide.future(request, timeout=TIMEOUT_S)
    try:
        assert deciding.wait(TIMEOUT_S)
        other = claim_request(dict(data.generate_cases(1, seed=3)[0], claim_amount=802.0), tenant="race",
                              idempotency_key="race-key")
        code, details = refused(tasks.StartTask, kpb.StartTaskRequest(request=other))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "in use by a Decide" in details
    finally:
        release.set()
    assert answer.result().action
    assert server.decisions.tasks.store.key_holder("race", "race-key") is None  # the refused task holds nothing


def test_a_task_that_adopts_a_keyed_decide_s_escalation_finishes_with_its_resolution(channel, tasks):
    """StartTask with the key and request of a Decide that escalated: the task takes that decision and waits on
    the Decide's review, which names no task. Its resolution must finish the task (a review audit: it waited for
    good), and a cancel of such a task leaves the Decide caller's review alone."""
    decide, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    for key, resolve in (("adopt-resolved", True), ("adopt-cancelled", False)):
        large = claim_request(dict(data.generate_cases(1, seed=3)[0], claim_amount=90000.0), tenant="adopt",
                              idempotency_key=key, request_id=key)  # R04: always seen by a human
        escalated = decide.Decide(large, timeout=TIMEOUT_S)
        assert escalated.outcome == kpb.ESCALATED and escalated.review_id
        task = tasks.StartTask(kpb.StartTaskRequest(request=large), timeout=TIMEOUT_S)
        waiting = next(t for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
                       if t.state not in (kpb.QUEUED, kpb.RUNNING))
        assert waiting.state == kpb.WAITING_FOR_REVIEW and waiting.review_id == escalated.review_id
        ref = kpb.ReviewRef(review_id=escalated.review_id)
        if resolve:
            reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated.review_id, reviewer="ann"), timeout=TIMEOUT_S)
            reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=escalated.review_id, reviewer="ann",
                                                           action="deny", comment="checked"), timeout=TIMEOUT_S)
            done = next(t for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
                        if t.state != kpb.WAITING_FOR_REVIEW)
            assert done.state == kpb.SUCCEEDED and done.decision.action == "deny"
            assert done.decision.outcome == kpb.REVIEWED
        else:
            assert tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state == kpb.CANCELLED
            assert reviews.GetReview(ref, timeout=TIMEOUT_S).state == "OPEN"  # the Decide caller's case stays


def test_a_resolved_adopted_review_refuses_the_cancel_of_the_task_waiting_on_it(server, channel, tasks, monkeypatch):
    """A race audit: the task waits on a keyed Decide's review (which names no task); the reviewer's resolution was
    stored, its hook not yet through to the task, and a cancel then was answered OK too (the task ended CANCELLED,
    the reviewer's action lost). The resolution is the winner: the cancel is refused, the task takes the action."""
    decide, reviews = kgrpc.DecisionServiceStub(channel), kgrpc.ReviewServiceStub(channel)
    side = server.decisions
    stored, release, real = threading.Event(), threading.Event(), side._finish_waiting_task

    def held(review, resolution):  # fault injected on purpose: the resolution is stored, the task not told yet
        stored.set()
        release.wait(TIMEOUT_S)
        real(review, resolution)

    large = claim_request(dict(data.generate_cases(1, seed=3)[0], claim_amount=90000.0), tenant="adopt-race",
                          idempotency_key="adopt-race", request_id="adopt-race")
    escalated = decide.Decide(large, timeout=TIMEOUT_S)
    task = tasks.StartTask(kpb.StartTaskRequest(request=large), timeout=TIMEOUT_S)
    waiting = next(t for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
                   if t.state not in (kpb.QUEUED, kpb.RUNNING))
    assert waiting.state == kpb.WAITING_FOR_REVIEW and waiting.review_id == escalated.review_id
    monkeypatch.setattr(side, "_finish_waiting_task", held)
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated.review_id, reviewer="ann"), timeout=TIMEOUT_S)
    resolved = reviews.ResolveReview.future(kpb.ResolveReviewRequest(
        review_id=escalated.review_id, reviewer="ann", action="deny", comment="checked"), timeout=TIMEOUT_S)
    try:
        assert stored.wait(TIMEOUT_S)
        code, details = refused(tasks.CancelTask, kpb.TaskRef(task_id=task.task_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and escalated.review_id in details
    finally:
        release.set()
    assert resolved.result().resolved_action == "deny"
    done = next(t for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
                if t.state != kpb.WAITING_FOR_REVIEW)
    assert done.state == kpb.SUCCEEDED and done.decision.action == "deny"


def test_a_task_attempt_waits_for_its_key_held_by_a_decide_about_to_be_refused(server, channel, tasks, monkeypatch):
    """A race audit: a Decide with a task's key and another request claims the key before it finds the task holds
    it, and is then refused; a task attempt starting in that moment failed for good ("in use by another call with
    a different request"), after which the key was free and later Decides with the other request were decided.
    The attempt waits for the doomed Decide's claim instead."""
    engine = server.decisions.engine
    claimed, attempt_claims, release = threading.Event(), threading.Event(), threading.Event()
    real_replayed, real_prepare, real_claim = engine._replayed, engine.prepare, engine.claims.claim

    def held_decide(request, request_hash):  # fault injected on purpose: the Decide stops with the key claimed
        if request.request_id == "doomed":
            claimed.set()
            release.wait(TIMEOUT_S)
        return real_replayed(request, request_hash)

    def attempt_after_the_decide_claimed(request, deadline_ns, *args, task_id="", **kwargs):
        if task_id:
            claimed.wait(TIMEOUT_S)
        return real_prepare(request, deadline_ns, *args, task_id=task_id, **kwargs)

    def claim(*args, **kwargs):
        if kwargs.get("wait_ns"):
            attempt_claims.set()  # (the Decide holds the key now: it is released only after this)
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(engine, "_replayed", held_decide)
    monkeypatch.setattr(engine, "prepare", attempt_after_the_decide_claimed)
    monkeypatch.setattr(engine.claims, "claim", claim)
    case = data.generate_cases(1, seed=3)[0]
    task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(case, tenant="doom", idempotency_key="doom")),
                           timeout=TIMEOUT_S)
    other = claim_request(dict(case, claim_amount=802.0), tenant="doom", idempotency_key="doom", request_id="doomed")
    doomed = kgrpc.DecisionServiceStub(channel).Decide.future(other, timeout=TIMEOUT_S)
    try:
        assert attempt_claims.wait(TIMEOUT_S)
    finally:
        release.set()
    with pytest.raises(grpc.RpcError) as info:
        doomed.result()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already started task" in info.value.details()
    done = next(t for t in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)
                if t.state not in (kpb.QUEUED, kpb.RUNNING))
    assert done.state in (kpb.SUCCEEDED, kpb.WAITING_FOR_REVIEW), done.error
    assert done.attempts == 1  # not backed off and run again


def claim_start(amount: float, key: str) -> kpb.StartTaskRequest:
    """A claim of ``amount`` under ``key``: at 800 the policy decides it alone (R08), at 90000 a human must (R04)."""
    case = dict(data.generate_cases(1, seed=7)[0], claim_amount=amount, customer_tier="gold", fraud_score=0.05,
                prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    return kpb.StartTaskRequest(request=claim_request(case, tenant="deploy", idempotency_key=key))


def test_a_retried_start_finds_its_task_after_the_pipeline_was_unloaded(claims_models, tmp_path):
    """A workflow engine's StartTask whose answer was lost is retried with its key after a deploy removed the
    pipeline: the answer is the task the key started (replayed), not NOT_FOUND 'pipeline is not loaded', which told
    the engine nothing had started (it has no other way to learn the task's id); another request under the key is
    refused naming that task (a workflow engine's audit M1)."""
    from conftest import start_claims_kernel

    data_dir = str(tmp_path / "data")
    first = start_claims_kernel(claims_models, tmp_path / "first", data_dir=data_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            tasks = kgrpc.TaskServiceStub(ch)
            done = tasks.StartTask(claim_start(800.0, "claim-1"), timeout=TIMEOUT_S)
            waiting = tasks.StartTask(claim_start(90000.0, "claim-2"), timeout=TIMEOUT_S)
            done, waiting = _finished(tasks, done.task_id), _finished(tasks, waiting.task_id)
    finally:
        first.stop(grace=1)
    assert (done.state, waiting.state) == (kpb.SUCCEEDED, kpb.WAITING_FOR_REVIEW)
    no_pipelines = tmp_path / "none"
    no_pipelines.mkdir()
    second = start_claims_kernel(claims_models, tmp_path / "second", pipelines=no_pipelines, data_dir=data_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{second.port}") as ch:
            tasks = kgrpc.TaskServiceStub(ch)
            code, details = refused(tasks.StartTask, claim_start(800.0, "claim-3"))  # a new task: refused
            assert code == grpc.StatusCode.NOT_FOUND and "pipeline 'claims_triage' is not loaded" in details
            for task, request in ((done, claim_start(800.0, "claim-1")), (waiting, claim_start(90000.0, "claim-2"))):
                again = tasks.StartTask(request, timeout=TIMEOUT_S)
                assert (again.task_id, again.replayed, again.state) == (task.task_id, True, task.state)
            code, details = refused(tasks.StartTask, claim_start(801.0, "claim-1"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert f"request.idempotency_key 'claim-1' already started task {done.task_id} with a different" in details
    finally:
        second.stop(grace=1)


def test_a_key_reused_with_another_request_names_what_differs(tasks):
    # (A workflow engine's refusal said only "a different request": the caller had to diff the two itself, with
    # GetTask, to learn which of its fields changed between the call and its "retry".)
    first = tasks.StartTask(start(key="diff-1", description="hail"), timeout=TIMEOUT_S)
    other = start(key="diff-1", notes="called twice")  # its description left out, its notes added
    other.request.fields["claim_amount"].number_value += 1
    other.request.fields["prior_claims"].number_value = 0.0  # sent as 0.0, not 0: the same value (not named)
    other.request.priority, other.request.timeout_ms = 3, 5  # call details a retry may change (not named)
    code, details = refused(tasks.StartTask, other)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == (
        f"request.idempotency_key 'diff-1' already started task {first.task_id} with a different request (it "
        "differs in request.fields['claim_amount'], request.text_fields['description'], "
        "request.text_fields['notes']); use a new key for a new request")
    other = start(key="diff-1", description="hail")
    other.request.pipeline = "claims_triage_v2"  # (not loaded: the key's task is found first)
    assert refused(tasks.StartTask, other)[1].count("(it differs in request.pipeline)") == 1
