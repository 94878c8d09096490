"""DecideStream back-pressure reaches a client that writes and never reads (kernel/api/stream_pump.py).

The pump pauses receiving at ``MAX_IN_FLIGHT`` requests held (stream_window.has_room). It used to
count an answer as done once it was queued to send, so a client that wrote
fast and never read made the kernel take 61,115 requests in 12 s and hold
every answer (+1 GB with 100 KB request ids). Answers gRPC has not sent now
count against the limit too: such a stream stops being read, gRPC's flow
control pushes back on the client, and the kernel holds at most
``MAX_IN_FLIGHT`` of its requests (beyond what gRPC's buffers took as sent).
Measured through the pump's own counters, on a real kernel.
"""

from __future__ import annotations


import grpc
import pytest

from claims_support import claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.scheduling import stream_window
from kernel.testing.settle import settled

METHOD = "/aios.kernel.v1.DecisionService/DecideStream"
LIMIT = 64  # MAX_IN_FLIGHT for the test: small, so what gRPC's buffers hold dominates the count
REQUESTS = 5000
PAD = "p" * 4000  # each request id (and so each answer) ~4 KB: gRPC's buffers (a few MB) fill after ~1,000


@pytest.fixture
def pumped(claims_kernel):
    if claims_kernel.front_end != "sync":
        pytest.skip("the stream pump serves the threaded front end")
    assert claims_kernel._pump is not None
    return claims_kernel


def test_a_client_that_never_reads_stops_being_read_and_then_gets_every_answer(pumped, monkeypatch):
    monkeypatch.setattr(stream_window, "MAX_IN_FLIGHT", LIMIT)
    pump = pumped._pump
    taken0, sent0 = pump.taken, pump.sent
    cases = data.generate_cases(50, seed=61)
    written = [0]

    def requests():
        for n in range(REQUESTS):
            written[0] = n + 1
            yield claim_request(cases[n % len(cases)], request_id=f"{n}-{PAD}").SerializeToString()

    with grpc.insecure_channel(f"127.0.0.1:{pumped.port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=lambda raw: raw,
                                     response_deserializer=kpb.Decision.FromString)(requests(), timeout=120)
        taken = settled(lambda: pump.taken) - taken0  # the stream has stopped being read
        sent = pump.sent - sent0
        held = taken - sent
        assert held <= LIMIT, f"the kernel holds {held} requests of a stream whose client does not read"
        assert taken < REQUESTS // 2, f"took {taken} of {REQUESTS} requests from a client that reads nothing"
        assert written[0] < REQUESTS, "the client was never pushed back"
        answers = [answer.request_id.split("-")[0] for answer in call]  # reading at last: every answer comes
    assert sorted(map(int, answers)) == list(range(REQUESTS))
    assert pump.taken - taken0 == REQUESTS and pump.sent - sent0 == REQUESTS


def test_on_grpc_aio_a_client_that_never_reads_stops_being_read(claims_kernel, monkeypatch):
    """The same client on the asyncio front end, counted where decide_stream hands its answers on (it frees a
    slot for each): rpc.py hands the loop at most AIO_STREAM_WINDOW answers not yet sent, so the stream stops
    too (without that window they all went, the client reading nothing, into rpc.py's queue for the loop)."""
    if claims_kernel.front_end != "aio":
        pytest.skip("the asyncio front end's DecideStream path")
    from kernel.api import decision_service
    from kernel.pipelines import stream

    monkeypatch.setattr(stream_window, "MAX_IN_FLIGHT", LIMIT)
    handed_on = [0]

    def counted(*args, **kwargs):
        for answer in stream.decide_stream(*args, **kwargs):
            handed_on[0] += 1
            yield answer

    monkeypatch.setattr(decision_service, "decide_stream", counted)
    cases = data.generate_cases(50, seed=62)
    requests = (claim_request(cases[n % len(cases)], request_id=f"{n}-{PAD}").SerializeToString()
                for n in range(REQUESTS))
    with grpc.insecure_channel(f"127.0.0.1:{claims_kernel.port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=lambda raw: raw,
                                     response_deserializer=kpb.Decision.FromString)(requests, timeout=120)
        try:
            handed = settled(lambda: handed_on[0])
            assert handed < REQUESTS // 2, f"{handed} of {REQUESTS} answers left the stream for a client that reads none"
        finally:
            assert sum(1 for _ in call) == REQUESTS
