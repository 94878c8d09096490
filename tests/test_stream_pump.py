"""DecideStream on the threaded front end, driven by the stream pump (kernel/api/stream_pump.py).

Real kernel, real gRPC clients. The pump receives from gRPC's poller, queues
through the decision finisher and sends one answer at a time: each answer
must reach its request, a bad message must be answered and the stream go
on, no more than MAX_IN_FLIGHT requests (nor more than MAX_HELD_BYTES of them)
may be taken before answers flow, and a call that ends early must take back
what is still queued.
"""

from __future__ import annotations

import logging

import threading
import time

import grpc
import pytest

from claims_support import claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.api import stream_pump
from kernel.scheduling import stream_window

METHOD = "/aios.kernel.v1.DecisionService/DecideStream"


@pytest.fixture
def pumped(claims_kernel):
    if claims_kernel.front_end != "sync":
        pytest.skip("the stream pump serves the threaded front end; grpc.aio streams run on the event loop")
    assert claims_kernel._pump is not None, "the stream pump is on by default on the threaded front end"
    return claims_kernel


@pytest.fixture
def held_model(monkeypatch):
    """The injected fault: the claims model waits for ``release``; ``rows`` lists each held batch's rows."""
    from kernel.models.runtime import OnnxModel

    release = threading.Event()
    rows: list[int] = []
    run = OnnxModel.run

    def held_run(self, feeds, options=None):
        rows.append(len(next(iter(feeds.values()))))
        release.wait(30)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", held_run)
    yield release, rows
    release.set()


def _wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        threading.Event().wait(0.01)
    return condition()


def test_one_stream_with_many_in_flight_answers_each_request_and_goes_on_past_bad_ones(pumped):
    pump = pumped._pump
    before = pump.streams
    cases = data.generate_cases(200, seed=51)
    requests = [claim_request(case, request_id=f"p{i}").SerializeToString() for i, case in enumerate(cases)]
    requests.insert(50, kpb.DecisionRequest(pipeline="no_such_pipeline", request_id="unknown").SerializeToString())
    requests.insert(120, b"\xff\xff\xff")  # not a DecisionRequest at all
    with grpc.insecure_channel(f"127.0.0.1:{pumped.port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=lambda raw: raw,
                                     response_deserializer=kpb.Decision.FromString)
        answers = list(call(iter(requests), timeout=60))
    assert pump.streams == before + 1
    assert len(answers) == len(requests)
    by_id = {answer.request_id: answer for answer in answers if answer.request_id}
    assert set(by_id) == {f"p{i}" for i in range(200)} | {"unknown"}
    assert by_id["unknown"].error_code == "NOT_FOUND"
    unparsable = [answer for answer in answers if not answer.request_id]
    assert len(unparsable) == 1 and unparsable[0].error_code == "INVALID_ARGUMENT"
    decided = [by_id[f"p{i}"] for i in range(200)]
    assert all(not d.error_code and d.action and d.audit_hash for d in decided)
    assert len({d.audit_sequence for d in decided}) == 200  # one audit record each
    assert _wait_until(lambda: pump.open == 0)  # the call's end is counted (the call budget reads it)


def _taken_while_answers_are_held(kernel, held_model, requests) -> tuple[int, list[kpb.Decision]]:
    """Send ``requests`` on one DecideStream while the model holds its batches: how many the kernel took
    before answers could flow (running plus queued, once that settled), then every answer."""
    release, rows = held_model
    mv = kernel.hub.get("claims_triage")
    lane = kernel.lanes.for_model(mv)
    answers: list[kpb.Decision] = []
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        stream = kgrpc.DecisionServiceStub(channel).DecideStream(iter(requests), timeout=60)
        reader = threading.Thread(target=lambda: answers.extend(stream))
        reader.start()
        assert _wait_until(lambda: rows and sum(rows) + lane.load(mv)[0] >= 3)
        threading.Event().wait(0.3)  # room for a fourth request to be taken, were the bound not kept
        taken = sum(rows) + lane.load(mv)[0]
        release.set()
        reader.join(60)
    assert all(not answer.error_code for answer in answers)
    return taken, answers


def test_no_more_than_max_in_flight_requests_are_taken_before_answers_flow(pumped, held_model, monkeypatch):
    monkeypatch.setattr(stream_window, "MAX_IN_FLIGHT", 3)
    cases = data.generate_cases(20, seed=52)
    requests = [claim_request(case, request_id=f"b{i}") for i, case in enumerate(cases)]
    taken, answers = _taken_while_answers_are_held(pumped, held_model, requests)
    assert taken == 3
    assert sorted(answer.request_id for answer in answers) == sorted(f"b{i}" for i in range(20))


def test_no_more_than_max_held_bytes_of_requests_are_taken_before_answers_flow(claims_kernel, held_model,
                                                                               monkeypatch):
    """Both front ends (the pump on the threaded one, decide_stream's reader on grpc.aio): a stream of large
    requests stops being read once their bytes reach the bound, well before MAX_IN_FLIGHT of them."""
    case = data.generate_cases(1, seed=54)[0]
    requests = [claim_request(case, request_id=f"h{i}") for i in range(8)]
    for request in requests:
        request.text_fields["description"] = "x" * 20_000
    size = len(requests[0].SerializeToString())
    assert all(len(request.SerializeToString()) == size for request in requests)
    monkeypatch.setattr(stream_window, "MAX_HELD_BYTES", int(2.5 * size))  # room for a third, not a fourth
    taken, answers = _taken_while_answers_are_held(claims_kernel, held_model, requests)
    assert taken == 3
    assert sorted(answer.request_id for answer in answers) == sorted(f"h{i}" for i in range(8))


def test_a_stream_that_ends_early_takes_back_what_is_still_queued(pumped, held_model):
    release, rows = held_model
    pump = pumped._pump
    mv = pumped.hub.get("claims_triage")
    lane = pumped.lanes.for_model(mv)
    cases = data.generate_cases(12, seed=53)
    gate = threading.Event()

    def requests():
        # One request first, until the model holds its batch; then the rest, which can only queue behind it
        # (sent together they could all land in the first batch, leaving nothing queued to take back).
        yield claim_request(cases[0], request_id="c0")
        _wait_until(lambda: bool(rows))
        for i, case in enumerate(cases[1:], 1):
            yield claim_request(case, request_id=f"c{i}")
        gate.wait(30)  # the stream stays open until the test lets it go

    with grpc.insecure_channel(f"127.0.0.1:{pumped.port}") as channel:
        stream = kgrpc.DecisionServiceStub(channel).DecideStream(requests(), timeout=60)
        assert _wait_until(lambda: rows and lane.load(mv)[0] > 0 and sum(rows) + lane.load(mv)[0] >= len(cases))
        running = sum(rows)  # the held batches; the rest waits in the queue
        stream.cancel()
        assert _wait_until(lambda: lane.load(mv)[0] == 0)  # taken back from the queue at once, model still held
        release.set()
        gate.set()
        assert _wait_until(lambda: pump.open == 0)
    assert running < len(cases)
    assert sum(rows) == running  # the model never ran the requests that were still queued


@pytest.mark.parametrize("reason", ["answer_later off", "grpc internals differ"])
def test_without_the_pump_decide_stream_takes_grpcs_standard_path(claims_models, tmp_path, monkeypatch, reason):
    from claims_support import copy_pipelines
    from conftest import start_kernel

    if reason == "grpc internals differ":
        monkeypatch.setattr(stream_pump, "AVAILABLE", False)
    server = start_kernel(claims_models, pipelines=str(copy_pipelines(tmp_path / "pipelines")),
                          answer_later=(reason != "answer_later off"))
    try:
        assert server._pump is None and "streams pumped" not in server._front_end_words()
        cases = data.generate_cases(30, seed=54)
        requests = [claim_request(case, request_id=f"s{i}") for i, case in enumerate(cases)]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answers = list(kgrpc.DecisionServiceStub(channel).DecideStream(iter(requests), timeout=60))
        assert sorted(a.request_id for a in answers) == sorted(f"s{i}" for i in range(30))
        assert all(not a.error_code for a in answers)
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("front_end, answer_later", [("sync", True), ("sync", False), ("aio", True)],
                         ids=["pumped", "reader-thread", "aio"])
def test_a_stopping_kernel_answers_what_a_stream_took_and_ends_it_saying_the_rest_was_not_read(
        claims_models, tmp_path, front_end, answer_later):
    """(Streams audit) at SIGTERM an open DecideStream went on taking and deciding requests for the whole grace
    period, then gRPC cut it (UNAVAILABLE "Cancelling all calls", a status that invites sending again) with its
    answers unsent: 4,087 recorded decisions never answered, and the stop held for the grace. Now the stream
    stops reading when the drain begins, answers what it took, and ends with UNAVAILABLE saying so."""
    from conftest import start_claims_kernel
    from kernel.audit import RecordFilter, iter_directory

    from kernel.pipelines.stream_drains import DRAINED

    server = start_claims_kernel(claims_models, tmp_path, grace_seconds=20, front_end=front_end,
                                 answer_later=answer_later)
    assert (server._pump is not None) == (front_end == "sync" and answer_later)
    cases = data.generate_cases(50, seed=31)
    stop_sending = threading.Event()

    def requests():
        i = 0
        while not stop_sending.is_set():
            yield claim_request(cases[i % len(cases)], request_id=f"s{i}")
            i += 1
            time.sleep(0.001)

    answered, ended = [], {}
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = kgrpc.DecisionServiceStub(channel).DecideStream(requests(), timeout=60)

        def read():
            try:
                for decision in stream:
                    answered.append(decision)
            except grpc.RpcError as exc:
                ended["code"], ended["details"] = exc.code(), exc.details()

        reader = threading.Thread(target=read)
        reader.start()
        assert _wait_until(lambda: len(answered) >= 50)
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        stop_sending.set()
        reader.join(30)
    assert ended.get("code") == grpc.StatusCode.UNAVAILABLE, ended
    # The kernel's status, unless the client was still writing as the stopped server closed the connection:
    # its transport then fails first ("Stream removed", seen once in a fresh clone's run on the reader-thread
    # path). Either way nothing it did not answer was decided (below).
    assert ended["details"] == DRAINED or ended["details"].startswith("Stream removed"), ended
    assert took < 10, took  # not held for the 20 s grace
    recorded = {r.request_id for r in iter_directory(tmp_path / "data" / "audit", 0, RecordFilter(kind=kpb.DECISION))}
    assert {d.request_id for d in answered if not d.error_code} == recorded  # every decision made was answered


def test_a_streamed_error_answer_carries_the_unary_calls_trailers_as_fields(caplog):
    """A stream's answers have no trailers: what a unary call's would say (when to send again, that nothing
    was decided, where a decision answered with an error was recorded) is in the answer's own fields."""
    from kernel.errors import NOT_DECIDED, ResourceExhausted, Unavailable
    from kernel.pipelines.group_finish import RECORDED_TRAILER
    from kernel.pipelines.stream import error_decision

    request = kpb.DecisionRequest(request_id="r1", pipeline="claims_triage", tenant="t")
    full = error_decision(request, ResourceExhausted("queue full", trailers=(("retry-after-ms", "250"),)))
    assert (full.error_code, full.retry_after_ms, full.not_decided) == ("RESOURCE_EXHAUSTED", 250, False)
    draining = error_decision(request, Unavailable("stopping", trailers=(*NOT_DECIDED, ("retry-after-ms", "1000"))))
    assert (draining.retry_after_ms, draining.not_decided, draining.audit_sequence) == (1000, True, 0)
    recorded = error_decision(request, Unavailable("review not stored", trailers=((RECORDED_TRAILER, "17"),)))
    assert (recorded.audit_sequence, recorded.retry_after_ms, recorded.not_decided) == (17, 0, False)
    with caplog.at_level(logging.ERROR, logger="aios.decisions"):
        plain = error_decision(request, ValueError("boom"))
    assert (plain.error_code, plain.retry_after_ms, plain.not_decided) == ("INTERNAL", 0, False)
    # A bug, as a unary call's INTERNAL: its traceback in the log under the id the answer gives (an audit: neither).
    (line,) = [r for r in caplog.records if r.name == "aios.decisions"]
    request_id = plain.error_message.split("request id ")[1].split(")")[0]
    assert request_id in line.getMessage() and line.exc_info is not None and "boom" in str(line.exc_info[1])
