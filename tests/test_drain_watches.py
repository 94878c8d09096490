"""Open watches end at the start of the drain (SIGTERM), so they do not hold the kernel for its grace period.

A watch has no end of its own: a client that watches the review queue, a
waiting task or the audit log's tail would otherwise keep the drain waiting
the whole grace period (10 s by default) and then be cut off with gRPC's
"Cancelling all calls". Here a real kernel process is stopped with such
watches open; each must get UNAVAILABLE saying the kernel is shutting down,
and the process must exit well inside the grace period.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from claims_support import build_small_model, claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.config import Settings
from kernel.testing.processes import ServeProcess

PROMPT_S = 5.0  # the drain with only watches open must end well inside the default grace period


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_small_model(tmp_path_factory.mktemp("claims_models"))


def _waiting_case() -> dict:
    small = dict(data.generate_cases(1, seed=99)[0], claim_amount=800.0, customer_tier="bronze", fraud_score=0.05,
                 prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    return dict(small, claim_amount=90000.0)  # R04: a human decides, so the task waits for its review


def _drain(call) -> tuple[grpc.StatusCode, str]:
    """Read a stream to its end; its status (OK if it ended without an error)."""
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_sigterm_ends_open_watches_at_once(models, tmp_path, front_end):
    assert Settings().grace_seconds >= 2 * PROMPT_S  # else a drain that waits the grace period would pass too
    env = {**os.environ, "AIOS_AUDIT_STREAM_ENABLED": "true"}
    server = ServeProcess(models, "--pipelines", str(copy_pipelines(tmp_path / "pipelines")), "--front-end", front_end,
                          "--log-level", "WARNING", env=env)
    try:
        with grpc.insecure_channel(server.address) as channel:
            tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            audit = kgrpc.AuditServiceStub(channel)
            task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(_waiting_case())), timeout=10)
            watches = {
                "WatchTask": tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=60),
                "WatchReviews": reviews.WatchReviews(kpb.WatchReviewsRequest(include_open=True, updates=True),
                                                     timeout=60),
                "StreamAudit": audit.StreamAudit(kpb.StreamAuditRequest(follow=True), timeout=60),
                "Health.Watch": health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                          timeout=60),
            }
            # Each watch answers before the signal, so each is open on the server when it comes.
            for update in watches["WatchTask"]:
                if update.state == kpb.WAITING_FOR_REVIEW:
                    break
                assert update.state in (kpb.QUEUED, kpb.RUNNING), update
            assert next(watches["WatchReviews"]).task_id == task.task_id
            assert next(watches["StreamAudit"]).sequence == 0
            assert next(watches["Health.Watch"]).status == health_pb2.HealthCheckResponse.SERVING

            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            ended = {name: _drain(call) for name, call in watches.items()}
            watchers_told_s = time.monotonic() - signalled
            code, err = server.stop(timeout=60)
            exited_s = time.monotonic() - signalled
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code == 0, err
    for name, (status, details) in ended.items():
        assert status == grpc.StatusCode.UNAVAILABLE, (name, status, details)
        assert "shutting down" in details and "watch again" in details, (name, details)
    assert watchers_told_s < PROMPT_S, f"the watches ended {watchers_told_s:.1f} s after SIGTERM"
    assert exited_s < PROMPT_S, f"the kernel exited {exited_s:.1f} s after SIGTERM (grace period 10 s)"
