"""Test equipment for queueing behind a busy lane: the `slow` model, requests, a train of its batches, polling."""

from __future__ import annotations

import time

import numpy as np

from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models

SLOW_ROWS = 512  # one batch of `slow` holds a lane slot for ~0.1-0.3 s of one core: long enough to queue behind


def save_slow_model(root) -> None:
    """`slow` (64 -> 2048 -> 2048 -> 2048 -> 8) into the repository ``root``, on the CPU lane."""
    # provider = "cpu": a GPU would finish it before anything queues behind it (tests/test_gpu.py covers that lane)
    onnx_models.save_mlp_version(root, "slow", [64, 2048, 2048, 2048, 8], seed=1, max_batch_size=SLOW_ROWS,
                                 provider="cpu")


def slow_and_tiny_repo(root):
    """A repository of `slow` (long batches) and `tiny` (short ones), both on the CPU lane."""
    save_slow_model(root)
    onnx_models.save_mlp_version(root, "tiny", [16, 64, 4], seed=3, max_batch_size=8, provider="cpu")
    return root


def request_for(model: str, array: np.ndarray, input_name: str = "INPUT0", **params) -> pb.ModelInferRequest:
    """A ModelInferRequest of ``array`` (FP32) with int64 ``params`` (priority, timeout, ...)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array, np.float32).tobytes())
    for key, value in params.items():
        request.parameters[key].int64_param = value
    return request


def until(predicate, what: str, timeout_s: float = 30.0, every_s: float = 0.002):
    """Poll ``predicate`` until it returns something truthy, and return that; fail naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)
    return found


def occupy(server, channel, batches: int = 4) -> list:
    """Long `slow` batches at priority 1 holding ``server``'s lane (give it ``lane_slots=1``); their call futures."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    calls = [stub.ModelInfer.future(request_for("slow", np.ones((SLOW_ROWS, 64)), priority=1), timeout=120)
             for _ in range(batches)]
    slow = server.hub.get("slow")
    until(lambda: server.lanes.load(slow)[1] == 1 or all(c.done() for c in calls), "a slow batch to run")
    assert not all(c.done() for c in calls), "the slow batches finished before the test could queue behind them"
    return calls


def hold_model_runs(monkeypatch):
    """The injected fault: every model run waits for ``release`` (set it to let them go); ``running`` is set
    once one has begun. Returns (release, running)."""
    import threading

    from kernel.models.runtime import OnnxModel

    release, running = threading.Event(), threading.Event()
    run = OnnxModel.run

    def held_run(self, feeds, options=None):
        running.set()
        release.wait(30)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", held_run)
    return release, running
