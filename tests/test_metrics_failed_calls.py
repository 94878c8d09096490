"""aios_calls_failed_total: every call the kernel answers with an error status, and every request inside a stream
answered with an error, by method and gRPC code, as the clients saw them.

A statistics audit: refusals before a model or pipeline was reached (a request that does not parse, names no model
or pipeline, an unknown task or review, a bad audit filter, a full stream budget) and every failure of the task,
review, audit and admin services were in no counter: a kernel answering nothing but errors looked idle on the
dashboard. Real kernels on both front ends, real gRPC calls, the endpoint scraped and parsed."""

from __future__ import annotations

import collections
import threading

import grpc
import pytest
from claims_support import UNSURE_CASE, claim_request
from conftest import free_port, start_claims_kernel, start_kernel
from test_metrics_endpoint import WINDOWED_TOML, _row, scrape, value

from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as ipb
from kernel._proto.inference import grpc_service_pb2_grpc as igrpc
from kernel.testing import onnx_models

TIMEOUT_S = 30


def _elsewhere(request: kpb.DecisionRequest) -> kpb.DecisionRequest:
    request.pipeline = "no_such_pipeline"
    return request


def _code(call) -> str:
    """The status a call ended with, by name ("OK" if it succeeded)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def _item_codes_of_decide_stream(stub, requests) -> list[str]:
    return [answer.error_code for answer in stub.DecideStream(iter(requests), timeout=TIMEOUT_S) if answer.error_code]


def _item_codes_of_model_stream(stub, requests) -> list[str]:
    return [answer.error_message.partition(":")[0] for answer in stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S)
            if answer.error_message]


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_every_error_a_client_sees_is_counted_by_method_and_code(claims_models, tmp_path, front_end):
    server = start_claims_kernel(claims_models, tmp_path, front_end=front_end, metrics_port=free_port())
    seen: collections.Counter = collections.Counter()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            tasks, reviews = kgrpc.TaskServiceStub(channel), kgrpc.ReviewServiceStub(channel)
            audit, inference = kgrpc.AuditServiceStub(channel), igrpc.GRPCInferenceServiceStub(channel)
            garbage = channel.unary_unary("/aios.kernel.v1.DecisionService/Decide")  # (bytes as they come)
            calls = {
                "DecisionService.Decide": [
                    lambda: decisions.Decide(_elsewhere(claim_request(UNSURE_CASE)), timeout=TIMEOUT_S),
                    lambda: decisions.Decide(claim_request(dict(UNSURE_CASE, claim_amount="many")), timeout=TIMEOUT_S),
                    lambda: garbage(b"\xff\xff\xff", timeout=TIMEOUT_S),
                    lambda: decisions.Decide(claim_request(UNSURE_CASE), timeout=TIMEOUT_S),  # (OK: not counted)
                ],
                "TaskService.GetTask": [lambda: tasks.GetTask(kpb.TaskRef(task_id="no-such-task"), timeout=TIMEOUT_S)],
                "TaskService.CancelTask": [lambda: tasks.CancelTask(kpb.TaskRef(task_id=""), timeout=TIMEOUT_S)],
                "ReviewService.GetReview": [
                    lambda: reviews.GetReview(kpb.ReviewRef(review_id="no-such-review"), timeout=TIMEOUT_S)],
                "ReviewService.ListReviews": [
                    lambda: reviews.ListReviews(kpb.ListReviewsRequest(state="DONE"), timeout=TIMEOUT_S)],
                "AuditService.StreamAudit": [lambda: list(audit.StreamAudit(
                    kpb.StreamAuditRequest(tenant="\x00"), timeout=TIMEOUT_S))],
                "AuditService.GetInclusionProof": [lambda: audit.GetInclusionProof(
                    kpb.InclusionProofRequest(sequence=10**12), timeout=TIMEOUT_S)],
                "GRPCInferenceService.ModelInfer": [
                    lambda: inference.ModelInfer(ipb.ModelInferRequest(model_name="no_such_model"), timeout=TIMEOUT_S),
                    lambda: inference.ModelInfer(ipb.ModelInferRequest(model_name="claims_triage"), timeout=TIMEOUT_S),
                ],
                "GRPCInferenceService.ModelMetadata": [lambda: inference.ModelMetadata(
                    ipb.ModelMetadataRequest(name="no_such_model"), timeout=TIMEOUT_S)],
            }
            for method, made in calls.items():
                for call in made:
                    code = _code(call)
                    if code != "OK":
                        seen[method, code] += 1
            for code in _item_codes_of_decide_stream(decisions, [
                    _elsewhere(claim_request(UNSURE_CASE)), claim_request(UNSURE_CASE),
                    claim_request(dict(UNSURE_CASE, claim_amount="many"))]):
                seen["DecisionService.DecideStream", code] += 1
            for code in _item_codes_of_model_stream(inference, [
                    ipb.ModelInferRequest(model_name="no_such_model", id="a"),
                    ipb.ModelInferRequest(model_name="claims_triage", id="b")]):
                seen["GRPCInferenceService.ModelStreamInfer", code] += 1
        got = scrape(server.metrics_port)
    finally:
        server.stop(grace=0)
    # Every call above failed (but the one good Decide and stream item), each method at least once.
    assert {method for method, _ in seen} == set(calls) | {"DecisionService.DecideStream",
                                                           "GRPCInferenceService.ModelStreamInfer"}
    assert seen["DecisionService.DecideStream", "NOT_FOUND"] == 1 and "INTERNAL" not in {c for _, c in seen}, seen
    counted = {(dict(labels)["method"], dict(labels)["code"]): count for (name, labels), count in got["samples"].items()
               if name == "aios_calls_failed_total"}
    assert counted == dict(seen)
    # Names the clients made up (a model, a pipeline, a tenant) are in no series: labels stay bounded.
    assert not [labels for _, labels in got["samples"] for _, text in labels if "no_such" in text or "\x00" in text]
    family = next(f for f in got["families"] if f.name == "aios_calls_failed")
    assert family.type == "counter" and family.documentation


def test_a_decide_stream_the_stream_budget_refuses_is_counted(claims_models, tmp_path):
    """RESOURCE_EXHAUSTED at admission: a second DecideStream past max_streams = 1 (the threaded front end's stream
    pump refuses it inside gRPC, not in a handler)."""
    server = start_claims_kernel(claims_models, tmp_path, front_end="sync", metrics_port=free_port(), max_streams=1)
    release = threading.Event()

    def held():  # an open stream that sends one request and waits
        yield claim_request(UNSURE_CASE)
        release.wait(TIMEOUT_S)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            decisions = kgrpc.DecisionServiceStub(channel)
            first = decisions.DecideStream(held(), timeout=TIMEOUT_S)
            next(first)  # (its first answer: the stream holds its place)
            code = _code(lambda: list(decisions.DecideStream(iter([claim_request(UNSURE_CASE)]), timeout=TIMEOUT_S)))
            assert code == "RESOURCE_EXHAUSTED"
            got = scrape(server.metrics_port)
            release.set()
            list(first)
        assert value(got, "aios_calls_failed_total", method="DecisionService.DecideStream",
                     code="RESOURCE_EXHAUSTED") == 1
    finally:
        release.set()
        server.stop(grace=0)


def test_calls_a_stop_refuses_are_counted_and_a_scrape_during_the_stop_answers(model_repo, monkeypatch):
    from kernel.api.entry_gate import REFUSAL

    server = start_kernel(model_repo, "sync", metrics_port=free_port())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    ready = igrpc.GRPCInferenceServiceStub(channel).ModelReady
    scraped = []
    real_refuse = type(server)._refuse_new_calls

    def refuse_then_call_and_scrape(self, limit_s) -> None:  # while the gate refuses, before gRPC's stop
        real_refuse(self, limit_s)
        with pytest.raises(grpc.RpcError) as refused:
            ready(ipb.ModelReadyRequest(name="tiny"), timeout=TIMEOUT_S)
        assert refused.value.details() == REFUSAL
        scraped.append(scrape(server.metrics_port))

    monkeypatch.setattr(type(server), "_refuse_new_calls", refuse_then_call_and_scrape)
    try:
        server.stop(grace=1)
    finally:
        channel.close()
    (got,) = scraped
    assert value(got, "aios_calls_refused_while_stopping_total") == 1
    assert value(got, "aios_draining") == 1
    assert not [key for key in got["samples"] if key[0] == "aios_calls_failed_total"]  # (not counted twice)


def test_a_call_the_stopped_handler_pool_refuses_is_counted_as_refused_by_the_stop(model_repo):
    """A call that passed the entry gate but reaches the handler pool once it is shut down (its request came
    late in the stop) is refused as the gate refuses, and counted with the stop's refusals, not as a failure."""
    from kernel.api.entry_gate import REFUSAL

    server = start_kernel(model_repo, "sync", metrics_port=free_port())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        server._pool.shutdown(wait=False)  # injected: the pool's stop reached before this call's hand-off
        with pytest.raises(grpc.RpcError) as refused:
            igrpc.GRPCInferenceServiceStub(channel).ModelReady(ipb.ModelReadyRequest(name="tiny"), timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == REFUSAL
        assert dict(refused.value.trailing_metadata()).get("aios-not-decided") == "1"
        got = scrape(server.metrics_port)
        assert value(got, "aios_calls_refused_while_stopping_total") == 1
        assert not [key for key in got["samples"] if key[0] == "aios_calls_failed_total"]  # (not counted twice)
    finally:
        channel.close()
        server.stop(grace=0)


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_a_model_call_that_fails_after_it_was_queued_is_counted(tmp_path, front_end):
    """DEADLINE_EXCEEDED for a request whose deadline passed in the queue: answered later, by the expiry timer on
    the threaded front end (answer_later.py), not by the handler."""
    import tritonclient.grpc as tc

    onnx_models.save(onnx_models.mlp([16, 8, 4], seed=2), tmp_path / "windowed" / "1" / "model.onnx")
    (tmp_path / "windowed" / "1" / "model.toml").write_text(WINDOWED_TOML)  # (a 1 s batching window)
    server = start_kernel(tmp_path, front_end, metrics_port=free_port())
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
        with pytest.raises(tc.InferenceServerException) as expired:
            client.infer("windowed", [_row()], timeout=300_000)  # (µs: 300 ms, well inside the window)
        assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        got = scrape(server.metrics_port)
        assert value(got, "aios_model_expired_total", model="windowed", version="1", where="queued") == 1
        assert value(got, "aios_calls_failed_total", method="GRPCInferenceService.ModelInfer",
                     code="DEADLINE_EXCEEDED") == 1
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_a_decide_stream_a_stop_ends_is_counted_on_either_front_end(claims_models, tmp_path, front_end, monkeypatch):
    """UNAVAILABLE (DRAINED) for an open DecideStream at a stop: the threaded front end's stream pump ends it inside
    gRPC, the asyncio one's handler raises it; both counted alike, read by a scrape taken during the stop."""
    from kernel.pipelines.stream_drains import DRAINED

    server = start_claims_kernel(claims_models, tmp_path, front_end=front_end, metrics_port=free_port())
    release = threading.Event()
    scraped = []
    real_refuse = type(server)._refuse_new_calls

    def scrape_then_refuse(self, limit_s) -> None:  # (after the streams were drained, before gRPC's stop)
        scraped.append(scrape(server.metrics_port))
        real_refuse(self, limit_s)

    monkeypatch.setattr(type(server), "_refuse_new_calls", scrape_then_refuse)

    def held():
        yield claim_request(UNSURE_CASE)
        release.wait(TIMEOUT_S)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = kgrpc.DecisionServiceStub(channel).DecideStream(held(), timeout=TIMEOUT_S)
            next(stream)  # (open, one request answered)
            stopping = threading.Thread(target=server.stop, kwargs={"grace": 5})
            stopping.start()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            release.set()
            stopping.join(TIMEOUT_S)
        assert (ended.value.code(), ended.value.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINED)
        (got,) = scraped  # (the endpoint still answered during the stop ...)
        assert value(got, "aios_calls_failed_total", method="DecisionService.DecideStream", code="UNAVAILABLE") in (0, 1)
        # ... but on grpc.aio the stream's end is counted on the event loop as it sends the status, which that scrape
        # may come before (1 failed run in 3 on a busy machine): read once the client has seen the end, counted by then.
        assert server.service.refusals.snapshot().get(("DecisionService.DecideStream", "UNAVAILABLE")) == 1
    finally:
        release.set()
        server.stop(grace=0)


def test_a_unary_call_sent_without_its_request_is_counted(model_repo):
    """A client that half-closes a unary call with no message: the threaded front end's early receive
    (eager_receive.py) answers it before any handler runs, as gRPC does (UNIMPLEMENTED: "requires exactly one
    request message"); counted under its method all the same."""
    server = start_kernel(model_repo, "sync", metrics_port=free_port())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            no_message = channel.stream_unary("/aios.kernel.v1.TaskService/GetTask")  # (the wrong arity on purpose)
            assert _code(lambda: no_message(iter(()), timeout=TIMEOUT_S)) == "UNIMPLEMENTED"
        assert value(scrape(server.metrics_port), "aios_calls_failed_total", method="TaskService.GetTask",
                     code="UNIMPLEMENTED") == 1
    finally:
        server.stop(grace=0)


def test_a_pumped_answer_found_late_at_its_send_is_counted(claims_models, tmp_path, monkeypatch):
    """(A review) the threaded front end's stream pump counted an answer when it was made, and checked its deadline
    again only when its turn to be sent came (``_Stream._in_time``): one that went out DEADLINE_EXCEEDED from there
    was seen by the client and in ``aios_decisions_total{outcome="late"}``, never in aios_calls_failed_total (the
    other front end counts it where it is sent, ``stream._in_time``)."""
    from test_decide_answered_late import TIMEOUT_MS, stall_the_first_send_s_completion

    from examples.claims import data

    server = start_claims_kernel(claims_models, tmp_path, front_end="sync", metrics_port=free_port())
    try:
        assert server._pump is not None  # (this is the pump's path)
        requests = [claim_request(case, request_id=f"queued-{n}", timeout_ms=TIMEOUT_MS)
                    for n, case in enumerate(data.generate_cases(2, seed=6))]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, monkeypatch.context() as patch:
            stall_the_first_send_s_completion(patch)
            codes = sorted(answer.error_code for answer in
                           kgrpc.DecisionServiceStub(channel).DecideStream(iter(requests), timeout=TIMEOUT_S))
        got = scrape(server.metrics_port)
    finally:
        server.stop(grace=0)
    assert codes == ["", "DEADLINE_EXCEEDED"], codes
    assert value(got, "aios_calls_failed_total", method="DecisionService.DecideStream", code="DEADLINE_EXCEEDED") == 1
