"""Open watches are capped by ``max_watches``, well below ``workers`` (kernel/api/watch_budget.py).

On the threaded front end each open WatchReviews, WatchTask or StreamAudit
(follow) holds a handler thread, and gRPC refuses every call beyond
``workers`` in progress: with ``workers`` watches open, Decide, ModelInfer and
even a health Check were refused with "Concurrent RPC limit exceeded!". Here a
real kernel with 6 handler threads and ``max_watches`` 3 is asked for 6
watches: 3 open, the rest are refused at once with RESOURCE_EXHAUSTED naming
the setting, and every other call still answers. Health watches hold no thread
and are not counted.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from claims_support import claim_request, copy_pipelines
from conftest import start_kernel
from examples.claims import data, features
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.api.watch_budget import WatchBudget
from kernel.config import Settings, SettingsError, load_settings
from kernel.errors import ResourceExhausted
from lane_support import request_for

WORKERS = 6
MAX_WATCHES = 3
TIMEOUT_S = 30


@pytest.fixture(scope="module", params=["sync", "aio"])
def watched(request, claims_models, tmp_path_factory):
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    server = start_kernel(claims_models, request.param, pipelines=str(pipelines), pipeline_poll_s=0,
                          data_dir=str(tmp_path_factory.mktemp("data")), audit_stream_enabled=True,
                          workers=WORKERS, max_watches=MAX_WATCHES)
    yield server
    server.stop(grace=1)


def _waiting_case() -> dict:
    case = dict(data.generate_cases(1, seed=99)[0], claim_amount=800.0, customer_tier="bronze", fraud_score=0.05,
                prior_claims=0, policy_age_months=40, has_police_report=True, claim_type="auto", days_since_incident=3)
    return dict(case, claim_amount=90000.0)  # R04: a human decides, so the task waits for its review


def _until(condition, seconds: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    return info.value


def test_watches_beyond_max_watches_are_refused_and_every_other_call_still_answers(watched):
    with grpc.insecure_channel(f"127.0.0.1:{watched.port}") as channel:
        tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
        audit, health = kgrpc.AuditServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(_waiting_case())), timeout=TIMEOUT_S)
        _until(lambda: tasks.GetTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S).state
               == kpb.WAITING_FOR_REVIEW)

        def watch_task():
            return tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S)

        def watch_reviews():
            return reviews.WatchReviews(kpb.WatchReviewsRequest(include_open=True), timeout=TIMEOUT_S)

        def follow_audit():
            return audit.StreamAudit(kpb.StreamAuditRequest(follow=True), timeout=TIMEOUT_S)

        # Health watches first, more of them than max_watches: they hold no thread and are not counted.
        health_watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
                          for _ in range(MAX_WATCHES + 1)]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in health_watches)

        held = [watch_task(), watch_reviews(), follow_audit()]
        assert next(held[0]).task_id == task.task_id  # each has answered: open on the server
        assert next(held[1]).task_id == task.task_id
        assert next(held[2]).sequence == 0
        assert watched._watches.open == MAX_WATCHES

        # As many again as workers allows: without the cap these would take every handler thread.
        for make in (watch_reviews, watch_task, follow_audit)[:WORKERS - MAX_WATCHES]:
            refused = _refusal(make())
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
            assert f"{MAX_WATCHES} watches are open" in refused.details(), refused.details()
            assert "max_watches" in refused.details(), refused.details()
            assert dict(refused.trailing_metadata())["retry-after-ms"] == "1000"
        assert watched._watches.open == MAX_WATCHES

        # Everything else still answers while the watches stay open.
        decision = kgrpc.DecisionServiceStub(channel).Decide(claim_request(data.generate_cases(1, seed=7)[0]),
                                                             timeout=TIMEOUT_S)
        assert decision.action and not decision.error_code
        inferred = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request_for("claims_triage", np.zeros((1, features.width()), np.float32), input_name="features"),
            timeout=TIMEOUT_S)
        assert inferred.outputs[0].name == "probabilities"
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S).status \
            == health_pb2.HealthCheckResponse.SERVING
        readback = audit.StreamAudit(kpb.StreamAuditRequest(), timeout=TIMEOUT_S)  # no follow: not a watch
        assert next(readback).sequence == 0
        readback.cancel()

        # A watch that ends gives its place back.
        held.pop().cancel()
        _until(lambda: watched._watches.open == MAX_WATCHES - 1)
        again = follow_audit()
        assert next(again).sequence == 0
        for call in (*held, again, *health_watches):
            call.cancel()
        _until(lambda: watched._watches.open == 0)


def test_the_budget_counts_what_it_holds_and_names_the_setting():
    budget = WatchBudget(2)
    first, second = budget.hold("WatchReviews"), budget.hold("WatchTask")
    with pytest.raises(ResourceExhausted) as refused:
        budget.hold("StreamAudit")
    assert "2 watches are open" in refused.value.message and "max_watches" in refused.value.message
    assert dict(refused.value.trailers)["retry-after-ms"] == "1000" and budget.refused == 1
    with first:
        pass
    first.release()  # given back once only
    assert budget.open == 1
    with budget.hold("StreamAudit"):
        assert budget.open == 2
    second.release()
    assert budget.open == 0


def test_max_watches_defaults_to_a_quarter_of_workers_and_must_stay_below_it():
    assert Settings().watch_limit == 128
    assert load_settings(None, {"workers": 40}, environ={}).watch_limit == 10
    assert load_settings(None, {"workers": 40, "max_watches": 39}, environ={}).watch_limit == 39
    with pytest.raises(SettingsError, match=r"max_watches \(from --max-watches\) must be below workers \(40\)"):
        load_settings(None, {"workers": 40, "max_watches": 40}, environ={})
    with pytest.raises(SettingsError, match=r"max_watches \(from \$AIOS_MAX_WATCHES\) must be >= 0"):
        load_settings(None, environ={"AIOS_MAX_WATCHES": "-1"})
