"""One decision per idempotency key while the first call with it is still being decided (kernel/pipelines/key_claims.py).

Six concurrent calls with one key used to make six decisions, six audit
records and six reviews; the retry of a client whose own deadline had passed
while the kernel was still deciding made a second. Here the first call is
held in the queue behind a busy lane, so the duplicates meet it in flight
every time (no race to win), on both front ends.
"""

from __future__ import annotations

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims.data import REQUEST_FIELDS
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.errors import Aborted, FailedPrecondition
from kernel.pipelines.key_claims import STALE_AFTER_DEADLINE_NS, KeyClaims
from lane_support import occupy, save_slow_model, until

CASE = data.generate_cases(1, seed=31)[0]
MAX_QUEUE = 2  # the claims model's queue bound here: a third queued decision is refused at admission


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    models = build_small_model(tmp_path_factory.mktemp("models"), provider="cpu")  # queued behind `slow`
    toml = models / "claims_triage" / "1" / "model.toml"
    toml.write_text(toml.read_text().replace("instances = 1", f"instances = 1\nmax_queue = {MAX_QUEUE}"))
    save_slow_model(models)
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    # Decisions wait behind `slow`'s batches here; the demo's 2 s default timeout expired them on a loaded
    # machine (a stressed run: "deadline passed after 2003.1 ms in the queue"). Tests that want a deadline set one.
    triage = pipelines / "claims_triage.toml"
    assert "timeout_ms = 2000" in triage.read_text()
    triage.write_text(triage.read_text().replace("timeout_ms = 2000", "timeout_ms = 60000"))
    server = start_kernel(models, request.param, lane_slots=1, pipelines=str(pipelines), pipeline_poll_s=0,
                          data_dir=str(tmp_path_factory.mktemp("data")))
    yield server
    server.stop(grace=2)


def _queued_decisions(kernel) -> int:
    return kernel.lanes.load(kernel.hub.get("claims_triage"))[0]


def _trailer(error: grpc.RpcError, name: str) -> str | None:
    return dict(error.trailing_metadata() or ()).get(name)


def test_a_duplicate_in_flight_is_refused_with_a_hint_and_its_retry_replays_the_one_decision(kernel, channel):
    stub = kgrpc.DecisionServiceStub(channel)
    key = f"dup-{kernel.front_end}"
    request = claim_request(CASE, idempotency_key=key, request_id="first", priority=2)
    audit_before = kernel.decisions.audit.size
    train = occupy(kernel, channel)
    first = stub.Decide.future(request, timeout=120)
    until(lambda: _queued_decisions(kernel) == 1, "the first decision to queue")

    for attempt in range(3):  # the same request again (a hedge; a retry after the caller's own deadline)
        with pytest.raises(grpc.RpcError) as info:
            stub.Decide(claim_request(CASE, idempotency_key=key, request_id=f"again-{attempt}", priority=2),
                        timeout=60)
        assert info.value.code() == grpc.StatusCode.ABORTED, info.value.details()
        assert "is being decided now" in info.value.details() and key in info.value.details()
        assert 1 <= int(_trailer(info.value, "retry-after-ms")) <= 100
    streamed = list(stub.DecideStream(iter([claim_request(CASE, idempotency_key=key, request_id="streamed",
                                                          priority=2)]), timeout=60))
    assert [(d.request_id, d.error_code) for d in streamed] == [("streamed", "ABORTED")]
    assert 1 <= streamed[0].retry_after_ms <= 100  # the unary call's trailer, as a field (a stream has none)
    assert not streamed[0].not_decided  # (the key's first call is deciding it)
    other = claim_request({**CASE, "claim_amount": CASE["claim_amount"] + 1}, idempotency_key=key, priority=2)
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(other, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()

    for call in train:
        call.result()
    decided = first.result()
    assert decided.audit_sequence and not decided.replayed
    replay = stub.Decide(claim_request(CASE, idempotency_key=key, request_id="retried", priority=2), timeout=60)
    assert replay.replayed and replay.audit_sequence == decided.audit_sequence and replay.action == decided.action
    assert kernel.decisions.audit.size == audit_before + 1, "one key, one decision on the record"


def test_a_keyed_decision_that_expires_in_the_queue_frees_its_key(kernel, channel):
    stub = kgrpc.DecisionServiceStub(channel)
    key = f"expired-{kernel.front_end}"
    train = occupy(kernel, channel, batches=8)
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(claim_request(CASE, idempotency_key=key, priority=2, timeout_ms=30), timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    for call in train:
        call.result()
    answer = stub.Decide(claim_request(CASE, idempotency_key=key, priority=2), timeout=60)
    assert answer.audit_sequence and not answer.replayed  # decided now: the expired call kept nothing
    assert len(kernel.decisions.engine.claims) == 0


def test_a_keyed_decision_whose_caller_cancels_it_in_the_queue_frees_its_key(kernel, channel):
    """Found by test_fuzz_kernel_api's in-flight fuzzer: on grpc.aio a keyed Decide cancelled by its caller while
    it waited in the queue kept its key claimed (decide_on_loop left the call at its cancelled await, and nothing
    finished the decision that never ran): every retry with the key was ABORTED "is being decided now" until the
    claim went stale, 10 minutes on (a minute past the deadline with one); 2 in 200 calls cancelled at once."""
    stub = kgrpc.DecisionServiceStub(channel)
    key = f"cancelled-{kernel.front_end}"
    train = occupy(kernel, channel)
    call = stub.Decide.future(claim_request(CASE, idempotency_key=key, priority=2), timeout=120)
    until(lambda: _queued_decisions(kernel) == 1, "the keyed decision to queue")
    call.cancel()
    until(lambda: _queued_decisions(kernel) == 0, "the cancelled decision to leave the queue")
    for train_call in train:
        train_call.result()
    answer = stub.Decide(claim_request(CASE, idempotency_key=key, priority=2), timeout=60)
    assert answer.audit_sequence and not answer.replayed  # decided now: the cancelled call kept nothing
    until(lambda: len(kernel.decisions.engine.claims) == 0, "every claim to be released")


def test_a_keyed_decision_refused_at_admission_frees_its_key(kernel, channel):
    stub = kgrpc.DecisionServiceStub(channel)
    key = f"refused-{kernel.front_end}"
    train = occupy(kernel, channel)
    queued = [stub.Decide.future(claim_request(CASE, request_id=f"filler-{n}", priority=2), timeout=120)
              for n in range(MAX_QUEUE)]
    until(lambda: _queued_decisions(kernel) == MAX_QUEUE, "the queue to fill")
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(claim_request(CASE, idempotency_key=key, priority=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "queue for priority 2 is full" in info.value.details()
    for call in train + queued:
        call.result()
    answer = stub.Decide(claim_request(CASE, idempotency_key=key, priority=2), timeout=60)
    assert answer.audit_sequence and not answer.replayed  # the refused call held the key no longer
    assert len(kernel.decisions.engine.claims) == 0


def test_the_python_client_retries_as_the_hint_says_until_it_gets_the_one_decision(kernel, channel):
    """kernel.decision_client: ``retries`` sends an ABORTED call again after its retry-after-ms, so a hedged
    request gets the first call's decision back (replayed) and the kernel still makes one."""
    import numpy as np

    from kernel.decision_client import DecisionClient

    stub = kgrpc.DecisionServiceStub(channel)
    key = f"client-{kernel.front_end}"
    train = occupy(kernel, channel)
    first = stub.Decide.future(claim_request(CASE, idempotency_key=key, priority=2), timeout=120)
    until(lambda: _queued_decisions(kernel) == 1, "the first decision to queue")
    numpy_scalar = {bool: np.bool_, int: np.int64, float: np.float64}  # (numpy scalars are values too)
    fields = {name: numpy_scalar.get(type(CASE[name]), str)(CASE[name]) for name in REQUEST_FIELDS}
    with DecisionClient(f"127.0.0.1:{kernel.port}") as client:
        with pytest.raises(grpc.RpcError) as info:  # no retries: the refusal as it came
            client.decide("claims_triage", fields, tenant="acme", idempotency_key=key, priority=2, timeout=30)
        assert info.value.code() == grpc.StatusCode.ABORTED
        hedge = client.decide("claims_triage", fields, tenant="acme", idempotency_key=key, priority=2,
                              timeout=60, retries=10_000)
    decided = first.result()
    assert hedge.replayed and hedge.audit_sequence == decided.audit_sequence
    for call in train:
        call.result()


def test_a_claim_is_released_once_and_only_by_its_holder():
    now = [10**12]  # the claims' clock, moved by hand: the hint is how long the holder has taken so far
    claims = KeyClaims(clock=lambda: now[0])
    held = claims.claim("acme", "k", "hash-1", deadline_ns=None)
    with pytest.raises(Aborted) as info:
        claims.claim("acme", "k", "hash-1", deadline_ns=None)
    assert dict(info.value.trailers)["retry-after-ms"] == "1"  # (at least 1 ms: it failed once where 1.2 ms passed)
    now[0] += 7_400_000
    with pytest.raises(Aborted) as info:
        claims.claim("acme", "k", "hash-1", deadline_ns=None)
    assert dict(info.value.trailers)["retry-after-ms"] == "8"
    with pytest.raises(FailedPrecondition, match="different request"):
        claims.claim("acme", "k", "hash-2", deadline_ns=None)
    other_tenant = claims.claim("globex", "k", "hash-2", deadline_ns=None)  # keys are per tenant
    claims.release(held)
    again = claims.claim("acme", "k", "hash-1", deadline_ns=None)
    claims.release(held)  # a stale release (already released once) must not free the new holder's claim
    with pytest.raises(Aborted):
        claims.claim("acme", "k", "hash-1", deadline_ns=None)
    claims.release(again)
    claims.release(other_tenant)
    assert len(claims) == 0


def test_a_claim_never_released_is_taken_over_long_after_its_deadline(caplog):
    now = [10**12]
    claims = KeyClaims(clock=lambda: now[0])
    claims.claim("acme", "k", "h", deadline_ns=now[0] + 10**9)
    now[0] += 10**9 + STALE_AFTER_DEADLINE_NS - 1
    with pytest.raises(Aborted):
        claims.claim("acme", "k", "h", deadline_ns=None)
    now[0] += 2
    taken = claims.claim("acme", "k", "h", deadline_ns=None)
    assert "was never released" in caplog.text and "bug" in caplog.text
    claims.release(taken)
    assert len(claims) == 0


def test_a_claim_with_a_wait_gets_the_key_once_its_holder_releases_it_or_is_refused_after_the_wait():
    """A task's attempt waits for its key's claim (a Decide about to be refused for the task's key holds it
    briefly: a race audit found attempts failed for good on such a claim)."""
    import threading

    claims = KeyClaims()
    held = claims.claim("acme", "k", "hash-decide", deadline_ns=None)
    got = []
    waiter = threading.Thread(target=lambda: got.append(claims.claim("acme", "k", "hash-task", None, wait_ns=30 * 10**9)))
    waiter.start()
    waiter.join(timeout=0.2)  # (still waiting: the key is held)
    assert waiter.is_alive() and not got
    claims.release(held)
    waiter.join(timeout=30)
    assert got and got[0].request_hash == "hash-task"
    with pytest.raises(FailedPrecondition, match="different request"):  # a wait that ends with the key still held
        claims.claim("acme", "k", "hash-decide", deadline_ns=None, wait_ns=10**6)
    claims.release(got[0])
    assert len(claims) == 0
