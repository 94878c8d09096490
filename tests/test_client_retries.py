"""What ``DecisionClient.decide(retries=N)`` sends again, against a real kernel (README "Retrying").

Found by a client audit (2026-11-27): an UNAVAILABLE that carries ``aios-audit-sequence`` (the decision was
recorded, its review could not be stored) was sent again like any UNAVAILABLE; nothing is kept under the key
for it, so every retry decided again. ``retries=-1`` ended in ``AssertionError: unreachable``.
"""

from __future__ import annotations

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import DecisionClient
from kernel.pipelines import group_finish
from test_decision_isolation import FailingReviews

server, channel = module_claims_kernel("client_retries")
LARGE = dict(data.generate_cases(1, seed=40)[0], claim_amount=75000.0)  # R04: a person decides


def _decisions_for(server, request_id: str) -> int:
    return sum(r.request_id == request_id for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION))


def test_a_recorded_decision_whose_review_failed_is_not_sent_again(server, monkeypatch):
    engine = server.decisions.engine
    monkeypatch.setattr(group_finish, "MAX_REVIEW_BACKLOG", 0)  # reviews stored before answers, as after an outage
    monkeypatch.setattr(engine.services, "reviews", FailingReviews(engine.services.reviews))  # the injected fault
    fields = {name: LARGE[name] for name in claim_request(LARGE).fields}
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        for key in ("", "recorded-once"):
            request_id = f"esc-{key or 'unkeyed'}"
            with pytest.raises(grpc.RpcError) as refused:
                client.decide("claims_triage", fields, tenant="acme", request_id=request_id, idempotency_key=key,
                              retries=5, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert dict(refused.value.trailing_metadata())["aios-audit-sequence"]
            assert _decisions_for(server, request_id) == 1  # decided once: no retry decided it again


def test_retries_must_be_a_count(server):
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(ValueError, match="retries must be an integer >= 0, got -1"):
            client.decide("claims_triage", {}, retries=-1)
