"""Decide answered later on the threaded front end (kernel/api/answer_later.py): a decision waiting for the
lane or its finisher holds no handler thread; the finisher thread answers it with the rest of its group.
Queued decisions still expire at their deadline, leave the queue when their client cancels, and count
as calls in progress."""

from __future__ import annotations

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from lane_support import occupy, save_slow_model, until

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    models = build_small_model(tmp_path_factory.mktemp("models"), provider="cpu")  # queued behind `slow`
    save_slow_model(models)
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    # The decisions queue behind ~1 s of `slow` batches on a quiet core: the pipeline's own 2 s model timeout
    # expired them on a loaded machine (CI's), where this test is about threads, not deadlines (those: below).
    pipeline = pipelines / "claims_triage.toml"
    pipeline.write_text(pipeline.read_text().replace("timeout_ms = 2000", "timeout_ms = 120000", 1))
    server = start_kernel(models, "sync", lane_slots=1, pipelines=str(pipelines), pipeline_poll_s=0,
                          data_dir=str(tmp_path_factory.mktemp("data")))
    yield server
    server.stop(grace=2)


def _queued_decisions(kernel) -> int:
    return kernel.lanes.load(kernel.hub.get("claims_triage"))[0]


def test_queued_decisions_hold_no_handler_thread_and_each_gets_its_own_answer(kernel, channel):
    cases = data.generate_cases(24, seed=7)
    decide = kgrpc.DecisionServiceStub(channel).Decide
    audit_before = kernel.decisions.audit.size
    train = occupy(kernel, channel)
    calls = [decide.future(claim_request(case, request_id=f"later-{i}", priority=2), timeout=120)
             for i, case in enumerate(cases)]
    until(lambda: _queued_decisions(kernel) == len(cases), "the decisions to queue")
    assert kernel._pool.in_progress() <= 2, "handler threads held while their decisions wait in the queue"
    assert kernel._eager.outstanding.count >= len(cases)
    assert kernel._budget._in_progress() >= len(cases) + 1  # counted in progress all the same
    for call in train:
        call.result()
    answers = [call.result() for call in calls]
    assert [a.request_id for a in answers] == [f"later-{i}" for i in range(len(cases))]
    assert all(a.action and a.audit_sequence for a in answers)
    assert len({a.audit_sequence for a in answers}) == len(cases)
    until(lambda: kernel._eager.outstanding.count == 0, "every decision to be counted out")
    assert kernel.decisions.audit.size > audit_before


def test_a_queued_decision_expires_at_its_deadline_while_the_lane_is_busy(kernel, channel):
    decide = kgrpc.DecisionServiceStub(channel).Decide
    train = occupy(kernel, channel, batches=8)
    executed = kernel.hub.get("claims_triage").stats.execution_count
    request = claim_request(data.generate_cases(1, seed=8)[0], request_id="hurried", priority=2, timeout_ms=30)
    with pytest.raises(grpc.RpcError) as info:
        decide(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert not all(call.done() for call in train)  # answered at its deadline, not when the lane came free
    for call in train:
        call.result()
    assert kernel.hub.get("claims_triage").stats.execution_count == executed  # its model never ran
    until(lambda: kernel._eager.outstanding.count == 0, "the call to be counted out")


def test_a_cancelled_queued_decision_leaves_the_queue(kernel, channel):
    decide = kgrpc.DecisionServiceStub(channel).Decide
    train = occupy(kernel, channel)
    executed = kernel.hub.get("claims_triage").stats.execution_count
    call = decide.future(claim_request(data.generate_cases(1, seed=9)[0], priority=2), timeout=60)
    until(lambda: _queued_decisions(kernel) == 1, "the decision to queue")
    call.cancel()
    until(lambda: _queued_decisions(kernel) == 0, "the cancelled decision to leave the queue")
    for c in train:
        c.result()
    assert kernel.hub.get("claims_triage").stats.execution_count == executed
    until(lambda: kernel._eager.outstanding.count == 0, "the call to be counted out")
