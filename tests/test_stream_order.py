"""ModelStreamInfer answers in request order, as Triton does for a model that is not decoupled.

tritonclient's stream callback gets an error without its request id, so a
caller can only match answers to requests by their order. Here the first
request of a stream is a long batch, the second a short one, the third is
refused at once: each finishes before the one ahead of it, and the answers
must still come back first, second, third.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from lane_support import SLOW_ROWS, request_for, slow_and_tiny_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return slow_and_tiny_repo(tmp_path_factory.mktemp("stream_order"))


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_answers_come_back_in_request_order_though_they_finish_in_reverse(repo, front_end):
    server = start_kernel(repo, front_end)
    try:
        import grpc

        slow_x = np.ones((SLOW_ROWS, 64), np.float32)
        tiny_x = np.full((2, 16), 0.5, np.float32)
        requests = [request_for("slow", slow_x), request_for("tiny", tiny_x),
                    request_for("tiny", tiny_x, input_name="NOPE")]
        for index, request in enumerate(requests):
            request.id = f"r{index}"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answers = list(stub.ModelStreamInfer(iter(requests), timeout=120))
    finally:
        server.stop(grace=1)
    assert [answer.infer_response.id for answer in answers] == ["r0", "r1", "r2"]
    assert answers[0].error_message == "" and answers[1].error_message == ""
    assert "unexpected input 'NOPE'" in answers[2].error_message
    tiny = ort.InferenceSession(str(repo / "tiny" / "1" / "model.onnx"))
    got = np.frombuffer(answers[1].infer_response.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_allclose(got, tiny.run(None, {"INPUT0": tiny_x})[0], rtol=1e-5, atol=1e-6)
