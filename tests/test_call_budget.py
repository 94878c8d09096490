"""The threaded front end keeps its last handler threads for priority-1 calls (kernel/api/call_budget.py).

A kernel with 16 handler threads (gRPC refuses a 17th call in progress
outright) keeps 2 for priority 1: with 14 calls in progress, a lower-priority
call is refused with RESOURCE_EXHAUSTED and a retry hint, and a priority-1
call still gets in.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from kernel.api.call_budget import CallBudget
from kernel.errors import ResourceExhausted
from kernel.testing import onnx_models
from test_scheduling_grpc import SLOW_ROWS, request_for

from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc


def test_budget_keeps_the_reserve_for_priority_one():
    in_progress = [0]
    budget = CallBudget(8, lambda: in_progress[0], reserve=2)
    for in_progress[0] in range(1, 7):
        budget.admit(2)
    in_progress[0] = 7
    with pytest.raises(ResourceExhausted) as refused:
        budget.admit(3)
    assert dict(refused.value.trailers)["retry-after-ms"] == "20" and budget.refused == 1
    in_progress[0] = 8
    budget.admit(1)  # the most urgent level may use every thread


def test_open_streams_are_capped_and_their_slots_come_back():
    budget = CallBudget(16, lambda: 1, max_streams=2)
    budget.admit_stream()
    budget.admit_stream()
    with pytest.raises(ResourceExhausted) as refused:
        budget.admit_stream()
    assert "2 streams are open" in refused.value.message and "max_streams" in refused.value.message
    assert dict(refused.value.trailers)["retry-after-ms"] == "1000" and budget.refused == 1
    budget.admit(2)  # an ordinary unary call is not a stream: the cap leaves it its slot
    budget.stream_ended()
    budget.admit_stream()
    assert (budget.streams_open, budget.streams_admitted) == (2, 3)


@pytest.fixture(scope="module")
def small_kernel(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    onnx_models.save_mlp_version(root, "slow", [64, 2048, 2048, 2048, 8], seed=1, max_batch_size=SLOW_ROWS,
                                 provider="cpu")
    onnx_models.save_mlp_version(root, "tiny", [16, 64, 4], seed=2, max_batch_size=8)
    # poller_inline off: the injected fault blocks inside the handler, which a call run on the poller thread
    # must never do (it would stop the poller reading the next calls); here every call holds a handler thread.
    server = start_kernel(root, "sync", lane_slots=1, workers=16, poller_inline=False)
    yield server
    server.stop(grace=5)


class _HeldHandlers:
    """The injected fault: ModelInfer calls for model ``slow`` wait in their handler thread until released."""

    def __init__(self, prepare):
        self._prepare = prepare
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    def as_method(self):
        def prepare(service, request, time_remaining, arrived_ns=None):
            if request.model_name == "slow":
                self.waiting.release()
                assert self.release.wait(60)
            return self._prepare(service, request, time_remaining, arrived_ns)
        return prepare


def test_lower_priority_calls_are_refused_before_they_take_the_last_thread(small_kernel, monkeypatch):
    from kernel.api.inference import InferenceService

    held = _HeldHandlers(InferenceService.prepare)
    monkeypatch.setattr(InferenceService, "prepare", held.as_method())
    with grpc.insecure_channel(f"127.0.0.1:{small_kernel.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # Priority 1, so that none of them is refused itself.
        calls = [stub.ModelInfer.future(request_for("slow", np.ones((1, 64)), priority=1), timeout=60) for _ in range(14)]
        for _ in calls:  # fourteen handler threads busy, deterministically
            assert held.waiting.acquire(timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request_for("tiny", np.ones((1, 16)), priority=2), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert "kept for priority 1" in refused.value.details()
        assert "retry-after-ms" in dict(refused.value.trailing_metadata())
        urgent = stub.ModelInfer(request_for("tiny", np.ones((1, 16)), priority=1), timeout=30)
        assert urgent.raw_output_contents
        held.release.set()
        for call in calls:
            assert call.result().raw_output_contents


def test_decide_calls_share_the_budget(tmp_path, monkeypatch):
    """A Decide holds its handler thread until answered too: with 14 of 16 threads busy a priority-2
    decision is refused with a retry hint, a priority-1 decision is answered."""
    from claims_support import build_small_model, claim_request, copy_pipelines
    from examples.claims import data
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel.api.inference import InferenceService

    models = build_small_model(tmp_path / "models")
    onnx_models.save_mlp_version(models, "slow", [64, 2048, 2048, 2048, 8], seed=1, max_batch_size=SLOW_ROWS,
                                 provider="cpu")
    server = start_kernel(models, "sync", lane_slots=1, workers=16, pipelines=str(copy_pipelines(tmp_path / "p")),
                          pipeline_poll_s=0, poller_inline=False)  # (see small_kernel)
    held = _HeldHandlers(InferenceService.prepare)
    monkeypatch.setattr(InferenceService, "prepare", held.as_method())
    case = data.generate_cases(1, seed=5)[0]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            decisions = kgrpc.DecisionServiceStub(channel)
            calls = [stub.ModelInfer.future(request_for("slow", np.ones((1, 64)), priority=1), timeout=60)
                     for _ in range(14)]
            for _ in calls:
                assert held.waiting.acquire(timeout=30)
            with pytest.raises(grpc.RpcError) as refused:
                decisions.Decide(claim_request(case, request_id="low", priority=2), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "kept for priority 1" in refused.value.details()
            assert "retry-after-ms" in dict(refused.value.trailing_metadata())
            urgent = decisions.Decide(claim_request(case, request_id="urgent", priority=1), timeout=30)
            assert urgent.action and urgent.request_id == "urgent"
            held.release.set()
            for call in calls:
                assert call.result().raw_output_contents
    finally:
        held.release.set()
        server.stop(grace=5)


@pytest.mark.parametrize("answer_later", [True, False], ids=["pumped", "on-handler-threads"])
def test_idle_streams_cannot_take_the_threads_kept_for_priority_one(tmp_path, answer_later):
    """An open stream holds a call slot however long it idles: fourteen of sixteen held by idle DecideStreams,
    another stream (DecideStream or ModelStreamInfer) is refused with a retry hint, and a priority-1 Decide
    still gets in (twenty idle streams used to take every slot, and gRPC then refused everything, hint-less)."""
    from claims_support import build_small_model, claim_request, copy_pipelines
    from examples.claims import data
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from lane_support import until

    models = build_small_model(tmp_path / "models")
    server = start_kernel(models, "sync", workers=16, answer_later=answer_later, max_streams=16,
                          pipelines=str(copy_pipelines(tmp_path / "p")), pipeline_poll_s=0)  # (the reserve refuses)
    idle = threading.Event()

    def nothing_until_released():
        idle.wait(60)
        return
        yield  # (a generator that sends no message, then half-closes)

    case = data.generate_cases(1, seed=5)[0]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            streams = [decisions.DecideStream(nothing_until_released(), timeout=60) for _ in range(14)]
            # Admitted, not only arrived: a stream is admitted on its handler thread, and one still on its
            # way there counts the 15th as it arrives, so both would be refused (call_budget.py).
            until(lambda: server._budget.streams_admitted == 14 and server._calls_in_progress() == 14,
                  "fourteen open streams")
            with pytest.raises(grpc.RpcError) as refused:
                list(decisions.DecideStream(iter([claim_request(case)]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "kept for priority 1" in refused.value.details()
            assert "retry-after-ms" in dict(refused.value.trailing_metadata())
            with pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            urgent = decisions.Decide(claim_request(case, request_id="urgent", priority=1), timeout=30)
            assert urgent.action and urgent.request_id == "urgent"
            idle.set()
            for stream in streams:
                assert list(stream) == []
    finally:
        idle.set()
        server.stop(grace=5)


def _streams_kernel(tmp_path, front_end: str, **settings):
    """(server, a claims case, the event that releases idle streams, a request iterator that sends nothing until
    then): a claims kernel for the stream-cap tests."""
    from claims_support import build_small_model, copy_pipelines
    from examples.claims import data

    server = start_kernel(build_small_model(tmp_path / "models"), front_end,
                          pipelines=str(copy_pipelines(tmp_path / "p")), pipeline_poll_s=0, **settings)
    idle = threading.Event()

    def nothing_until_released():
        idle.wait(60)
        return
        yield

    return server, data.generate_cases(1, seed=5)[0], idle, nothing_until_released


@pytest.mark.parametrize("answer_later", [True, False], ids=["pumped", "on-handler-threads"])
def test_one_client_with_idle_streams_cannot_lock_ordinary_calls_out(tmp_path, answer_later):
    """(An abusive-client audit: 448 idle DecideStreams from one client refused every other caller's ordinary
    Decide until it closed them.) Streams are capped at ``max_streams`` (DecideStream and ModelStreamInfer
    together); one beyond is refused naming the setting, ordinary calls still get in, and a slot comes back
    when a stream ends."""
    from claims_support import claim_request
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from lane_support import until

    server, case, idle, nothing_until_released = _streams_kernel(tmp_path, "sync", workers=16, max_streams=3,
                                                                  answer_later=answer_later)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            inference = pb_grpc.GRPCInferenceServiceStub(channel)
            held = [decisions.DecideStream(nothing_until_released(), timeout=60) for _ in range(2)]
            held.append(inference.ModelStreamInfer(nothing_until_released(), timeout=60))
            until(lambda: server._budget.streams_open == 3, "three open streams")
            for extra in (lambda: list(decisions.DecideStream(iter([claim_request(case)]), timeout=30)),
                          lambda: list(inference.ModelStreamInfer(iter([]), timeout=30))):
                with pytest.raises(grpc.RpcError) as refused:
                    extra()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
                assert "max_streams" in refused.value.details()
                assert dict(refused.value.trailing_metadata())["retry-after-ms"] == "1000"
            ordinary = decisions.Decide(claim_request(case, request_id="ordinary", priority=2), timeout=30)
            assert ordinary.action and ordinary.request_id == "ordinary"
            held[0].cancel()
            until(lambda: server._budget.streams_open == 2, "the cancelled stream's slot to come back")
            (answer,) = list(decisions.DecideStream(iter([claim_request(case, request_id="again")]), timeout=30))
            assert answer.request_id == "again" and not answer.error_code
            until(lambda: server._budget.streams_open == 2, "the finished stream's slot to come back")
    finally:
        idle.set()
        server.stop(grace=5)


def test_aio_decide_streams_are_capped_by_max_streams(tmp_path):
    """(Streams audit) grpc.aio had no stream cap, and each DecideStream there takes two threads: 3,000 idle
    streams made 6,001 server threads, nothing refused."""
    from claims_support import claim_request
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from lane_support import until

    server, case, idle, nothing_until_released = _streams_kernel(tmp_path, "aio", max_streams=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            held = [decisions.DecideStream(nothing_until_released(), timeout=60) for _ in range(2)]
            until(lambda: server._streams.streams_open == 2, "two open streams")
            with pytest.raises(grpc.RpcError) as refused:
                list(decisions.DecideStream(iter([claim_request(case)]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "max_streams" in refused.value.details()
            held[0].cancel()
            until(lambda: server._streams.streams_open == 1, "the cancelled stream's slot to come back")
            (answer,) = list(decisions.DecideStream(iter([claim_request(case, request_id="again")]), timeout=30))
            assert answer.request_id == "again" and not answer.error_code
    finally:
        idle.set()
        server.stop(grace=5)


def test_max_streams_defaults_to_half_of_workers_and_must_not_pass_them():
    from kernel.config import Settings, SettingsError, load_settings

    assert Settings().stream_limit == 256
    assert load_settings(None, {"workers": 40}, environ={}).stream_limit == 20
    assert load_settings(None, {"workers": 40, "max_streams": 40}, environ={}).stream_limit == 40
    with pytest.raises(SettingsError, match=r"max_streams \(from --max-streams\) must be at most workers \(40\)"):
        load_settings(None, {"workers": 40, "max_streams": 41}, environ={})
    with pytest.raises(SettingsError, match=r"max_streams \(from \$AIOS_MAX_STREAMS\) must be >= 0"):
        load_settings(None, environ={"AIOS_MAX_STREAMS": "-1"})
