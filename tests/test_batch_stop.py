"""A running batch none of whose requests is wanted any more is stopped (scheduling/stopping.py).

Real kernels on both front ends, real gRPC clients, and `counted`: a model whose run takes as long as its
request asks (a ``Loop`` of ``n`` iterations, a few µs each), so that a batch is running for sure when
its client cancels or its deadline passes, and would run for minutes if nothing stopped it. Run with
``AIOS_PURE_PYTHON=1`` too (the reference scheduler).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import free_port, start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models
from lane_support import until
from test_metrics_endpoint import scrape, value

FOREVER = 100_000_000  # iterations: minutes of one core, unless the batch is stopped
BASE = 300  # iterations every run makes: a batch of ~1 ms, answered later (kernel/api/frontends.py), never inline

TOML = """max_batch_size = 8
provider = "cpu"
{extra}
[[input]]
name = "x"
datatype = "FP32"
dims = [1]
[[input]]
name = "n"
datatype = "INT64"
dims = [1]
[[output]]
name = "y"
datatype = "FP32"
dims = [1]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_stop")
    for name, extra in (("counted", ""),
                        # Two requests form one batch the moment both are queued (and not before, within 10 s).
                        ("paired", "max_queue_delay_us = 10000000\npreferred_batch_sizes = [2]")):
        folder = root / name / "1"
        onnx_models.save(onnx_models.counted(BASE), folder / "model.onnx")
        (folder / "model.toml").write_text(TOML.format(extra=extra))
    return root


@pytest.fixture(scope="module", params=["sync", "aio"])
def server(request, repo):
    server = start_kernel(repo, request.param, metrics_port=free_port())
    yield server
    server.stop(grace=1)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str, x: float, n: int, **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.array([[x]], np.float32).tobytes())
    request.inputs.add(name="n", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([[n]], np.int64).tobytes())
    for key, number in params.items():
        request.parameters[key].int64_param = number
    return request


def _y(response) -> float:
    return float(np.frombuffer(response.raw_output_contents[0], np.float32)[0])


def _running(server, model) -> None:
    until(lambda: server.lanes.load(model)[1] == 1, "the batch to run")


def _idle(server, model) -> None:
    until(lambda: server.lanes.load(model) == (0, 0), "the batch to end")


def _scraped(server) -> tuple[float, float, float, float]:
    """`counted`'s stopped batches, cancelled and expired-while-running requests, and failures not in any
    reason's count (0: every failure has its reason) from /metrics."""
    got, labels = scrape(server.metrics_port), {"model": "counted", "version": "1"}
    reasons = sum(v for (name, lbl), v in got["samples"].items()
                  if name in ("aios_model_rejected_total", "aios_model_expired_total", "aios_model_errors_total",
                              "aios_model_cancelled_total") and labels.items() <= dict(lbl).items())
    return (value(got, "aios_model_stopped_batches_total", **labels), value(got, "aios_model_cancelled_total", **labels),
            value(got, "aios_model_expired_total", **labels, where="batch_stopped"),
            value(got, "aios_model_requests_total", **labels, result="failure") - reasons)


def test_a_batch_whose_only_client_cancels_is_stopped_and_the_session_serves_the_next(server, stub):
    mv = server.hub.get("counted")
    stats = mv.stats
    before = (stats.stopped_batches, stats.stopped_cancelled, stats.execution_count, stats.model_errors)
    scraped = _scraped(server)
    call = stub.ModelInfer.future(_request("counted", 1.5, FOREVER), timeout=300)
    _running(server, mv)
    call.cancel()
    until(lambda: stats.stopped_batches == before[0] + 1, "the batch to be stopped")
    _idle(server, mv)
    # Counted as a stopped batch of a cancelled request: no model call finished, no model fault.
    assert (stats.stopped_batches, stats.stopped_cancelled, stats.execution_count, stats.model_errors) == (
        before[0] + 1, before[1] + 1, before[2], before[3])
    assert _scraped(server) == (scraped[0] + 1, scraped[1] + 1, scraped[2], 0)
    # The same session (the model's only instance) runs the next request as usual.
    assert len(mv.runtime._free) == 1
    assert _y(stub.ModelInfer(_request("counted", 2.5, 10), timeout=60)) == 2.5
    assert stats.execution_count == before[2] + 1


def test_a_batch_whose_deadline_passes_while_it_runs_is_stopped_and_answered_deadline_exceeded(server, stub):
    mv = server.hub.get("counted")
    stats = mv.stats
    before = (stats.stopped_batches, stats.stopped_expired, stats.finished_late, stats.model_errors,
              stats.execution_count)
    scraped = _scraped(server)
    # The request's own timeout (µs), far inside the call's: the answer is the kernel's, not the client's.
    with pytest.raises(grpc.RpcError) as stopped:
        stub.ModelInfer(_request("counted", 1.5, FOREVER, timeout=1_000_000), timeout=300)
    assert stopped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, stopped.value.details()
    assert "batch it ran in was stopped" in stopped.value.details()
    _idle(server, mv)
    assert (stats.stopped_batches, stats.stopped_expired, stats.finished_late, stats.model_errors,
            stats.execution_count) == (before[0] + 1, before[1] + 1, before[2], before[3], before[4])
    assert _scraped(server) == (scraped[0] + 1, scraped[1], scraped[2] + 1, 0)
    assert _y(stub.ModelInfer(_request("counted", 3.0, 10), timeout=60)) == 3.0


def test_a_batch_with_a_request_still_wanted_runs_to_the_end(server, stub):
    mv = server.hub.get("paired")
    stats = mv.stats
    before = (stats.stopped_batches, stats.execution_count, stats.inference_count)
    live = stub.ModelInfer.future(_request("paired", 4.5, 200_000), timeout=300)
    gone = stub.ModelInfer.future(_request("paired", 7.0, 0), timeout=300)
    _running(server, mv)  # (one batch of the two: preferred_batch_sizes = [2] in a 10 s window)
    gone.cancel()
    assert _y(live.result()) == 4.5
    _idle(server, mv)
    # Not stopped: one model call of both rows (the cancelled one's answer goes to nobody).
    assert (stats.stopped_batches, stats.execution_count, stats.inference_count) == (
        before[0], before[1] + 1, before[2] + 2)
