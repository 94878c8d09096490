"""Reloading or unloading a model lets the requests it already holds finish, as Triton does.

(They used to fail at once with UNAVAILABLE "was unloaded before the request ran": a reload under
load dropped a quarter of the requests in flight.) A real kernel process, real gRPC calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models
from kernel.testing.processes import ServeProcess

IN_FLIGHT = 40  # more queued work than a reload (load and profile a new session) takes


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload")
    # Tens of milliseconds a 64-row call on one core: the requests queue behind each other.
    onnx_models.save_mlp_version(root, "slow", [64, 2048, 2048, 2048, 8], seed=6, provider="cpu")
    server = ServeProcess(root, data_dir=tmp_path_factory.mktemp("reload-data"))
    yield server
    code, err = server.stop()
    assert code == 0, err


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[64, 64])
    request.raw_input_contents.append(np.ones((64, 64), np.float32).tobytes())
    return request


def _queue_behind_each_other(channel, stub) -> list:
    """IN_FLIGHT calls, returned once the kernel holds all of them (finished, queued or running)."""
    calls = [stub.ModelInfer.future(_request(), timeout=60) for _ in range(IN_FLIGHT)]
    admin = kernel_pb2_grpc.AdminServiceStub(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = admin.ListModels(kernel_pb2.ListModelsRequest()).models
        held = sum(m.queued_requests + m.running_batches for m in models if m.name == "slow")
        if sum(call.done() for call in calls) + held >= IN_FLIGHT:
            break
    return calls


@pytest.mark.parametrize("change", ["reload", "unload"])
def test_requests_queued_for_a_model_finish_when_it_is_reloaded_or_unloaded(kernel, change):
    with grpc.insecure_channel(kernel.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=120)  # loaded, warm
        stub.ModelInfer(_request(), timeout=60)
        calls = _queue_behind_each_other(channel, stub)
        if change == "reload":
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=120)
        else:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="slow"), timeout=60)
        failures = [call.exception().details() for call in calls if call.exception() is not None]
        assert failures == []
        if change == "unload":  # and nothing new reaches it
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_request(), timeout=60)
            assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        else:
            assert stub.ModelInfer(_request(), timeout=60).outputs  # the new session answers


def test_calls_arriving_while_a_model_reloads_are_answered(kernel):
    """A reload makes and profiles the new session, then swaps it in: a call arriving meanwhile gets the
    old version or the new one, never UNAVAILABLE (the new version was published before its lane existed)."""
    import threading

    one_row = pb.ModelInferRequest(model_name="slow")
    one_row.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    one_row.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    stop, failures, answered = threading.Event(), [], [0]
    with grpc.insecure_channel(kernel.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=120)

        def call_on() -> None:
            while not stop.is_set():
                try:
                    stub.ModelInfer(one_row, timeout=60)
                    answered[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        callers = [threading.Thread(target=call_on) for _ in range(4)]
        for caller in callers:
            caller.start()
        try:
            for _ in range(3):
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=120)
        finally:
            stop.set()
            for caller in callers:
                caller.join(timeout=60)
    assert failures == [] and answered[0] > 0


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) // 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_an_unloaded_models_memory_goes_back_to_the_system(tmp_path):
    """(Scheduling audit) reloads and an unload of a 34 MB model with two instances on a quiet server kept
    hundreds of MB the kernel no longer used: the C allocator held the freed sessions' memory until unrelated
    traffic trimmed it. The kernel gives it back once a version is dropped (kernel/memory.py)."""
    repo = tmp_path / "models"
    onnx_models.save_mlp_version(repo, "tiny", [16, 32, 4], seed=1, provider="cpu")
    server = ServeProcess(repo, "--audit-mode", "off", data_dir=tmp_path / "data")
    try:
        before = _rss_mb(server.proc.pid)
        onnx_models.save_mlp_version(repo, "big", [64, 2048, 2048, 2048, 8], seed=2, provider="cpu", instances=2)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):  # a load, then reloads: each drops the version before it
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="big"), timeout=120)
            loaded = _rss_mb(server.proc.pid)
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="big"), timeout=60)
        assert loaded > before + 100  # (the model did take memory: two sessions of 34 MB weights and more)
        deadline = time.monotonic() + 15
        while _rss_mb(server.proc.pid) > before + 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _rss_mb(server.proc.pid) <= before + 60, (before, loaded, _rss_mb(server.proc.pid))
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_a_stop_that_cuts_a_model_load_waits_for_it_instead_of_aborting(tmp_path):
    """(Drain audit) SIGTERM and then SIGINT while a RepositoryModelLoad ran: the hurried stop cut the call, the
    process exited with its handler thread still inside onnxruntime's session creation, and it aborted ("terminate
    called without an active exception", exit 134). The stop now waits for the load, saying so."""
    import signal

    repo = tmp_path / "models"
    onnx_models.save_mlp_version(repo, "tiny", [16, 8, 4], seed=1, provider="cpu")
    server = ServeProcess(repo, "--front-end", "sync", data_dir=tmp_path / "data")
    onnx_models.save_mlp_version(repo, "slow", [64, 2048, 2048, 2048, 8], seed=6, provider="cpu")
    with grpc.insecure_channel(server.address) as channel:
        load = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad.future(
            pb.RepositoryModelLoadRequest(model_name="slow"), timeout=60)
        time.sleep(0.1)  # (the load under way: creating and profiling a session of this model takes longer)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        server.proc.send_signal(signal.SIGINT)  # an operator who will not wait for the drain
        code, err = server.stop(timeout=90)
        load.cancel()
    assert code == 0, err[-2000:]
    assert "terminate called" not in err
