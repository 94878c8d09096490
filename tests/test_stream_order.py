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
from lane_support import SLOW_ROWS, request_for, slow_and_tiny_repo, until


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


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_an_answer_held_for_its_turn_past_its_deadline_is_deadline_exceeded(repo, front_end, monkeypatch):
    """The second request finishes in time, but its answer waits for the first one's (request order) until
    after its deadline: it is DEADLINE_EXCEEDED, as a unary call's answer ready after its deadline is, not sent
    as a success its caller gave up on (a scheduler stress test got answers up to 335 ms late)."""
    import threading

    import grpc

    from kernel.models.runtime import OnnxModel

    server = start_kernel(repo, front_end, lane_slots=2)
    release = threading.Event()
    run = OnnxModel.run

    def held_run(self, feeds, options=None):  # the injected fault: `slow`'s batch runs only once released
        if self.config.name == "slow":
            release.wait(30)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", held_run)
    tiny = server.hub.get("tiny").stats
    try:
        first = request_for("slow", np.ones((1, 64), np.float32))
        second = request_for("tiny", np.full((2, 16), 0.5, np.float32), timeout=200_000)  # 200 ms
        first.id, second.id = "first", "second"
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            executed = tiny.execution_count
            answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([first, second]), timeout=60)
            until(lambda: tiny.execution_count > executed, "the second request to run")
            threading.Event().wait(0.3)  # its deadline passes while its answer waits for the first one's
            release.set()
            first_answer, second_answer = list(answers)
    finally:
        release.set()
        server.stop(grace=1)
    assert first_answer.infer_response.id == "first" and first_answer.error_message == ""
    assert second_answer.infer_response.id == "second"
    assert second_answer.error_message.startswith("DEADLINE_EXCEEDED: the answer was ready"), second_answer.error_message
    assert not second_answer.infer_response.raw_output_contents
    assert tiny.finished_late == 1
