"""A request-level timeout counts from the call's arrival, not from when a handler thread got to it.

The injected fault (``_SlowHandlerThread``) holds the handler thread before
the kernel reads the request, as a busy thread pool or a contended GIL would.
Counted from arrival, a 150 ms timeout has passed by then: the caller gets
DEADLINE_EXCEEDED and the model never runs. Counted from the handler (the
old behaviour) the same call was answered OK, after its deadline.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from claims_support import claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

HELD_S = 0.3
TIMEOUT_MS = 150


class _SlowHandlerThread:
    """The injected fault: the handler thread is held ``HELD_S`` before it prepares the request."""

    def __init__(self, prepare):
        self._prepare = prepare
        self.arrivals: list[int | None] = []

    def __call__(self, request, deadline_ns, principal="anonymous", arrived_ns=None):
        self.arrivals.append(arrived_ns)
        threading.Event().wait(HELD_S)  # the fault itself, not a wait for a race
        return self._prepare(request, deadline_ns, principal, arrived_ns)


@pytest.fixture
def slow_handlers(claims_kernel):
    engine = claims_kernel.decisions.engine
    fault = _SlowHandlerThread(engine.prepare)
    engine.prepare = fault
    yield fault
    del engine.prepare  # back to the class's method


def test_decide_timeout_counts_from_arrival(claims_kernel, slow_handlers):
    case = data.generate_cases(1, seed=3)[0]
    stats = claims_kernel.hub.get("claims_triage", "").stats
    before = stats.inference_count
    sent = time.monotonic_ns()
    with grpc.insecure_channel(f"127.0.0.1:{claims_kernel.port}") as channel:
        stub = kgrpc.DecisionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Decide(claim_request(case, timeout_ms=TIMEOUT_MS), timeout=10)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failure.value.details()
        assert stats.inference_count == before, "the model ran a request whose timeout had passed"
        # Without a request timeout the same held call is decided.
        assert stub.Decide(claim_request(case), timeout=10).action
    (arrived, _) = slow_handlers.arrivals
    assert arrived is not None and sent <= arrived <= sent + int(HELD_S * 1e9)
    assert stats.inference_count == before + 1


def test_modelinfer_timeout_parameter_counts_from_arrival(kernel, monkeypatch):
    """Triton's ``timeout`` parameter (µs) on ModelInfer, the same way, on both front ends."""
    import numpy as np

    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
    from kernel.api.inference import InferenceService

    real_prepare = InferenceService.prepare
    arrivals: list = []

    def held_prepare(self, request, time_remaining, arrived_ns=None):  # _SlowHandlerThread's twin
        arrivals.append(arrived_ns)
        threading.Event().wait(HELD_S)
        return real_prepare(self, request, time_remaining, arrived_ns)

    monkeypatch.setattr(InferenceService, "prepare", held_prepare)
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    request.parameters["timeout"].int64_param = TIMEOUT_MS * 1000
    before = kernel.hub.get("tiny", "").stats.inference_count
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.ModelInfer(request, timeout=10)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failure.value.details()
        assert kernel.hub.get("tiny", "").stats.inference_count == before
        del request.parameters["timeout"]
        assert stub.ModelInfer(request, timeout=10).raw_output_contents
    assert arrivals[0] is not None
