"""Loads and unloads of one model run one after the other, as Triton runs them (a lifecycle audit).

Two at once used to publish in the order they ended: a reload that read the files first but took longer (a model
slower to profile) replaced what a later reload had loaded from the files as they are now, so the stale model
served after both answered OK; an unload answered OK while a load ran was undone when that load ended. A real
kernel on a free port, real gRPC calls; the model's answers are checked against onnxruntime on the files.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models


def scale(factor: float) -> onnx.ModelProto:
    """X [batch, 4] -> Y = factor * X."""
    graph = helper.make_graph([helper.make_node("Mul", ["X", "K"], ["Y"])], "scale",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[numpy_helper.from_array(np.array(factor, np.float32), "K")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    return model


def put(repo: Path, model: onnx.ModelProto) -> Path:
    path = repo / "m" / "1" / "model.onnx"
    onnx_models.save(model, path.with_name("model.onnx.tmp"))
    path.with_name("model.onnx.tmp").replace(path)
    (repo / "m" / "1" / "model.toml").write_text(
        'max_batch_size = 8\nprovider = "cpu"\n[[input]]\nname = "X"\ndatatype = "FP32"\ndims = [4]\n'
        '[[output]]\nname = "Y"\ndatatype = "FP32"\ndims = [4]\n')
    return path


@pytest.fixture
def kernel(tmp_path):
    put(tmp_path, scale(3.0))
    server = start_kernel(tmp_path)
    yield server, tmp_path
    server.stop(grace=1)


def infer(stub, x: np.ndarray) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    answer = stub.ModelInfer(request, timeout=30)
    return np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(x.shape)


class HeldLoad:
    """A RepositoryModelLoad of ``m`` held once it has read the files and made its sessions (by a preparer of
    the hub's, which runs just before a load publishes), until ``release``. Later loads pass."""

    def __init__(self, server, stub):
        self.server, self.read, self.go, self.calls = server, threading.Event(), threading.Event(), 0
        server.hub.add_preparer(self._prepare)
        self.future = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
        assert self.read.wait(60), "the held load never reached its preparers"

    def _prepare(self, fresh) -> None:
        self.calls += 1
        if self.calls == 1:
            self.read.set()
            self.go.wait(60)

    def release_once(self, other) -> None:
        """Let the held load go on once ``other`` (a call's future) has ended, or waits for it in the hub."""
        deadline = time.monotonic() + 60
        try:
            while not other.done() and getattr(self.server.hub, "_changing", {}).get("m", [None, 0])[1] < 2:
                assert time.monotonic() < deadline, "the second call neither ended nor waited for the first"
                time.sleep(0.001)
        finally:
            self.go.set()
        self.future.result()


def test_a_reload_issued_while_another_runs_serves_the_files_as_they_are_after_it(kernel):
    server, repo = kernel
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        put(repo, scale(2.0))  # the operator's mistake, being loaded (held after reading the files)...
        held = HeldLoad(server, stub)
        path = put(repo, scale(5.0))  # ...and fixed: the files now hold Y = 5 X, and a load is asked for
        second = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
        held.release_once(second)
        second.result()
        expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
        np.testing.assert_allclose(expected, 5 * x)
        np.testing.assert_allclose(infer(stub, x), expected)  # (was 2 X: the first load's file, published last)


def test_an_unload_while_a_load_runs_is_not_undone_when_the_load_ends(kernel):
    server, repo = kernel
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        put(repo, scale(2.0))
        held = HeldLoad(server, stub)
        unload = stub.RepositoryModelUnload.future(pb.RepositoryModelUnloadRequest(model_name="m"), timeout=120)
        held.release_once(unload)
        unload.result()
        assert not stub.ModelReady(pb.ModelReadyRequest(name="m")).ready  # (was ready: the load published after)
        with pytest.raises(grpc.RpcError) as info:
            infer(stub, np.ones((1, 4), np.float32))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.hub._changing == {}  # no lock left behind for the name


def test_a_load_is_answered_for_the_versions_it_loaded_not_for_a_later_loads(kernel):
    """RepositoryModelLoad read which version folders were not served after its load had let go of the model, so
    it answered with what a load issued after it found: an OK load of version 1 was refused INVALID_ARGUMENT
    'version 2 was not loaded' by a later load's version 2 with no model.onnx (a review of the serialized loads).
    The one injection, named so: the first load, once done, is held before it answers until the second ended."""
    server, repo = kernel
    second_ended, first_done = threading.Event(), threading.Event()
    real = server.hub.load

    def held(name, *args, **kwargs):
        loaded = real(name, *args, **kwargs)
        if not first_done.is_set():  # the first load, done: the second one runs now
            first_done.set()
            second_ended.wait(60)
        return loaded

    server.hub.load = held
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
        assert first_done.wait(60), "the first load never ended"
        (repo / "m" / "2").mkdir()  # an operator's next deployment, with no model.onnx yet
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version 2" in info.value.details()
        second_ended.set()
        first.result()  # (was INVALID_ARGUMENT: "model 'm' version 2 was not loaded")


def test_a_failed_load_is_answered_for_the_versions_it_left_serving_not_for_a_later_change(kernel):
    """A load that failed answered with the versions serving when its answer was written, read after the model's
    lock was let go: an unload (or load) of the model that ran in between was described as this load's outcome
    ('it is not served' for a reload that left version 1 serving; a race review). The one injection, named so: the
    failed load, once it let go of the model, is held before it answers while an unload of the model runs."""
    server, repo = kernel
    real = server.hub.load

    def unload_in_between(name, *args, **kwargs):  # the named hold point
        try:
            return real(name, *args, **kwargs)
        except Exception:
            server.hub.unload(name)  # another caller's RepositoryModelUnload, right after the failed load
            raise

    (repo / "m" / "1" / "model.onnx").write_bytes(b"not an onnx model")  # the reload fails; version 1 serves on
    server.hub.load = unload_in_between
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the versions loaded before keep serving (1)" in info.value.details(), info.value.details()
