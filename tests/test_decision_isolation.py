"""One decision's failure stays that decision's: other rows of its group are decided and answered.

The finisher decides everything finished meanwhile as one group (one policy
pass per pipeline, one audit wait). Here a policy pass that raises on one row
and an idempotency or review store that cannot write (each a fault injected
on purpose, named as such) must fail at most the rows they concern, and a
recorded decision must never be answered as a write that kept nothing. A real
claims kernel over gRPC; the deterministic tests build one group by hand from
real requests (``engine.prepare`` / ``run_blocking`` / ``finish``), as
tests/test_decisions.py does for model faults.

The policy fault: pipeline ``claims_strict`` (the claims pipeline under
another name) gets a policy whose pass raises when a row holds a marked
``claim_amount``: a ``PolicyInputError`` (what the compiled evaluator raises
for a value it refuses, e.g. a fraction in an integer input) or, for the other
mark, a plain exception (a bug). Every way the load used to let such a row
through (a number field read as an integer, classes the model does not have)
is being refused at load, hence the injection.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from claims_support import claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from kernel.pipelines import group_finish
from kernel.policy.errors import PolicyInputError

REFUSED = 4321.5  # a claim_amount the injected policy refuses (a KernelError)
CRASHES = 4321.25  # a claim_amount the injected policy crashes on (a plain exception)
DISK_FULL = "the store could not commit this write (nothing of it was kept): OperationalError: database or disk is full"


@pytest.fixture(scope="module")
def kernel(claims_kernel):
    """The claims kernel, with ``claims_strict`` uploaded next to ``claims_triage`` (same model and policy)."""
    with grpc.insecure_channel(f"127.0.0.1:{claims_kernel.port}") as channel:
        text = (claims_kernel.pipelines_dir / "claims_triage.toml").read_text()
        strict = text.replace('name = "claims_triage"\nversion', 'name = "claims_strict"\nversion', 1)
        assert strict.count('"claims_strict"') == 1
        kgrpc.AdminServiceStub(channel).UploadPipeline(kpb.UploadPipelineRequest(pipeline_toml=strict.encode()),
                                                       timeout=10)
    return claims_kernel


class PoisonedPolicy:
    """Fault injection: the real policy, except that a pass over a row whose ``claim_amount`` is REFUSED
    raises PolicyInputError (as the compiled evaluator does for a value it refuses), and over one whose
    ``claim_amount`` is CRASHES raises a plain exception (a bug)."""

    def __init__(self, policy):
        self._policy = policy

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def evaluate_rows(self, rows, outputs=None):
        amounts = {row.get("claim_amount") for row in rows}
        if REFUSED in amounts:
            raise PolicyInputError("claim_amount", f"injected: the policy refuses {REFUSED}")
        if CRASHES in amounts:
            raise ZeroDivisionError("injected: the policy pass crashed")
        return self._policy.evaluate_rows(rows, outputs)


class PoisonedRegistry:
    """Fault injection: the kernel's pipeline registry, handing out ``claims_strict`` with a PoisonedPolicy."""

    def __init__(self, registry, poisoned):
        self._registry, self.poisoned = registry, poisoned

    def __getattr__(self, name):
        return getattr(self._registry, name)

    def get(self, name, *args, **kwargs):
        return self.poisoned if name == self.poisoned.name else self._registry.get(name, *args, **kwargs)


@pytest.fixture
def poisoned(kernel, monkeypatch):
    engine = kernel.decisions.engine
    strict = engine.registry.get("claims_strict")
    registry = PoisonedRegistry(engine.registry, replace(strict, policy=PoisonedPolicy(strict.policy)))
    monkeypatch.setattr(engine, "registry", registry)
    return registry.poisoned


@pytest.fixture
def decisions(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        yield kgrpc.DecisionServiceStub(channel)


@pytest.fixture
def decision_log(caplog):
    """What the engine logs, also where the kernel's logging setup stops ``aios`` at its own handler."""
    logger = logging.getLogger("aios.decisions")
    cut = not logging.getLogger("aios").propagate  # (else caplog's handler on the root sees the records already)
    if cut:
        logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        if cut:
            logger.removeHandler(caplog.handler)


CASES = data.generate_cases(64, seed=5)
# A small, clean claim the model is sure of: decided without a person (tests/test_decisions.py's first case).
PLAIN = dict(CASES[0], claim_amount=800.0, customer_tier="bronze", fraud_score=0.05, prior_claims=0,
             policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)


def _request(i: int, pipeline: str = "claims_triage", amount: float | None = None, **options) -> kpb.DecisionRequest:
    case = dict(CASES[i % len(CASES)])
    if amount is not None:
        case["claim_amount"] = amount
    request = claim_request(case, **options)
    request.pipeline = pipeline
    return request


def _group(engine, requests: list[kpb.DecisionRequest]) -> list:
    """Real requests prepared and run through the model, not yet finished: one group for ``engine.finish``."""
    group = [engine.prepare(request, None) for request in requests]
    for pending in group:
        engine.run_blocking(pending)
    return group


def _record(kernel, sequence: int) -> kpb.AuditRecord:
    audit_dir = Path(kernel.settings.data_dir) / "audit"
    return next(r for r in iter_directory(audit_dir, sequence, RecordFilter()) if r.sequence == sequence)


# -- a row that cannot be decided ------------------------------------------------------------------------


def test_a_row_the_policy_refuses_fails_alone_in_its_group(kernel, poisoned, decision_log):
    requests = [
        _request(0, request_id="t0"),
        _request(1, "claims_strict", request_id="s-ok-0"),
        _request(2, "claims_strict", REFUSED, request_id="s-bad"),
        _request(3, request_id="t1"),
        _request(4, "claims_strict", request_id="s-ok-1"),
        _request(5, "claims_strict", request_id="s-ok-2"),
        _request(6, request_id="t2", amount=REFUSED),  # claims_triage's policy is not poisoned
        _request(7, "claims_strict", request_id="s-ok-3"),
    ]
    results = kernel.decisions.engine.finish(_group(kernel.decisions.engine, requests))
    by_id = {request.request_id: result for request, result in zip(requests, results)}
    bad = by_id.pop("s-bad")
    assert isinstance(bad, InvalidArgument) and "'claim_amount'" in bad.message and "injected" in bad.message
    for request_id, decision in by_id.items():
        assert isinstance(decision, kpb.Decision), (request_id, decision)
        assert decision.request_id == request_id and decision.audit_sequence > 0
        assert decision.pipeline == ("claims_strict" if request_id.startswith("s-") else "claims_triage")
    # Logged once, for the row that failed; no traceback for the group.
    lines = [r for r in decision_log.records if "s-bad" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert "finishing a group" not in decision_log.text


def test_a_policy_pass_that_crashes_on_one_row_fails_that_row_alone_with_internal(kernel, poisoned, decision_log):
    requests = [_request(i, "claims_strict", request_id=f"p{i}") for i in range(7)]
    requests[4] = _request(4, "claims_strict", CRASHES, request_id="p-crash")
    requests += [_request(i, request_id=f"o{i}") for i in range(3)]
    results = kernel.decisions.engine.finish(_group(kernel.decisions.engine, requests))
    by_id = {request.request_id: result for request, result in zip(requests, results)}
    error = by_id.pop("p-crash")
    assert isinstance(error, Internal) and "p-crash" in error.message and "injected" not in error.message
    assert all(isinstance(d, kpb.Decision) and d.request_id == request_id for request_id, d in by_id.items())
    # One log line, with the traceback, naming the request id the caller got.
    lines = [r for r in decision_log.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "p-crash" in lines[0].getMessage() and lines[0].exc_info is not None
    assert isinstance(lines[0].exc_info[1], ZeroDivisionError)


def test_several_bad_rows_among_many_get_their_own_errors(kernel, poisoned, decision_log):
    """Bisection finds every bad row, the two kinds apart, in a group of one pipeline; logged once each kind."""
    marks = {3: REFUSED, 17: CRASHES, 18: REFUSED, 40: REFUSED}
    requests = [_request(i, "claims_strict", marks.get(i), request_id=f"m{i}") for i in range(41)]
    results = kernel.decisions.engine.finish(_group(kernel.decisions.engine, requests))
    for i, result in enumerate(results):
        if marks.get(i) == REFUSED:
            assert isinstance(result, InvalidArgument), (i, result)
        elif marks.get(i) == CRASHES:
            assert isinstance(result, Internal) and f"m{i}" in result.message, (i, result)
        else:
            assert isinstance(result, kpb.Decision) and result.request_id == f"m{i}", (i, result)
    warnings = [r for r in decision_log.records if r.levelno == logging.WARNING]
    errors = [r for r in decision_log.records if r.levelno >= logging.ERROR]
    assert len(warnings) == 1 and "could not decide 3 of 41 requests" in warnings[0].getMessage()
    assert len(errors) == 1 and "m17" in errors[0].getMessage() and errors[0].exc_info is not None


def test_concurrent_unary_calls_one_in_eight_refused_fail_only_those(decisions, poisoned):
    answers: dict[int, object] = {}

    def request(i: int) -> kpb.DecisionRequest:
        if i % 8 == 3:
            return _request(i, "claims_strict", REFUSED, request_id=f"u{i}")
        return _request(i, "claims_strict" if i % 8 == 5 else "claims_triage", request_id=f"u{i}")

    def worker(k: int) -> None:
        for i in range(k, 96, 12):
            try:
                answers[i] = decisions.Decide(request(i), timeout=30)
            except grpc.RpcError as exc:
                answers[i] = exc

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 96
    for i, answer in sorted(answers.items()):
        if i % 8 == 3:
            assert isinstance(answer, grpc.RpcError), (i, answer)
            assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT and "injected" in answer.details(), (i, answer)
        else:
            assert isinstance(answer, kpb.Decision), (i, answer.code(), answer.details())
            assert answer.request_id == f"u{i}" and answer.audit_sequence > 0


def test_decide_stream_with_one_bad_row_in_four_answers_the_other_three(decisions, poisoned):
    requests = [_request(i, "claims_strict", REFUSED if i % 4 == 1 else None, request_id=f"d{i}") for i in range(40)]
    answers = {a.request_id: a for a in decisions.DecideStream(iter(requests), timeout=60)}
    assert len(answers) == 40
    for i in range(40):
        answer = answers[f"d{i}"]
        if i % 4 == 1:
            assert answer.error_code == "INVALID_ARGUMENT" and "injected" in answer.error_message
        else:
            assert not answer.error_code, answer.error_message
            assert answer.pipeline == "claims_strict" and answer.audit_sequence > 0


# -- a recorded decision whose idempotency entry or review cannot be stored ------------------------------------


class FailingIdempotencyStore:
    """Fault injection: the kernel's idempotency store, whose writes fail as they do on a full disk
    (lookups still work: SQLite reads on a full disk)."""

    def __init__(self, store):
        self._store = store
        self.failed: list[str] = []

    def get(self, tenant: str, key: str):
        return self._store.get(tenant, key)

    def put(self, tenant: str, key: str, request_hash: str, response: bytes, audit_sequence: int = -1) -> bytes:
        self.failed.append(key)
        raise Internal(DISK_FULL)

    def keep_unwritten(self, tenant: str, key: str, request_hash: str, response: bytes,
                       audit_sequence: int = -1) -> bool:
        return self._store.keep_unwritten(tenant, key, request_hash, response, audit_sequence)  # (memory)

    def unwritten(self) -> int:
        return self._store.unwritten()

    def check_writable(self, key: str) -> None:
        self._store.check_writable(key)  # (the store itself takes writes: only this fake's puts fail)


@pytest.fixture
def failing_store(kernel, monkeypatch):
    services = kernel.decisions.engine.services
    store = FailingIdempotencyStore(services.idempotency)
    monkeypatch.setattr(services, "idempotency", store)
    return store


def test_a_keyed_decision_whose_idempotency_entry_cannot_be_stored_is_answered(kernel, decisions, failing_store,
                                                                               decision_log):
    decision = decisions.Decide(_request(20, request_id="key-full", idempotency_key="full-1"), timeout=10)
    assert failing_store.failed == ["full-1"]
    assert decision.request_id == "key-full" and decision.action and not decision.replayed
    record = _record(kernel, decision.audit_sequence)
    assert record.request_id == "key-full" and record.decision.action == decision.action
    assert record.idempotency_key == "full-1"
    (line,) = [r for r in decision_log.records if "idempotency" in r.getMessage()]
    assert "full-1" in line.getMessage() and "disk is full" in line.getMessage()
    assert line.levelno == logging.ERROR


def test_failing_idempotency_writes_fail_no_decision_of_their_group(kernel, failing_store):
    """Keyed and unkeyed decisions in one group, every idempotency write failing: all are answered."""
    engine = kernel.decisions.engine
    requests = [_request(21 + i, request_id=f"g{i}", **({"idempotency_key": f"gk-{i}"} if i % 2 else {}))
                for i in range(6)]
    results = engine.finish(_group(engine, requests))
    assert sorted(failing_store.failed) == ["gk-1", "gk-3", "gk-5"]
    for request, result in zip(requests, results):
        assert isinstance(result, kpb.Decision), (request.request_id, result)
        assert result.request_id == request.request_id and result.audit_sequence > 0


def test_a_second_request_with_a_key_in_flight_is_refused_before_anything_is_decided(kernel):
    """Two different requests with one key: the second is the caller's mistake, refused at once while the first
    holds the key (kernel/pipelines/key_claims.py), so nothing of it is decided or recorded."""
    engine = kernel.decisions.engine
    first = engine.prepare(_request(30, request_id="k-first", idempotency_key="shared-key"), None)
    size = kernel.decisions.audit.size
    with pytest.raises(FailedPrecondition, match="in use by another call with a different request"):
        engine.prepare(_request(31, request_id="k-second", idempotency_key="shared-key"), None)
    engine.run_blocking(first)
    (answer,) = engine.finish([first])
    assert isinstance(answer, kpb.Decision) and kernel.decisions.audit.size == size + 1
    stored = engine.services.idempotency.get("acme", "shared-key")
    assert kpb.Decision.FromString(stored[1]).request_id == "k-first"


def test_a_key_found_taken_when_the_answer_is_stored_fails_that_decision_alone_and_says_it_was_recorded(kernel):
    """Should the store hold another request's answer under the key by the time a decision is stored (the
    fault is injected: written straight into the store between prepare and finish), that decision is
    FAILED_PRECONDITION saying it was recorded; its unkeyed neighbour is answered."""
    engine = kernel.decisions.engine
    requests = [_request(32, request_id="k-late", idempotency_key="taken-key"), _request(33, request_id="k-none")]
    group = _group(engine, requests)
    engine.services.idempotency.put("acme", "taken-key", "another request's hash", b"")  # injected
    refused, unkeyed = engine.finish(group)
    assert isinstance(unkeyed, kpb.Decision)
    assert isinstance(refused, FailedPrecondition) and "taken-key" in refused.message
    assert "recorded" in refused.message and "audit sequence" in refused.message
    sequence = int(refused.message.split("audit sequence ")[1].split(",")[0])
    assert _record(kernel, sequence).request_id == "k-late"


class FailingReviews:
    """Fault injection: the kernel's review queue, whose durable writes fail as they do on a full disk."""

    def __init__(self, reviews):
        self._reviews = reviews

    def __getattr__(self, name):
        return getattr(self._reviews, name)

    def create_many(self, *args, **kwargs):
        raise Internal(DISK_FULL)


def test_recorded_escalations_whose_reviews_cannot_be_stored_say_so_and_spare_the_rest(kernel, monkeypatch):
    engine = kernel.decisions.engine
    engine._review_rows.settle()  # (rows an earlier test's failing store left: stored now, or a decision is refused)
    monkeypatch.setattr(group_finish, "MAX_REVIEW_BACKLOG", 0)  # as after a long outage: reviews are stored before answers
    monkeypatch.setattr(engine.services, "reviews", FailingReviews(engine.services.reviews))
    requests = [_request(40, amount=75000.0, request_id="esc", idempotency_key="esc-key"),  # R04: a person decides
                claim_request(PLAIN, request_id="plain")]
    escalated, answered = engine.finish(_group(engine, requests))
    assert isinstance(answered, kpb.Decision) and not answered.review_id
    assert isinstance(escalated, Unavailable), escalated
    assert escalated.message.startswith("decision esc was made and recorded at audit sequence ")
    assert "review could not be stored (the review store: " in escalated.message
    sequence = int(escalated.message.split("audit sequence ")[1].split(" ")[0])
    assert _record(kernel, sequence).request_id == "esc"
    # Not answered, so not stored under its key: a retry decides (and opens its review) again.
    assert engine.services.idempotency.get("acme", "esc-key") is None



def test_a_retry_whose_deadline_has_passed_still_gets_the_stored_answer(kernel):
    """The stored answer is looked up before the request's deadline is checked: a retry that reaches the kernel
    too late to be decided (here its deadline is already past) gets the decision its key holds, not
    DEADLINE_EXCEEDED, and a late retry of an unknown key still gets DEADLINE_EXCEEDED."""
    import time

    from kernel.errors import DeadlineExceeded

    engine = kernel.decisions.engine
    first = engine.prepare(_request(50, request_id="on-time", idempotency_key="late-retry-key"), None)
    engine.run_blocking(first)
    (decided,) = engine.finish([first])
    past = time.monotonic_ns() - 1_000_000
    replay = engine.prepare(_request(50, request_id="too-late", idempotency_key="late-retry-key"), past)
    assert isinstance(replay, kpb.Decision) and replay.replayed and replay.audit_sequence == decided.audit_sequence
    with pytest.raises(DeadlineExceeded):
        engine.prepare(_request(51, idempotency_key="never-stored-key"), past)
    assert len(engine.claims) == 0
