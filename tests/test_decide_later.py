"""Decide answered later on the threaded front end (kernel/api/answer_later.py): a decision waiting for the
lane or its finisher holds no handler thread; the finisher thread answers it with the rest of its group.
Queued decisions still expire at their deadline, leave the queue when their client cancels, and count
as calls in progress."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.testing import onnx_models

SLOW_ROWS = 512  # one batch of `slow` holds the lane's only slot for ~0.1-0.3 s


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    models = build_small_model(tmp_path_factory.mktemp("models"))
    onnx_models.save_mlp_version(models, "slow", [64, 2048, 2048, 2048, 8], seed=1, max_batch_size=SLOW_ROWS,
                                 provider="cpu")
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    server = start_kernel(models, "sync", lane_slots=1, pipelines=str(pipelines), pipeline_poll_s=0,
                          data_dir=str(tmp_path_factory.mktemp("data")))
    yield server
    server.stop(grace=2)


@pytest.fixture
def channel(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as ch:
        yield ch


def _until(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _occupy(kernel, channel, batches: int = 4) -> list:
    """Long `slow` batches at priority 1 holding the lane's one slot."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    calls = []
    for _ in range(batches):
        request = pb.ModelInferRequest(model_name="slow")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[SLOW_ROWS, 64])
        request.raw_input_contents.append(np.ones((SLOW_ROWS, 64), np.float32).tobytes())
        request.parameters["priority"].int64_param = 1
        calls.append(stub.ModelInfer.future(request, timeout=120))
    slow = kernel.hub.get("slow")
    _until(lambda: kernel.lanes.load(slow)[1] == 1 or all(c.done() for c in calls), "a slow batch to run")
    assert not all(c.done() for c in calls), "the slow batches finished before the test could queue behind them"
    return calls


def _queued_decisions(kernel) -> int:
    return kernel.lanes.load(kernel.hub.get("claims_triage"))[0]


def test_queued_decisions_hold_no_handler_thread_and_each_gets_its_own_answer(kernel, channel):
    cases = data.generate_cases(24, seed=7)
    decide = kgrpc.DecisionServiceStub(channel).Decide
    audit_before = kernel.decisions.audit.size
    train = _occupy(kernel, channel)
    calls = [decide.future(claim_request(case, request_id=f"later-{i}", priority=2), timeout=120)
             for i, case in enumerate(cases)]
    _until(lambda: _queued_decisions(kernel) == len(cases), "the decisions to queue")
    assert kernel._pool.in_progress() <= 2, "handler threads held while their decisions wait in the queue"
    assert kernel._eager.outstanding.count >= len(cases)
    assert kernel._budget._in_progress() >= len(cases) + 1  # counted in progress all the same
    for call in train:
        call.result()
    answers = [call.result() for call in calls]
    assert [a.request_id for a in answers] == [f"later-{i}" for i in range(len(cases))]
    assert all(a.action and a.audit_sequence for a in answers)
    assert len({a.audit_sequence for a in answers}) == len(cases)
    _until(lambda: kernel._eager.outstanding.count == 0, "every decision to be counted out")
    assert kernel.decisions.audit.size > audit_before


def test_a_queued_decision_expires_at_its_deadline_while_the_lane_is_busy(kernel, channel):
    decide = kgrpc.DecisionServiceStub(channel).Decide
    train = _occupy(kernel, channel, batches=8)
    executed = kernel.hub.get("claims_triage").stats.execution_count
    request = claim_request(data.generate_cases(1, seed=8)[0], request_id="hurried", priority=2, timeout_ms=30)
    with pytest.raises(grpc.RpcError) as info:
        decide(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert not all(call.done() for call in train)  # answered at its deadline, not when the lane came free
    for call in train:
        call.result()
    assert kernel.hub.get("claims_triage").stats.execution_count == executed  # its model never ran
    _until(lambda: kernel._eager.outstanding.count == 0, "the call to be counted out")


def test_a_cancelled_queued_decision_leaves_the_queue(kernel, channel):
    decide = kgrpc.DecisionServiceStub(channel).Decide
    train = _occupy(kernel, channel)
    executed = kernel.hub.get("claims_triage").stats.execution_count
    call = decide.future(claim_request(data.generate_cases(1, seed=9)[0], priority=2), timeout=60)
    _until(lambda: _queued_decisions(kernel) == 1, "the decision to queue")
    call.cancel()
    _until(lambda: _queued_decisions(kernel) == 0, "the cancelled decision to leave the queue")
    for c in train:
        c.result()
    assert kernel.hub.get("claims_triage").stats.execution_count == executed
    _until(lambda: kernel._eager.outstanding.count == 0, "the call to be counted out")
