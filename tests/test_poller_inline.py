"""A call that arrives while no other call is in progress runs on gRPC's poller thread (``poller_inline``,
kernel/api/eager_receive.py): no hand-off to a handler thread. The poller never waits on a model: a batch
predicted to be long, or a lane already busy, goes to the lane's threads and the call is answered later."""

from __future__ import annotations

import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from lane_support import SLOW_ROWS, request_for, slow_and_tiny_repo, until


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return slow_and_tiny_repo(tmp_path_factory.mktemp("poller"))


@pytest.fixture
def kernel(request, repo):
    server = start_kernel(repo, "sync", lane_slots=1, poller_inline=getattr(request, "param", True))
    yield server
    server.stop(grace=2)


def _output(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


def _settled(kernel) -> None:
    until(lambda: kernel._budget._in_progress() == 0, "every call to be counted out")


def _alone(kernel, stub, model: str = "tiny") -> None:
    """Calls one at a time until the kernel sees a lone caller (eager_receive.LONE_IDLE_SHARE), the model's
    batches timed."""
    width = kernel.hub.get(model).config.inputs[0].dims[0]
    for _ in range(16):
        stub.ModelInfer(request_for(model, np.ones((1, width))), timeout=60)
        _settled(kernel)


def test_lone_calls_run_on_the_poller_and_come_back_exactly(kernel, channel, repo):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    session = ort.InferenceSession(str(repo / "tiny" / "1" / "model.onnx"))
    rng = np.random.default_rng(11)
    _alone(kernel, stub)
    eager = kernel._eager
    ran, threads = eager.ran_on_poller, len(kernel._pool._threads)
    for _ in range(10):
        x = rng.normal(size=(int(rng.integers(1, 5)), 16)).astype(np.float32)
        got = _output(stub.ModelInfer(request_for("tiny", x), timeout=10))
        np.testing.assert_allclose(got, session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
        _settled(kernel)  # (the next call then arrives to an idle server)
    assert eager.ran_on_poller - ran == 10
    assert len(kernel._pool._threads) == threads, "a lone call started a handler thread"
    assert eager.outstanding.count == 0 and eager.on_poller == 0


def test_a_long_batch_that_arrives_alone_leaves_the_poller_free(kernel, channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    slow = kernel.hub.get("slow")
    _alone(kernel, stub, "slow")  # timed: its batches are long
    ran = kernel._eager.ran_on_poller
    call = stub.ModelInfer.future(request_for("slow", np.ones((SLOW_ROWS, 64))), timeout=120)
    until(lambda: kernel.lanes.load(slow)[1] == 1 or call.done(), "the slow batch to run")
    assert kernel._eager.ran_on_poller == ran + 1  # it arrived to an idle server: its handler ran on the poller
    # Had the poller run the batch itself, nothing more would be read until it ended.
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert kernel.lanes.load(slow)[1] == 1, "the batch ended before another call was read: it ran on the poller"
    assert _output(call.result()).shape == (SLOW_ROWS, 8)
    _settled(kernel)


def test_a_lone_call_the_lane_cannot_take_now_is_answered_later(kernel, channel, repo):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    session = ort.InferenceSession(str(repo / "tiny" / "1" / "model.onnx"))
    _alone(kernel, stub)
    # A task, a stream or another front end's work can hold the lane with no call in progress here: a
    # ModelInfer stream's batch is what holds it in this test (streams take handler threads, not the poller).
    stream = stub.ModelStreamInfer(iter([request_for("slow", np.ones((SLOW_ROWS, 64)))]), timeout=120)
    slow = kernel.hub.get("slow")
    until(lambda: kernel.lanes.load(slow)[1] == 1, "the stream's slow batch to run")
    x = np.random.default_rng(3).normal(size=(2, 16)).astype(np.float32)
    got = _output(stub.ModelInfer(request_for("tiny", x), timeout=60))
    np.testing.assert_allclose(got, session.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
    assert next(stream).error_message == ""
    stream.cancel()
    _settled(kernel)


def test_a_lone_call_whose_deadline_cannot_be_met_gets_a_clear_status(kernel, channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    _alone(kernel, stub, "slow")
    ran = kernel._eager.ran_on_poller
    with pytest.raises(grpc.RpcError) as info:  # Triton's timeout: 1 µs from arrival
        stub.ModelInfer(request_for("slow", np.ones((SLOW_ROWS, 64)), timeout=1), timeout=30)
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert kernel._eager.ran_on_poller == ran + 1
    _settled(kernel)
    assert not [cell for _, _, cell in list(kernel.service.expiry._heap) if cell[0] is not None]


@pytest.mark.parametrize("kernel", [False], indirect=True)
def test_setting_off_runs_lone_calls_on_handler_threads(kernel, channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    for _ in range(3):
        stub.ModelInfer(request_for("tiny", np.ones((1, 16))), timeout=10)
    assert kernel._eager.ran_on_poller == 0 and kernel._eager.calls >= 3


def test_a_call_that_arrives_right_after_the_last_call_ended_takes_a_handler_thread(kernel, channel, monkeypatch):
    # Under load the next call is already inside grpc when the server is idle for a moment: a stream, not
    # a lone caller; were it run on the poller, the poller would take a stream one by one (no batching).
    # "Right after" is LONE_GAP_NS; stretched here so that sequential calls count as a stream.
    from kernel.api import eager_receive

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    _alone(kernel, stub)
    monkeypatch.setattr(eager_receive, "LONE_GAP_NS", 60 * 10**9)
    kernel._eager.last_done_ns = time.monotonic_ns() - 61 * 10**9  # (as if the last call ended long ago)
    ran = kernel._eager.ran_on_poller
    for _ in range(5):
        assert stub.ModelInfer(request_for("tiny", np.ones((1, 16))), timeout=10).raw_output_contents
        _settled(kernel)
    # At most the first (whether it does is test_lone_calls_run_on_the_poller's: on a loaded machine the previous
    # call's thread may still be winding down as it arrives, and it takes a thread: a fresh clone's flake); the
    # other four came "right after" one and must not.
    assert kernel._eager.ran_on_poller - ran <= 1


def test_after_a_busy_spell_calls_take_handler_threads_until_most_calls_arrive_alone_again(kernel, channel):
    # A moment of idleness in a busy stream is not a lone caller: the share of recent calls that found the
    # server idle must be back above LONE_IDLE_SHARE first.
    from kernel.api import eager_receive

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    _alone(kernel, stub)
    kernel._eager.idle_share = 0.0  # (as after a spell of calls that found others in progress)
    ran = kernel._eager.ran_on_poller
    calls = 0
    while kernel._eager.ran_on_poller == ran and calls < 40:
        stub.ModelInfer(request_for("tiny", np.ones((1, 16))), timeout=10)
        _settled(kernel)
        calls += 1
    # the first call to run there is the one that brings the share (1 - (1 - w)^n) back to the threshold
    expected = next(n for n in range(1, 40)
                    if 1 - (1 - eager_receive.IDLE_SHARE_WEIGHT) ** n >= eager_receive.LONE_IDLE_SHARE)
    assert calls == expected and kernel._eager.ran_on_poller == ran + 1
