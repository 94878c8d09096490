"""Limits at the connection and HTTP/2 level, below the kernel's own: what gRPC core is told to refuse.

docs/operations.md ("Connection and HTTP/2 limits") says what each costs unbounded.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

WORKERS = 4  # a small kernel


@pytest.fixture(scope="module", params=["sync", "aio"])
def small_kernel(request, model_repo):
    server = start_kernel(model_repo, request.param, workers=WORKERS)
    yield server
    server.stop(grace=1)


def big_compressible_request() -> pb.ModelInferRequest:
    """A ModelInfer request of 1 MiB of zeros: gzip makes it ~1 KB."""
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[16384, 16])
    request.raw_input_contents.append(np.zeros((16384, 16), np.float32).tobytes())
    return request


def test_a_compressed_request_is_refused_before_it_is_inflated(small_kernel):
    """``compressed_requests`` is off by default: a gzip request is refused by name (UNIMPLEMENTED), not inflated to
    up to max_message_bytes (a compression bomb); the same call uncompressed is served."""
    with grpc.insecure_channel(f"127.0.0.1:{small_kernel.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(big_compressible_request(), timeout=10, compression=grpc.Compression.Gzip)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value.details()
        assert "'gzip' is disabled" in info.value.details()
        request = big_compressible_request()
        del request.raw_input_contents[:]  # (uncompressed: one row is enough to show the call itself is fine)
        request.inputs[0].shape[:] = [1, 16]
        request.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
        assert stub.ModelInfer(request, timeout=10).raw_output_contents


def test_compressed_requests_on_accepts_gzip(model_repo):
    server = start_kernel(model_repo, "sync", compressed_requests=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = big_compressible_request()
            request.inputs[0].shape[:] = [8, 16]  # (the tiny model's max_batch_size)
            request.raw_input_contents[0] = np.zeros((8, 16), np.float32).tobytes()
            assert stub.ModelInfer(request, timeout=10, compression=grpc.Compression.Gzip).raw_output_contents
    finally:
        server.stop(grace=1)
