"""Tenant boundaries over real gRPC: what a caller naming one tenant can reach of another's.

RBAC is not built yet (docs: road ahead), so ``tenant`` is a caller-chosen label: it scopes idempotency keys
(one key, two tenants: two requests) and queue bounds, and filters lists and watches, but it does not stop a
caller from naming a review or task by id. What it must never do is let a caller reach the kernel's own
records: the idempotency store keeps each review's audited resolution under a tenant of the kernel's own.
"""

from __future__ import annotations

import sqlite3
import time

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel, start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.limits import RESERVED_TENANT_PREFIX
from kernel.store.audit_needs import RESOLUTIONS_TENANT

TIMEOUT_S = 20
LARGE_CLAIM = dict(data.generate_cases(1, seed=11)[0], claim_amount=90000.0)  # R04: always seen by a human
SMALL_CLAIM = dict(data.generate_cases(1, seed=11)[0], claim_amount=50.0)

server, channel = module_claims_kernel("tenants")


def failure(call, message) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(message, timeout=TIMEOUT_S)
    return info.value.code(), info.value.details()


def test_a_caller_cannot_plant_a_review_resolution_under_the_kernels_own_tenant(server, channel):
    """The kernel keeps a review's audited resolution in the idempotency store under tenant
    '__review_resolutions__', key 'review:<id>'. A Decide naming that tenant and key stored its own answer there
    first; the reviewer's resolution then found it, answered it as the resolution and recorded nothing."""
    assert RESOLUTIONS_TENANT.startswith(RESERVED_TENANT_PREFIX)
    decide = kgrpc.DecisionServiceStub(channel).Decide
    escalated = decide(claim_request(LARGE_CLAIM, tenant="victim"), timeout=TIMEOUT_S)
    assert escalated.outcome == kpb.ESCALATED and escalated.review_id
    for key in (f"review:{escalated.review_id}", f"recording:{escalated.review_id}"):
        planted = claim_request(SMALL_CLAIM, tenant="__review_resolutions__", idempotency_key=key)
        code, details = failure(decide, planted)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in details, details
        code, details = failure(kgrpc.TaskServiceStub(channel).StartTask, kpb.StartTaskRequest(request=planted))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "request.tenant" in details, details
    _denied_by_its_reviewer(server, channel, escalated)


def test_an_entry_a_caller_planted_under_the_kernels_tenant_before_the_upgrade_is_dropped_at_start(claims_models,
                                                                                                    tmp_path):
    """A data dir from a kernel that still took tenant '__review_resolutions__' from callers may hold a caller's
    answer under 'review:<id>' for a review still open. Its own entries there have no request hash; one with a
    hash is a caller's: dropped at the start, so the reviewer's resolution is the one recorded. (The planted row
    is written into the stopped kernel's store by hand: the older kernel that took it is not at hand.)"""
    server = start_claims_kernel(claims_models, tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        escalated = kgrpc.DecisionServiceStub(channel).Decide(claim_request(LARGE_CLAIM, tenant="victim"),
                                                              timeout=TIMEOUT_S)
        planted = kgrpc.DecisionServiceStub(channel).Decide(claim_request(SMALL_CLAIM, tenant="mallory"),
                                                            timeout=TIMEOUT_S)
    server.stop(grace=1)
    assert escalated.review_id and planted.action == "approve"
    now = time.time_ns()
    with sqlite3.connect(tmp_path / "data" / "kernel.sqlite3") as store:
        store.execute("INSERT INTO idempotency (tenant, key, request_hash, response, created_unix_ns, expires_unix_ns,"
                      " audit_sequence) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (RESOLUTIONS_TENANT, f"review:{escalated.review_id}", "ab" * 32, planted.SerializeToString(),
                       now, now + 86_400 * 10**9, planted.audit_sequence))
    store.close()
    server = start_claims_kernel(claims_models, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            _denied_by_its_reviewer(server, channel, escalated)
    finally:
        server.stop(grace=1)


def _denied_by_its_reviewer(server, channel, escalated) -> None:
    """Claim and deny ``escalated``'s review: the reviewer's action is the resolution answered and the one recorded."""
    reviews = kgrpc.ReviewServiceStub(channel)
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=escalated.review_id, reviewer="alice"), timeout=TIMEOUT_S)
    done = reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=escalated.review_id, reviewer="alice",
                                                          action="deny"), timeout=TIMEOUT_S)
    assert (done.resolution.action, done.resolution.outcome) == ("deny", kpb.REVIEWED)
    records = [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.REVIEW_RESOLUTION)
               if r.decision.review_id == escalated.review_id]
    assert [r.decision.action for r in records] == ["deny"]
