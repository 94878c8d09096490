"""A stop refuses the calls that arrive while it runs at their entry — UNAVAILABLE with ``aios-not-decided``,
not run — instead of letting gRPC's stop cut them CANCELLED (which a client neither retries nor can read:
was it decided?). Measured before (bench/RESULTS.md, "Calls cut CANCELLED at a stop"): 35-45 calls cut per
stop on the asyncio front end, 1-12 on the threaded one, with 48 clients sending."""

from __future__ import annotations

import threading

import grpc
import pytest
from claims_support import claim_request
from conftest import start_claims_kernel

from examples.claims.data import generate_cases
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel._proto.inference import grpc_service_pb2 as ipb
from kernel._proto.inference import grpc_service_pb2_grpc as igrpc
from kernel.api.entry_gate import REFUSAL
from kernel.audit.reader import iter_directory

TIMEOUT_S = 30
CASES = generate_cases(64, seed=7)


class Sender(threading.Thread):
    """Sends one kind of call in a closed loop until a call fails; keeps what every call was and how it ended."""

    def __init__(self, channel, kind: str, index: int, warmed: threading.Semaphore):
        super().__init__(daemon=True)
        self.kind, self.index, self.warmed = kind, index, warmed
        self.decide = kgrpc.DecisionServiceStub(channel).Decide
        self.start_task = kgrpc.TaskServiceStub(channel).StartTask
        self.list_reviews = kgrpc.ReviewServiceStub(channel).ListReviews
        self.model_ready = igrpc.GRPCInferenceServiceStub(channel).ModelReady
        self.decided: list[str] = []  # request ids answered OK (Decide) or accepted (StartTask)
        self.failure: grpc.RpcError | None = None
        self.failed_id = ""

    def _call(self, n: int) -> None:
        request_id = f"{self.kind}-{self.index}-{n}"
        self.failed_id = request_id
        if self.kind == "decide":
            self.decide(claim_request(CASES[n % len(CASES)], request_id=request_id), timeout=TIMEOUT_S)
            self.decided.append(request_id)
        elif self.kind == "task":
            self.start_task(kpb.StartTaskRequest(request=claim_request(CASES[n % len(CASES)], request_id=request_id)),
                            timeout=TIMEOUT_S)
            self.decided.append(request_id)
        elif self.kind == "reviews":
            self.list_reviews(kpb.ListReviewsRequest(page_size=5), timeout=TIMEOUT_S)
        else:
            self.model_ready(ipb.ModelReadyRequest(name="claims_triage"), timeout=TIMEOUT_S)

    def run(self) -> None:
        n = 0
        while True:
            try:
                self._call(n)
            except grpc.RpcError as exc:
                self.failure = exc
                if n == 0:
                    self.warmed.release()  # (the test then fails on this sender's first failure)
                return
            if n == 0:
                self.warmed.release()
            n += 1


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_calls_that_arrive_during_a_stop_are_refused_unavailable_not_cut_cancelled(claims_models, tmp_path,
                                                                                   front_end):
    server = start_claims_kernel(claims_models, tmp_path, front_end=front_end, task_workers=2)
    kinds = ["decide"] * 16 + ["task"] * 4 + ["reviews"] * 4 + ["ready"] * 4
    warmed = threading.Semaphore(0)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        senders = [Sender(channel, kind, i, warmed) for i, kind in enumerate(kinds)]
        for sender in senders:
            sender.start()
        for _ in senders:  # every sender has had one call answered (or failed) before the stop begins
            assert warmed.acquire(timeout=TIMEOUT_S)
        server.stop(grace=5)
        for sender in senders:
            sender.join(timeout=TIMEOUT_S)
            assert not sender.is_alive()

    endings = [(sender.kind, sender.failure.code(), dict(sender.failure.trailing_metadata() or ()),
                sender.failure.details()) for sender in senders]
    # Each sender's first failure is the gate's refusal, or (a sender slow to send again once the kernel had
    # been quiet) its connection refused after the stop: UNAVAILABLE either way, never a call cut CANCELLED.
    assert {code for _, code, _, _ in endings} == {grpc.StatusCode.UNAVAILABLE}, endings
    refused = [sender for sender in senders if sender.failure.details() == REFUSAL]
    assert refused and server.refused_while_stopping == len(refused), endings
    for sender in refused:  # the refusal says nothing was decided, so any client may send it again (not at once)
        trailers = dict(sender.failure.trailing_metadata())
        assert trailers["aios-not-decided"] == "1" and trailers["retry-after-ms"] == "1000"
    # Nothing answered OK is lost and nothing refused was decided: the audit log has exactly the former.
    recorded = {record.request_id for record in iter_directory(tmp_path / "data" / "audit")
                if record.kind == kpb.DECISION}
    decides = [sender for sender in senders if sender.kind == "decide"]
    assert {rid for sender in decides for rid in sender.decided} <= recorded
    assert not {sender.failed_id for sender in decides} & recorded


@pytest.mark.parametrize("front_end", ["sync", "aio"])
def test_once_the_gate_closes_every_kind_of_call_is_refused_before_it_runs(claims_models, tmp_path, front_end,
                                                                          monkeypatch):
    """Unary, server-streaming and bidirectional calls of every service alike; health still answers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import kernel.server

    monkeypatch.setattr(kernel.server, "REFUSAL_QUIET_S", 2.0)  # the gate stays closed while this test calls
    server = start_claims_kernel(claims_models, tmp_path, front_end=front_end)
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 3})
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        decide = kgrpc.DecisionServiceStub(channel)
        inference = igrpc.GRPCInferenceServiceStub(channel)
        reviews = kgrpc.ReviewServiceStub(channel)
        decide.Decide(claim_request(CASES[0], request_id="before"), timeout=TIMEOUT_S)
        stopping.start()
        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status == health_pb2.HealthCheckResponse.SERVING:
            pass  # (health turns NOT_SERVING as the stop begins; the gate closes after the lame-duck wait)
        calls = {
            "Decide": lambda rid: decide.Decide(claim_request(CASES[1], request_id=rid), timeout=TIMEOUT_S),
            "DecideStream": lambda rid: list(decide.DecideStream(iter([claim_request(CASES[2], request_id=rid)]),
                                                                 timeout=TIMEOUT_S)),
            "StartTask": lambda rid: kgrpc.TaskServiceStub(channel).StartTask(
                kpb.StartTaskRequest(request=claim_request(CASES[3], request_id=rid)), timeout=TIMEOUT_S),
            "WatchReviews": lambda rid: next(reviews.WatchReviews(kpb.WatchReviewsRequest(), timeout=TIMEOUT_S)),
            "ModelReady": lambda rid: inference.ModelReady(ipb.ModelReadyRequest(name="claims_triage"),
                                                           timeout=TIMEOUT_S),
            "ModelStreamInfer": lambda rid: list(inference.ModelStreamInfer(
                iter([ipb.ModelInferRequest(model_name="claims_triage")]), timeout=TIMEOUT_S)),
        }
        refusals, attempts = {}, 0
        while len(refusals) < len(calls):
            assert stopping.is_alive(), f"the stop ended; never refused: {sorted(set(calls) - set(refusals))}"
            for name, call in calls.items():
                if name in refusals:
                    continue
                closed = server._gate.closed  # (a call made before it closed may be answered, or refused otherwise)
                attempts += 1
                try:
                    call(f"during-{attempts}")
                except grpc.RpcError as exc:
                    if exc.details() == REFUSAL:
                        refusals[name] = (exc, f"during-{attempts}")
                    elif closed:
                        raise
                    continue
                assert not closed, name  # answered OK although the gate was closed
        health_answer = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status
    stopping.join(timeout=TIMEOUT_S)
    assert health_answer == health_pb2.HealthCheckResponse.NOT_SERVING
    for name, (exc, _) in refusals.items():
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, name
        assert dict(exc.trailing_metadata())["aios-not-decided"] == "1", name
    assert server.refused_while_stopping >= len(calls)
    recorded = {record.request_id for record in iter_directory(tmp_path / "data" / "audit")
                if record.kind == kpb.DECISION}
    assert "before" in recorded and not {request_id for _, request_id in refusals.values()} & recorded
