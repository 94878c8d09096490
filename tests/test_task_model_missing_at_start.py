"""A task whose pipeline waits for its model at a start (the model did not load) is retried, as it is while the kernel
runs with its model unloaded; the task runs once the model loads.

At a start a pipeline whose model is not loaded is refused, to be tried again when a version of its model loads;
the tasks the restart resumed on it failed at once and for good, "NOT_FOUND: pipeline 'claims_triage' is not
loaded", as if their pipeline were gone, while a running kernel retries a task whose model is unloaded (an operator
reloading it). Real kernels on one data dir, a real model folder moved aside and back, gRPC calls.
"""

from __future__ import annotations

import grpc

from claims_support import build_small_model
from conftest import start_claims_kernel
from test_task_retries import automated_claim
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

TIMEOUT_S = 30
MODEL = "claims_triage"
# Retries every 50 ms, for far longer than the test takes.
SETTINGS = {"task_backoff_s": 0.05, "task_max_backoff_s": 0.05, "task_max_attempts": 1000}


def _watch_until(port: int, task_id: str, predicate) -> kpb.Task:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for task in kgrpc.TaskServiceStub(channel).WatchTask(kpb.TaskRef(task_id=task_id), timeout=TIMEOUT_S):
            if predicate(task):
                return task
    raise AssertionError(f"task {task_id}'s watch ended first")


def test_a_task_resumed_while_its_model_is_missing_is_retried_until_the_model_loads(tmp_path):
    models = build_small_model(tmp_path / "models")
    kernel = start_claims_kernel(models, tmp_path, **SETTINGS)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=TIMEOUT_S)
            task = kgrpc.TaskServiceStub(channel).StartTask(automated_claim("model-missing-1"), timeout=TIMEOUT_S)
        _watch_until(kernel.port, task.task_id, lambda t: t.attempts >= 1 and t.state == kpb.QUEUED)
    finally:
        kernel.stop(grace=1)

    (models / MODEL).rename(tmp_path / "aside")  # the model's folder is being replaced as the kernel starts
    kernel = start_claims_kernel(models, tmp_path, **SETTINGS)
    try:
        before = kernel.decisions.tasks.get(task.task_id).attempts
        retried = _watch_until(kernel.port, task.task_id,
                               lambda t: t.state == kpb.FAILED or t.attempts >= before + 2)
        assert retried.state in (kpb.QUEUED, kpb.RUNNING), retried.error  # retried, not FAILED
        (tmp_path / "aside").rename(models / MODEL)
        with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=TIMEOUT_S)
        done = _watch_until(kernel.port, task.task_id, lambda t: t.state in (kpb.SUCCEEDED, kpb.FAILED))
        assert done.state == kpb.SUCCEEDED, done.error
    finally:
        kernel.stop(grace=1)
