"""Large requests in flight share one budget, ``payload_budget_bytes`` (kernel/api/payload_budget.py).

Each request was bounded on its own, their sum was not: 64 ModelInfer calls of 32 MiB each, or their decoded
tensors queued behind a slow model, held GBs until the process was OOM-killed. Here a kernel with a 4 MiB budget
serves 1.5 MiB requests of an identity model whose batches wait, as an injected fault, until the test lets them
go: two are held, the next are refused RESOURCE_EXHAUSTED naming the setting with a ``retry-after-ms`` hint, a
small request still passes, the two held are answered with their own data; and whatever way a call ends
(answered, failed, cancelled, past its deadline, its stream closed, the kernel stopped), the budget is given back
to exactly 0 (``aios_payload_held_bytes``).
"""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import kernel.server
from conftest import free_port, start_kernel
from kernel._proto.inference import grpc_service_pb2 as pb
from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc
from kernel.api import frontends
from kernel.scheduling import run_batch
from kernel.testing import onnx_models
from lane_support import request_for, until

BUDGET = 4 << 20
WIDTH = 3 << 17  # FP32 values a request: 1.5 MiB, so two fit in the budget and a third does not


class _Gate:
    """The injected fault: batches of model ``held`` (and of any other model ``shut``) wait in their lane thread
    until ``open()``."""

    def __init__(self):
        self.opened = {"held": threading.Event(), "strings": threading.Event(), "ints": threading.Event()}

    def run_batch(self, batch):
        opened = self.opened.get(batch.items[0].model.name)
        if opened is not None:
            assert opened.wait(60)
        return run_batch(batch)

    def shut(self, model: str) -> None:
        self.opened[model] = threading.Event()

    def open(self):
        for opened in list(self.opened.values()):
            opened.set()


@pytest.fixture(params=["sync", "aio"])
def gated(request, tmp_path):
    root = tmp_path / "models"
    onnx_models.save(onnx_models.identity([("x", "FP32", (None,))]), root / "held" / "1" / "model.onnx")
    onnx_models.save(onnx_models.identity([("x", "FP32", (None,))]), root / "free" / "1" / "model.onnx")
    onnx_models.save(onnx_models.identity([("s", "BYTES", (None,))]), root / "strings" / "1" / "model.onnx")
    onnx_models.save(onnx_models.identity([("i", "INT64", (None,))]), root / "ints" / "1" / "model.onnx")
    gate = _Gate()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel.server, "run_batch", gate.run_batch)
        # No batch of ``held`` may run inline on the event loop or the poller, where its wait would stop the server.
        patch.setattr(frontends, "INLINE_MAX_NS", 0)
        server = start_kernel(root, request.param, lane_slots=4, payload_budget_bytes=BUDGET,
                              metrics_port=free_port())
        try:
            yield server, gate
        finally:
            gate.open()
            server.stop(grace=1)


def _request(model: str, seed: int, width: int = WIDTH) -> tuple[pb.ModelInferRequest, np.ndarray]:
    values = np.random.default_rng(seed).random((1, width), dtype=np.float32)
    request = request_for(model, values, input_name="x")
    request.id = f"r{seed}"
    return request, values


def _answered(response, values) -> bool:
    return np.array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(values.shape), values)


def _held_metric(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("aios_payload_held_bytes "):
                return float(line.split()[1])
    raise AssertionError("aios_payload_held_bytes not exported")


def _back_to_zero(server) -> None:
    until(lambda: server.service.payload.held == 0, "the payload budget to come back to 0")
    assert _held_metric(server) == 0


def _refused_for_room(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "payload_budget_bytes" in error.details(), error.details()
    assert dict(error.trailing_metadata()).get("retry-after-ms") == "100"


def test_large_calls_past_the_budget_are_refused_with_a_retry_hint_and_the_held_ones_answered(gated):
    server, gate = gated
    payload = server.service.payload
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = [_request("held", seed) for seed in range(2)]
        calls = [stub.ModelInfer.future(request, timeout=60) for request, _ in held]
        sizes = sum(request.ByteSize() for request, _ in held)
        until(lambda: payload.held == sizes, "both large calls to be charged")
        for seed in range(2, 6):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_request("held", seed)[0], timeout=30)
            _refused_for_room(refused.value)
        small, values = _request("free", 99, width=16)  # (not charged: the hot path passes a full budget)
        assert _answered(stub.ModelInfer(small, timeout=30), values)
        assert payload.held == sizes and payload.refused == 4
        gate.open()
        for call, (_, values) in zip(calls, held):
            assert _answered(call.result(), values)
    _back_to_zero(server)


def test_the_budget_comes_back_however_a_call_ends(gated):
    server, gate = gated
    payload = server.service.payload
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            # Failed after it was charged: an input the model does not have.
            wrong, _ = _request("held", 1)
            wrong.inputs[0].name = "y"
            with pytest.raises(grpc.RpcError) as failed:
                stub.ModelInfer(wrong, timeout=30)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
            _back_to_zero(server)
            # Cancelled by its caller while queued behind the held batch.
            call = stub.ModelInfer.future(_request("held", 2)[0], timeout=60)
            until(lambda: payload.held > 0, "the call to be charged")
            call.cancel()
            _back_to_zero(server)
            # Past its deadline while queued.
            with pytest.raises(grpc.RpcError) as late:
                stub.ModelInfer(_request("held", 3)[0], timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.value.details()
            _back_to_zero(server)
            # A stream closed with its large requests unanswered.
            stream = stub.ModelStreamInfer(iter([_request("held", 4)[0], _request("held", 5)[0]]), timeout=60)
            until(lambda: payload.held > 2 * WIDTH * 4, "the stream's two requests to be charged")
            stream.cancel()
            _back_to_zero(server)
        # Answered, streams too, once the batches may run.
        gate.open()
        for seed in range(3):
            request, values = _request("held", seed)
            assert _answered(stub.ModelInfer(request, timeout=30), values)
        requests = [_request("held", seed) for seed in range(2)]  # (both fit, held at once or not)
        answers = list(stub.ModelStreamInfer(iter(request for request, _ in requests), timeout=30))
        assert [answer.error_message for answer in answers] == ["", ""]
        assert all(_answered(answer.infer_response, values) for answer, (_, values) in zip(answers, requests))
    _back_to_zero(server)
    assert payload.refused == 0


def test_small_stream_requests_are_charged_by_their_decoded_strings(gated):
    """A ModelStreamInfer request of 10,000 one-byte strings is 50 KB on the wire, not charged by its bytes, but
    its decoded form holds ~2.5 MB (tensors.held_bytes): charged by that, so a second does not fit in 4 MiB."""
    server, gate = gated
    payload = server.service.payload
    request = pb.ModelInferRequest(model_name="strings")
    request.inputs.add(name="s", datatype="BYTES", shape=[1, 10_000])
    request.raw_input_contents.append(b"\x01\x00\x00\x00x" * 10_000)
    assert request.ByteSize() < 64 << 10
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = stub.ModelStreamInfer(iter([request, request]), timeout=60)
        until(lambda: payload.refused == 1, "the second request to be refused")
        assert payload.held > 2 << 20
        gate.open()
        first, second = list(answers)
    assert first.error_message == "" and len(first.infer_response.raw_output_contents[0]) == 50_000
    assert second.error_message.startswith("RESOURCE_EXHAUSTED: ") and "payload_budget_bytes" in second.error_message
    _back_to_zero(server)


def _strings(count: int = 10_000) -> pb.ModelInferRequest:
    """``count`` one-byte strings: 5 bytes each on the wire, ~250 decoded (tensors.held_bytes)."""
    request = pb.ModelInferRequest(model_name="strings")
    request.inputs.add(name="s", datatype="BYTES", shape=[1, count])
    request.raw_input_contents.append(b"\x01\x00\x00\x00x" * count)
    return request


def test_small_unary_requests_are_charged_by_their_decoded_form(gated):
    """A ModelInfer of at most 64 KiB on the wire whose decoded form is large (10,000 one-byte strings: 50 KB sent,
    ~2.5 MB held; 60,000 small INT64 typed contents: 60 KB sent, ~1 MB held) is charged by that form until its
    call ends: a second such string call does not fit in 4 MiB; a tiny raw request still passes."""
    server, gate = gated
    payload = server.service.payload
    request = _strings()
    assert request.ByteSize() < 64 << 10
    ints = pb.ModelInferRequest(model_name="ints")
    ints.inputs.add(name="i", datatype="INT64", shape=[1, 60_000]).contents.int64_contents.extend([1] * 60_000)
    assert ints.ByteSize() < 64 << 10
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer.future(request, timeout=60)
        until(lambda: payload.held > 2 << 20, "the decoded strings to be charged")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        _refused_for_room(refused.value)
        small, values = _request("free", 7, width=16)
        assert _answered(stub.ModelInfer(small, timeout=30), values)
        strings_held = payload.held
        typed = stub.ModelInfer.future(ints, timeout=60)
        until(lambda: payload.held > strings_held + (480 << 10), "the decoded typed contents to be charged")
        gate.open()
        assert len(first.result().raw_output_contents[0]) == 50_000
        assert np.array_equal(np.frombuffer(typed.result().raw_output_contents[0], np.int64), np.ones(60_000))
    _back_to_zero(server)
    assert payload.refused == 1


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_a_large_call_is_charged_until_its_answer_is_sent(front_end, tmp_path):
    """A charged ModelInfer holds its charge until its call ends, after its answer (as large as its request, here)
    is sent, not only until its handler returns: on grpc.aio it was given back before the answer was serialized.
    An injected probe (not a fault) reads the budget as each ModelInfer answer is serialized for sending."""
    from kernel.api import registration

    onnx_models.save(onnx_models.identity([("x", "FP32", (None,))]), tmp_path / "free" / "1" / "model.onnx")
    budgets, held_at_send = [], []

    def probed_serializer(message):  # the injected probe
        if type(message) is pb.ModelInferResponse:
            held_at_send.append(budgets[0].held)
        return message if type(message) is bytes else message.SerializeToString()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registration, "_passed_through", probed_serializer)
        patch.setattr(registration, "SERIALIZED_OUTPUTS", {*registration.SERIALIZED_OUTPUTS, "ModelInferResponse"})
        server = start_kernel(tmp_path, front_end, payload_budget_bytes=BUDGET, metrics_port=free_port())
    budgets.append(server.service.payload)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            small, values = _request("free", 1, width=16)
            assert _answered(stub.ModelInfer(small, timeout=30), values)
            large, values = _request("free", 2)
            assert _answered(stub.ModelInfer(large, timeout=30), values)
        assert held_at_send == [0, large.ByteSize()]
        _back_to_zero(server)
    finally:
        server.stop(grace=1)


def test_small_unary_requests_are_charged_by_their_parameters(gated):
    """A ModelInfer of ~50 KB carrying 4,000 parameters (the request's, its input's and its output's) holds
    ~640 KB parsed, each parameter a map entry in upb: charged by that while its call lasts."""
    server, gate = gated
    payload = server.service.payload
    request, values = _request("held", 3, width=16)
    for i in range(1500):
        request.parameters[f"k{i}"].bool_param = True
        request.inputs[0].parameters[f"k{i}"].bool_param = True
    output = request.outputs.add(name="x_out")
    for i in range(1000):
        output.parameters[f"k{i}"].bool_param = True
    assert request.ByteSize() < 64 << 10
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, timeout=60)
        until(lambda: payload.held >= 4000 * 150, "the parameters to be charged")
        gate.open()
        assert _answered(call.result(), values)
    _back_to_zero(server)


def test_calls_in_flight_at_a_stop_give_their_budget_back(gated):
    server, gate = gated
    payload = server.service.payload
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    calls = [stub.ModelInfer.future(_request("held", seed)[0], timeout=60) for seed in range(2)]
    until(lambda: payload.held > 2 * WIDTH * 4, "both calls to be charged")
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 0.5})
    stopping.start()
    until(lambda: server.draining, "the stop to begin")
    gate.open()  # (the lane's batches finish or are cut; either way nothing is held once the stop is over)
    stopping.join(30)
    for call in calls:
        call.exception(timeout=30)  # (answered or cut: only that the call ended)
    channel.close()
    assert payload.held == 0


def _inferred(server, model: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return stats.model_stats[0].inference_count


@pytest.mark.parametrize("ends_by", ["cancel", "stop"])
def test_a_stream_whose_client_stops_reading_stays_charged_until_it_ends(gated, ends_by):
    """A ModelStreamInfer whose client sends two large requests and reads nothing: both run, and their answers wait
    in the kernel for the client (its window, without BDP probing, is 64 KiB). Each request stays charged until its
    answer goes out, so the answers held are (an identity model's answer is its request's size): a large call from
    another client is refused meanwhile. Cancelled, or the kernel stopped, everything comes back, once."""
    server, gate = gated
    gate.open()
    payload = server.service.payload
    requests = [_request("free", seed)[0] for seed in range(2)]
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)])
    try:
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=60)
        until(lambda: _inferred(server, "free") == 2, "both requests to run")
        assert payload.held == sum(request.ByteSize() for request in requests)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as other:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.GRPCInferenceServiceStub(other).ModelInfer(_request("free", 9)[0], timeout=30)
            _refused_for_room(refused.value)
        if ends_by == "cancel":
            stream.cancel()
            _back_to_zero(server)
        else:
            server.stop(grace=0.5)
            assert payload.held == 0  # (not below: each charge given back once)
    finally:
        channel.close()


def test_a_burst_of_large_calls_is_answered_or_refused_with_a_hint_and_nothing_stays_held(gated):
    server, gate = gated
    gate.open()
    payload = server.service.payload
    outcomes = {"answered": 0, "refused": 0}
    lock = threading.Lock()

    def client(n: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for k in range(4):
                request, values = _request("held", n * 10 + k)
                try:
                    response = stub.ModelInfer(request, timeout=60)
                except grpc.RpcError as error:
                    _refused_for_room(error)
                    outcome = "refused"
                else:
                    assert _answered(response, values), f"call {n}/{k}: someone else's answer"
                    outcome = "answered"
                with lock:
                    outcomes[outcome] += 1
            requests = [_request("held", n * 10 + k) for k in range(4, 7)]
            answers = list(stub.ModelStreamInfer(iter(request for request, _ in requests), timeout=60))
            assert len(answers) == len(requests)
            for answer, (_, values) in zip(answers, requests):
                if answer.error_message:
                    assert answer.error_message.startswith("RESOURCE_EXHAUSTED: "), answer.error_message
                    assert "payload_budget_bytes" in answer.error_message
                    outcome = "refused"
                else:
                    assert _answered(answer.infer_response, values)
                    outcome = "answered"
                with lock:
                    outcomes[outcome] += 1

    with ThreadPoolExecutor(12) as pool:
        for future in [pool.submit(client, n) for n in range(12)]:
            future.result()
    assert outcomes["answered"] + outcomes["refused"] == 12 * 7
    assert outcomes["refused"] == payload.refused
    _back_to_zero(server)


def test_payload_budget_bytes_is_bounded():
    from kernel.config import SettingsError, load_settings

    for value in (0, (1 << 20) - 1, (1 << 40) + 1):
        with pytest.raises(SettingsError, match="payload_budget_bytes"):
            load_settings(None, {"payload_budget_bytes": value}, environ={})
    assert load_settings(None, {}, environ={}).payload_budget_bytes == 1 << 30


def _gated_claims_kernel(tmp_path, gate: _Gate, front_end: str, answer_later: bool, held_model: bool = False):
    """A claims kernel with a 1 MiB payload budget whose model runs wait at ``gate`` (the injected fault; ``held``,
    an identity model, beside it if ``held_model``): (server, a claim, ``large(request_id)`` — that claim with a
    100 KiB text field, charged)."""
    from claims_support import build_small_model, claim_request
    from conftest import start_claims_kernel
    from examples.claims import data

    models = build_small_model(tmp_path / "models", provider="cpu")
    if held_model:
        onnx_models.save(onnx_models.identity([("x", "FP32", (None,))]), models / "held" / "1" / "model.onnx")
    case = data.generate_cases(1, seed=5)[0]

    def large(request_id: str):
        request = claim_request(case, request_id=request_id)
        request.text_fields["notes"] = "n" * (100 << 10)
        return request

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel.server, "run_batch", gate.run_batch)
        patch.setattr(frontends, "INLINE_MAX_NS", 0)
        server = start_claims_kernel(models, tmp_path, front_end=front_end, lane_slots=4, answer_later=answer_later,
                                     payload_budget_bytes=1 << 20, metrics_port=free_port())
    return server, case, large


@pytest.mark.parametrize("front_end,answer_later", [("sync", True), ("sync", False), ("aio", True)],
                         ids=["sync-pumped", "sync-threads", "aio"])
def test_decide_and_start_task_share_the_budget(front_end, answer_later, tmp_path):
    """A Decide, DecideStream request or StartTask over 64 KiB (a long text field) is charged too: refused with
    the hint while a held ModelInfer fills the budget (one request larger than it is taken while nothing else is
    held), answered once it is given back; a small Decide passes all along; a DecideStream closed with large
    requests queued gives back what they held."""
    from claims_support import claim_request
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    gate = _Gate()
    server, case, large = _gated_claims_kernel(tmp_path, gate, front_end, answer_later, held_model=True)
    payload = server.service.payload
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            tasks = kgrpc.TaskServiceStub(channel)
            filler = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(_request("held", 0)[0], timeout=60)
            until(lambda: payload.held > 1 << 20, "the large ModelInfer to fill the budget")
            for call in (lambda: decisions.Decide(large("d1"), timeout=30),
                         lambda: tasks.StartTask(kpb.StartTaskRequest(request=large("t1")), timeout=30)):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                _refused_for_room(refused.value)
            answers = list(decisions.DecideStream(iter([large("s1"), claim_request(case, request_id="s2")]),
                                                  timeout=30))
            assert [a.error_code for a in answers] == ["RESOURCE_EXHAUSTED", ""], [a.error_message for a in answers]
            assert answers[0].retry_after_ms == 100 and "payload_budget_bytes" in answers[0].error_message
            assert decisions.Decide(claim_request(case, request_id="small"), timeout=30).action
            gate.open()
            filler.result()
            _back_to_zero(server)
            assert decisions.Decide(large("d2"), timeout=30).request_id == "d2"
            assert tasks.StartTask(kpb.StartTaskRequest(request=large("t2")), timeout=30).task_id
            answers = list(decisions.DecideStream(iter([large("s3"), large("s4")]), timeout=30))
            assert sorted(a.request_id for a in answers if not a.error_code) == ["s3", "s4"]
            _back_to_zero(server)
            # A stream closed while its large requests wait for the model.
            gate.shut("claims_triage")
            closed = threading.Event()

            def requests():
                yield large("s5")
                yield large("s6")
                closed.wait(60)

            stream = decisions.DecideStream(requests(), timeout=60)
            until(lambda: payload.held >= 2 * (100 << 10), "the stream's two requests to be charged")
            stream.cancel()
            closed.set()
            _back_to_zero(server)
            gate.open()
        _back_to_zero(server)
        assert payload.refused == 3
    finally:
        gate.open()
        server.stop(grace=1)


@pytest.mark.parametrize("front_end,answer_later", [("sync", True), ("sync", False), ("aio", True)],
                         ids=["sync-pumped", "sync-threads", "aio"])
def test_decisions_in_flight_at_a_stop_give_their_budget_back(front_end, answer_later, tmp_path):
    """A large Decide and a DecideStream whose client reads nothing, their requests charged and held by the model
    (the injected gate), when the kernel stops: each charge comes back exactly once (the gauge is 0, not below)."""
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    gate = _Gate()
    gate.shut("claims_triage")
    server, _, large = _gated_claims_kernel(tmp_path, gate, front_end, answer_later)
    payload = server.service.payload
    closed = threading.Event()

    def requests():
        yield large("s1")
        yield large("s2")
        closed.wait(60)

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        decisions = kgrpc.DecisionServiceStub(channel)
        unary = decisions.Decide.future(large("d1"), timeout=60)
        stream = decisions.DecideStream(requests(), timeout=60)  # (never read)
        until(lambda: payload.held >= 3 * (100 << 10), "the three large requests to be charged")
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 0.5})
        stopping.start()
        until(lambda: server.draining, "the stop to begin")
        gate.open()  # (the batches finish or are cut; either way nothing is held once the stop is over)
        stopping.join(30)
        assert not stopping.is_alive(), "the stop did not finish"
        closed.set()
        unary.exception(timeout=30)  # (answered or cut: only that the call ended)
        stream.cancel()
        assert payload.held == 0
    finally:
        closed.set()
        gate.open()
        channel.close()
        server.stop(grace=1)
