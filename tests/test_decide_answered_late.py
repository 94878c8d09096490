"""A decision recorded in time whose answer is ready only after its deadline is DEADLINE_EXCEEDED naming its record.

The finisher checks each decision's deadline once its audit record is durable, but the answer reaches gRPC
later: after the lane wakes its caller (a handler thread waiting for the GIL, the event loop), after the
group's other answers are sent. A scheduler stress test (real clients, 2-5x overload) got OK answers 0.1 to
380 ms after their deadlines on both front ends, unary and streamed, where ModelInfer re-checks its deadline
just before answering (``InferenceService.answer``). The injected fault here stands for that wait.
"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.api import stream_pump
from kernel.pipelines.tally import DecisionTally
from kernel.scheduling.stream_window import StreamHold

TIMEOUT_MS = 600  # far more than an idle kernel takes to decide and record one claim
STALL_S = 1.0  # the injected wait after the finisher's check: past the deadline


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    models = build_small_model(tmp_path_factory.mktemp("models"), provider="cpu")
    pipelines = copy_pipelines(tmp_path_factory.mktemp("pipelines"))
    server = start_kernel(models, request.param, pipelines=str(pipelines), pipeline_poll_s=0,
                          data_dir=str(tmp_path_factory.mktemp("data")))
    yield server
    server.stop(grace=2)


@pytest.fixture
def channel(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as ch:
        yield ch


@pytest.fixture
def stalled_after_the_check(monkeypatch):
    """The injected fault: counting a finished group (after its deadlines were checked, before its answers
    go out) stalls ``STALL_S``, as the finisher's or a caller's thread may wait for the GIL under load."""
    add = DecisionTally.add

    def stalled_add(self, group, results, late):
        threading.Event().wait(STALL_S)
        return add(self, group, results, late)

    monkeypatch.setattr(DecisionTally, "add", stalled_add)


def _late_count(channel) -> int:
    admin = kgrpc.AdminServiceStub(channel)
    (listed,) = [p for p in admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).pipelines
                 if p.name == "claims_triage"]
    return listed.decisions.late


def test_a_unary_decision_ready_after_its_deadline_is_deadline_exceeded_with_its_record(kernel, channel,
                                                                                       stalled_after_the_check):
    late_before = _late_count(channel)
    request = claim_request(data.generate_cases(1, seed=3)[0], request_id="ready-late", timeout_ms=TIMEOUT_MS)
    with pytest.raises(grpc.RpcError) as info:
        kgrpc.DecisionServiceStub(channel).Decide(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert "its answer was ready" in info.value.details(), info.value.details()
    sequence = int(dict(info.value.trailing_metadata())["aios-audit-sequence"])  # decided, and where it stands
    assert f"recorded at audit sequence {sequence}" in info.value.details()
    assert _late_count(channel) == late_before + 1


def test_a_streamed_decision_ready_after_its_deadline_is_answered_deadline_exceeded(kernel, channel,
                                                                                   stalled_after_the_check):
    stream_one_answered_late(channel, "streamed-late", seed=4)


def stream_one_answered_late(channel, request_id: str, seed: int, fault=None, monkeypatch=None) -> None:
    """One claim on a DecideStream (with ``fault(patch)`` in place for it, if given) is answered DEADLINE_EXCEEDED
    naming its record, and counted late once."""
    late_before = _late_count(channel)
    request = claim_request(data.generate_cases(1, seed=seed)[0], request_id=request_id, timeout_ms=TIMEOUT_MS)
    with monkeypatch.context() if fault else contextlib.nullcontext() as patch:  # (the tally is read without it)
        if fault:
            fault(patch)
        (answer,) = list(kgrpc.DecisionServiceStub(channel).DecideStream(iter([request]), timeout=60))
    assert answer.request_id == request_id
    assert answer.error_code == "DEADLINE_EXCEEDED", (answer.error_code, answer.action)
    assert "its answer was ready" in answer.error_message and answer.audit_sequence > 0
    assert _late_count(channel) == late_before + 1


def stall_before_the_send(patch) -> None:
    """The injected fault: handing a streamed answer on (``StreamHold.give_back``, between the making of an
    answer and its send) stalls ``STALL_S``, as an answer waits on grpc.aio's event loop behind others under
    overload (5x overload sent DecideStream answers 0.05-6.5 ms after deadlines checked before that wait)."""
    give_back = StreamHold.give_back

    def stalled_give_back(self, nbytes):
        threading.Event().wait(STALL_S)
        return give_back(self, nbytes)

    patch.setattr(StreamHold, "give_back", stalled_give_back)


def test_a_streamed_answer_held_up_on_its_way_out_is_checked_where_it_is_sent(kernel, channel, monkeypatch):
    if kernel.settings.front_end != "aio":
        pytest.skip("the threaded front end streams decisions through its pump (stream_pump.py), not this path")
    stream_one_answered_late(channel, "sent-late", seed=5, fault=stall_before_the_send, monkeypatch=monkeypatch)


def stall_the_first_send_s_completion(patch) -> list:
    """The injected fault: the first answer's "sent" report (``_Stream._after_send``, on gRPC's poller) comes
    ``STALL_S`` late, as under a busy poller or a client reading slowly: answers ready meanwhile wait their turn.
    Returns what the stream sent: (when its send began, the answer, that answer's deadline), each in order."""
    after_send, answer, send_locked = (stream_pump._Stream._after_send, stream_pump._Stream.answer,
                                       stream_pump._Stream._send_locked)
    stalled, deadlines, sent = [], {}, []

    def late_report(self, token):
        if not stalled:
            stalled.append(token)
            threading.Event().wait(STALL_S)
        return after_send(self, token)

    def noting_deadlines(self, decision, nbytes, item, pending=None):
        if pending is not None:
            deadlines[decision.request_id] = pending.item.deadline_ns
        return answer(self, decision, nbytes, item, pending)

    def noting_sends(self, data):
        decision = kpb.Decision.FromString(data)
        sent.append((time.monotonic_ns(), decision, deadlines.get(decision.request_id)))
        return send_locked(self, data)

    patch.setattr(stream_pump._Stream, "_after_send", late_report)
    patch.setattr(stream_pump._Stream, "answer", noting_deadlines)
    patch.setattr(stream_pump._Stream, "_send_locked", noting_sends)
    return sent


def test_a_pumped_answer_waiting_for_the_send_before_it_is_checked_when_its_turn_comes(kernel, channel, monkeypatch):
    if kernel.settings.front_end == "aio":
        pytest.skip("grpc.aio streams decisions through its event loop (the test above), not the pump")
    cases = data.generate_cases(2, seed=6)
    requests = [claim_request(case, request_id=f"queued-{n}", timeout_ms=TIMEOUT_MS) for n, case in enumerate(cases)]
    with monkeypatch.context() as patch:
        sent = stall_the_first_send_s_completion(patch)
        answers = list(kgrpc.DecisionServiceStub(channel).DecideStream(iter(requests), timeout=60))
    assert len(answers) == len(sent) == 2
    # Never an OK answer whose send began after its deadline: the one that waited for the stalled send is checked
    # again when its turn comes (it went out OK, 0.4 s late, before).
    for began_ns, answer, deadline_ns in sent:
        assert answer.error_code or deadline_ns is None or began_ns <= deadline_ns, (answer.request_id, began_ns - deadline_ns)
    waited = sent[1]  # (the second send waited for the first one's stalled report)
    if waited[2] is None or waited[0] <= waited[2]:
        pytest.skip("no answer was still in time when it began to wait (a host too slow for this check)")
    assert waited[1].error_code == "DEADLINE_EXCEEDED" and "after its deadline" in waited[1].error_message
