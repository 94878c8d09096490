"""A keyed Decide whose audit record outlasts the decision's wait for it keeps its key until the record is durable.

The finisher waits ``audit_timeout_s`` (10 s) for a group's records; a stalled disk can take longer, and the
records are written once it recovers. The group used to fail as a whole with its keys released at once: the
caller got DEADLINE_EXCEEDED "audit record N was not durable" without the ``aios-audit-sequence`` trailer that
says a decision exists, and a retry with the same key decided again — two records for one key (a task audit's
repro) — while an escalated case had no review until the next restart reopened it.

A real kernel serving the claims pipeline over gRPC; the fault is injected on purpose: the writer's group commit
stalls until the test lets the disk go on.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from claims_support import UNSURE_CASE, claim_request
from conftest import start_claims_kernel
from lane_support import until
from test_task_retries import automated_claim
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

TIMEOUT_S = 30


@pytest.fixture
def stalled_kernel(claims_models, tmp_path, monkeypatch):
    """A claims kernel whose audit disk stalls (the injected fault) until ``release`` is set; the decision's wait
    for its records is 0.2 s instead of 10."""
    kernel = start_claims_kernel(claims_models, tmp_path)
    audit = kernel.decisions.audit
    release = threading.Event()
    real_commit = audit._commit_group

    def stalled_disk():
        release.wait(TIMEOUT_S)
        real_commit()

    monkeypatch.setattr(kernel.decisions.engine.services, "audit_timeout_s", 0.2)
    monkeypatch.setattr(audit, "_write_here", lambda: False)  # (the writer thread writes every group)
    monkeypatch.setattr(audit, "_commit_group", stalled_disk)
    try:
        yield kernel, release
    finally:
        release.set()
        kernel.stop(grace=1)


def _records_of(kernel, key: str) -> list[int]:
    return [r.sequence for r in kernel.decisions.audit.read(from_sequence=0, kind=kpb.DECISION)
            if r.decision.idempotency_key == key]


def test_a_keyed_decide_whose_record_is_slow_is_decided_once_and_replayed_after(stalled_kernel):
    kernel, release = stalled_kernel
    request = automated_claim("slow-1").request
    request.idempotency_key = "slow-key"
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        decide = kgrpc.DecisionServiceStub(channel).Decide
        with pytest.raises(grpc.RpcError) as first:
            decide(request, timeout=TIMEOUT_S)
        assert first.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, first.value.details()
        sequence = int(dict(first.value.trailing_metadata())["aios-audit-sequence"])  # a decision exists
        assert f"audit record #{sequence} taken" in first.value.details()
        assert "once it is" in first.value.details()
        with pytest.raises(grpc.RpcError) as meanwhile:  # its key is still being decided: not decided again
            decide(request, timeout=TIMEOUT_S)
        assert meanwhile.value.code() == grpc.StatusCode.ABORTED, meanwhile.value.details()
        release.set()
        again = settled_replay(decide, request)
    assert again.replayed and again.audit_sequence == sequence
    assert _records_of(kernel, "slow-key") == [sequence]


def settled_replay(decide, request) -> kpb.Decision:
    """The decision a retry gets once the key's first call is complete (ABORTED until then, as a client retries)."""
    answers = []

    def retried() -> bool:
        try:
            answers.append(decide(request, timeout=TIMEOUT_S))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            return False
        return True

    until(retried, "the key's first decision completed", timeout_s=TIMEOUT_S)
    return answers[-1]


def test_an_escalation_whose_record_is_slow_gets_its_review_without_a_restart(stalled_kernel):
    kernel, release = stalled_kernel
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        with pytest.raises(grpc.RpcError) as first:
            kgrpc.DecisionServiceStub(channel).Decide(claim_request(dict(UNSURE_CASE), request_id="slow-review"),
                                                      timeout=TIMEOUT_S)
        assert first.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, first.value.details()
        release.set()
        reviews = kgrpc.ReviewServiceStub(channel)

        def listed():
            return [r.request_id for r in reviews.ListReviews(kpb.ListReviewsRequest(), timeout=TIMEOUT_S).reviews]

        until(lambda: "slow-review" in listed(), "the escalation's review stored", timeout_s=TIMEOUT_S)
