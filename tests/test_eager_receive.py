"""The threaded front end hands a unary call to a handler thread only once its request is in
(kernel/api/eager_receive.py), and answers exactly as grpc's standard path does otherwise."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from lane_support import until
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.api.eager_receive import EagerReceive

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", id="held")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return request


@pytest.fixture(params=[True, False], ids=["eager", "standard"])
def sync_kernel(request, model_repo):
    server = start_kernel(model_repo, "sync", eager_receive=request.param)
    yield server, request.param
    server.stop(grace=1)


def _held_call(server, release: threading.Event, messages: int = 1):
    """A ModelInfer whose request bytes the client holds back until ``release`` is set."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.stream_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)

    def requests():
        release.wait(10)
        for _ in range(messages):
            yield _request()

    return channel, call.future(requests(), timeout=20)


def test_a_call_waiting_for_its_request_holds_no_handler_thread(sync_kernel):
    server, eager = sync_kernel
    release = threading.Event()
    channel, future = _held_call(server, release)
    try:
        if eager:
            until(lambda: server._eager.calls >= 1, "the call to reach the kernel")
            assert server._pool.in_progress() == 0  # the call is in, its bytes are not: no thread taken
            assert server._budget._in_progress() == 1  # yet it counts as in progress, as gRPC's limit counts it
        else:  # grpc's standard path: a thread per call from its start, waiting for the bytes
            assert server._eager is None
            until(lambda: server._pool.in_progress() == 1, "a handler thread to take the call")
        release.set()
        response = future.result()
        assert response.id == "held" and response.outputs[0].shape == [1, 4]
        until(lambda: server._budget._in_progress() == 0, "the call to be counted out")
    finally:
        release.set()
        channel.close()


def test_a_unary_call_without_a_request_is_refused_as_grpc_refuses_it(sync_kernel):
    server, _ = sync_kernel
    release = threading.Event()
    release.set()
    channel, future = _held_call(server, release, messages=0)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            future.result()
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "requires exactly one request message" in raised.value.details()
        until(lambda: server._pool.in_progress() == 0, "the call to end")
    finally:
        channel.close()


def test_a_call_whose_deadline_passes_before_its_request_is_counted_as_deadline_exceeded(model_repo):
    """gRPC ends a call whose deadline passes while it waits for its request, and the client is told
    DEADLINE_EXCEEDED; the kernel counted it in aios_calls_failed_total as UNIMPLEMENTED ("requires exactly one
    request message"), as if the client had sent none."""
    server = start_kernel(model_repo, "sync")
    release = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        call = channel.stream_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)

        def requests():  # (never sent before the call's deadline)
            release.wait(30)
            yield _request()

        with pytest.raises(grpc.RpcError) as raised:
            call(requests(), timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        failed = until(server.service.refusals.snapshot, "the call to be counted")
        assert failed == {("GRPCInferenceService.ModelInfer", "DEADLINE_EXCEEDED"): 1}
        until(lambda: server._budget._in_progress() == 0 and server._eager.waiting == 0, "the call to be counted out")
    finally:
        release.set()
        channel.close()
        server.stop(grace=1)


def test_bytes_that_are_not_a_request_get_invalid_argument_on_both_paths(sync_kernel):
    server, _ = sync_kernel
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        call = channel.unary_unary(INFER, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\xff\xff\xff", timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def test_every_unary_kernel_rpc_takes_the_eager_path(model_repo):
    server = start_kernel(model_repo, "sync")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        before = server._eager.calls
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=10)
        kgrpc.AdminServiceStub(channel).ListModels(kpb.ListModelsRequest(), timeout=10)
        assert server._eager.calls == before + 2
    finally:
        channel.close()
        server.stop(grace=1)


class RecordingPool:
    """Stands in for the HandlerPool to see which path a call took (no threads)."""

    def __init__(self):
        self.submitted = []

    def submit(self, *args, **kwargs):
        self.submitted.append((args, kwargs))
        return "future"


def test_a_call_shape_grpc_did_not_hand_over_before_takes_the_standard_path():
    pool = RecordingPool()
    eager = EagerReceive(pool)
    assert eager.submit(print, "only", "two") == "future"  # not grpc's unary-unary call: passed on as it came
    assert pool.submitted == [((print, "only", "two"), {})] and eager.calls == 0
