"""ModelStreamInfer's requests get what unary calls get: deadlines enforced while queued, removal from the
queue when the call ends, and a bound on what one stream holds (in requests and in bytes); each answer says it
is the request's last.

Found by a streaming client's audit (2026-11-27): a request with a 100 ms ``timeout`` behind a static batching
window was answered after the window (334 ms), not at its deadline; a cancelled stream's queued requests all
still ran; a client that sent without reading grew the server by ~225 MiB in 6 s.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from conftest import start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.scheduling import stream_window
from kernel.scheduling.stream_window import MAX_IN_FLIGHT
from kernel.testing import onnx_models
from lane_support import request_for, save_slow_model, until

WINDOW_US = 3_000_000  # `held`'s static window: a request waits this long for company unless its deadline comes first
PARKED_US = 10_000_000  # `parked`'s: the longest model.toml allows


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_window")
    save_slow_model(root)
    onnx_models.save_mlp_version(root, "held", [16, 32, 4], seed=5, max_batch_size=8, provider="cpu",
                                 max_queue_delay_us=WINDOW_US, preferred_batch_sizes=[8])
    onnx_models.save_mlp_version(root, "tiny", [16, 64, 4], seed=3, max_batch_size=8, provider="cpu")
    # Requests wait here for company far longer than any test takes: queued for sure, whatever the load.
    onnx_models.save_mlp_version(root, "parked", [16, 32, 4], seed=7, max_batch_size=8, provider="cpu",
                                 max_queue_delay_us=PARKED_US, preferred_batch_sizes=[8])
    return root


@pytest.fixture(scope="module", params=["sync", "aio"])
def server(request, repo):
    server = start_kernel(repo, request.param)
    yield server
    server.stop(grace=1)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _statistics(stub, model: str):
    (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats
    return stats.inference_stats


def test_a_queued_request_is_answered_at_its_deadline_not_when_its_window_closes(stub):
    request = request_for("held", np.ones((1, 16)), timeout=100_000)  # Triton's timeout, µs
    request.id = "late"
    started = time.monotonic()
    (answer,) = list(stub.ModelStreamInfer(iter([request]), timeout=30))
    took = time.monotonic() - started
    assert answer.error_message.startswith("DEADLINE_EXCEEDED"), answer.error_message
    assert answer.infer_response.id == "late"
    # At its deadline (the expiry timer), well before the 3 s window would have formed a batch.
    assert took < WINDOW_US / 1e6 / 2, f"answered after {took:.3f} s"


def test_every_answer_is_marked_final_as_triton_marks_a_non_decoupled_models(stub):
    good = request_for("tiny", np.ones((2, 16)))
    bad = request_for("tiny", np.ones((2, 16)), input_name="NOPE")
    answers = list(stub.ModelStreamInfer(iter([good, bad]), timeout=30))
    assert [a.error_message == "" for a in answers] == [True, False]
    assert all(a.infer_response.parameters["triton_final_response"].bool_param for a in answers)


def test_cancelling_a_stream_takes_its_queued_requests_out_of_the_queue(server, stub):
    # `parked` holds its requests in the queue for 10 s waiting for a batch of 8: three are queued, never
    # run, whatever the machine's load (with requests that queued behind slow ones, a loaded CI machine ran
    # them one by one before the test could cancel any).
    sent = 3
    before = _statistics(stub, "parked")
    call = stub.ModelStreamInfer(iter([request_for("parked", np.ones((1, 16)))] * sent), timeout=120)
    parked = server.hub.get("parked")
    until(lambda: server.lanes.load(parked) == (sent, 0), "the stream's requests to be queued")
    call.cancel()
    until(lambda: server.lanes.load(parked) == (0, 0), "the cancelled stream's requests to leave the queue")
    after = _statistics(stub, "parked")
    # Without the window's cancel they stay queued until the window closes, then all run.
    assert after.success.count - before.success.count == 0
    assert after.fail.count - before.fail.count == sent


def test_a_client_that_never_reads_is_held_to_the_streams_window(server, stub):
    # The client's transport takes answers up to its flow-control window whether the program reads or not;
    # without bandwidth probing that window stays at 64 KiB (~600 tiny answers), so what the kernel runs
    # past its own window is bounded here.
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)])
    quiet = pb_grpc.GRPCInferenceServiceStub(channel)
    before = _statistics(stub, "tiny").success.count
    stop = threading.Event()
    offered = [0, time.monotonic()]  # requests the client's stream took from us; when it last took one
    plenty = 20 * MAX_IN_FLIGHT

    def requests():
        request = request_for("tiny", np.ones((1, 16)))
        while not stop.is_set() and offered[0] < plenty:
            offered[0] += 1
            offered[1] = time.monotonic()
            yield request

    call = quiet.ModelStreamInfer(requests(), timeout=60)  # never read
    try:
        # Either the kernel stopped reading and the client's transport filled up (it takes no more
        # requests), or the kernel took everything offered.
        until(lambda: offered[0] >= plenty or time.monotonic() - offered[1] > 1.0,
              "the client to be pushed back or to offer plenty")
        ran = _statistics(stub, "tiny").success.count - before
    finally:
        stop.set()
        call.cancel()
        channel.close()
    # The window, plus the answers already handed to gRPC's transport (flow control: ~64 KiB of them).
    # (What the client offered beyond that waits in the transports, bounded by their flow control.)
    assert MAX_IN_FLIGHT <= ran <= 3 * MAX_IN_FLIGHT, (ran, offered[0])


def test_a_stream_holds_no_more_than_max_held_bytes_of_requests(server, stub, monkeypatch):
    # `parked` keeps requests queued for 10 s: what the stream took is what is queued. With the byte bound at
    # 2.5 requests, three are taken (the third while under it) and the rest wait in the transports; without
    # it all six were (1,024 requests of up to 64 MiB each could be held by one stream).
    request = request_for("parked", np.ones((1, 16)))
    monkeypatch.setattr(stream_window, "MAX_HELD_BYTES", int(2.5 * len(request.SerializeToString())))
    parked = server.hub.get("parked")
    call = stub.ModelStreamInfer(iter([request] * 6), timeout=120)
    try:
        until(lambda: server.lanes.load(parked)[0] >= 3, "the stream's first requests to be queued")
        threading.Event().wait(0.3)  # room for a fourth to be taken, were the bound not kept
        assert server.lanes.load(parked) == (3, 0)
    finally:
        call.cancel()
    until(lambda: server.lanes.load(parked) == (0, 0), "the cancelled stream's requests to leave the queue")


def test_has_room_always_lets_one_request_in_and_bounds_count_and_bytes(monkeypatch):
    monkeypatch.setattr(stream_window, "MAX_IN_FLIGHT", 4)
    monkeypatch.setattr(stream_window, "MAX_HELD_BYTES", 100)
    assert stream_window.has_room(0, 10_000)  # one request however large (max_message_bytes bounds it)
    assert stream_window.has_room(3, 99)
    assert not stream_window.has_room(4, 0)
    assert not stream_window.has_room(1, 100)
    hold = stream_window.StreamHold()
    assert hold.take(150, lambda: True)  # alone: taken
    assert not hold.take(1, lambda: False)  # no room, and the call ended while it waited
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: hold.take(1, lambda: True) and taken.set())
    waiter.start()
    assert not taken.wait(0.2)
    hold.give_back(150)
    assert taken.wait(10)
    waiter.join(10)
    assert (hold.requests, hold.nbytes) == (1, 1)
