"""An idempotency key lives its retention period (24 hours) from its decision, across a kill and a restart.

A start stores again the keys of the keyed decisions recorded past the review mark (a kill may have cut
their entries off: ``restore_answers``). That mark rises only with escalations and clean stops, so after a kill
it may lie days back; each key found there was stored again for a new 24 hours from the restart, though its
own had ended, and a caller reusing the key for a new request was refused FAILED_PRECONDITION ("used before
with a different request").

Real ``aios-kernel serve`` processes on one data directory; the first is killed with SIGKILL. The restart
"two days later" is the one fault injected on purpose: the second kernel's wall clock runs two days ahead
(tests/_wall_clock_offset_kernel.py), since waiting 24 hours is not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from claims_support import build_small_model, claim_request, copy_pipelines
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.testing.processes import ServeProcess

LATER_KERNEL = [sys.executable, str(Path(__file__).resolve().parent / "_wall_clock_offset_kernel.py")]
TWO_DAYS_S = 2 * 86_400
SMALL = {"claim_amount": 800.0, "policy_age_months": 40, "customer_tier": "gold", "claim_type": "auto",
         "prior_claims": 0, "fraud_score": 0.05, "days_since_incident": 3,
         "has_police_report": True}  # R08: decided without a human, so nothing raises the review mark


def test_a_key_whose_lifetime_ended_while_the_kernel_was_down_is_not_stored_again(tmp_path):
    models, pipelines, data_dir = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "p"), tmp_path / "d"
    serve = ("--pipelines", str(pipelines), "--log-level", "WARNING")
    first = ServeProcess(models, *serve, data_dir=data_dir)
    try:
        with grpc.insecure_channel(first.address) as channel:
            decided = kgrpc.DecisionServiceStub(channel).Decide(
                claim_request(SMALL, request_id="a", idempotency_key="order-1"), timeout=30)
    finally:
        first.kill()

    later = ServeProcess(models, *serve, data_dir=data_dir, cli=[*LATER_KERNEL, str(TWO_DAYS_S)])
    try:
        with grpc.insecure_channel(later.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            # The key's 24 hours ended a day ago: a new request may use it, and is decided (and recorded) anew.
            reused = stub.Decide(claim_request(dict(SMALL, claim_amount=900.0), request_id="b",
                                               idempotency_key="order-1"), timeout=30)
    finally:
        code, log = later.stop()
    assert code == 0, log
    assert not reused.replayed and reused.audit_sequence > decided.audit_sequence, reused
    assert "stored the idempotency keys" not in log, log
