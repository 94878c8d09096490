"""What ``DecisionClient.decide(retries=N)`` sends again, against a real kernel (README "Retrying").

Found by a client audit (2026-11-27): an UNAVAILABLE that carries ``aios-audit-sequence`` (the decision was
recorded, its review could not be stored) was sent again like any UNAVAILABLE; nothing is kept under the key
for it, so every retry decided again. ``retries=-1`` ended in ``AssertionError: unreachable``.
"""

from __future__ import annotations

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel.decision_client import DecisionClient
from kernel.pipelines import group_finish
from test_decision_isolation import FailingReviews

server, channel = module_claims_kernel("client_retries")
LARGE = dict(data.generate_cases(1, seed=40)[0], claim_amount=75000.0)  # R04: a person decides


def _decisions_for(server, request_id: str) -> int:
    return sum(r.request_id == request_id for r in server.decisions.audit.read(from_sequence=0, kind=kpb.DECISION))


def test_a_recorded_decision_whose_review_failed_is_not_sent_again(server, monkeypatch):
    engine = server.decisions.engine
    monkeypatch.setattr(group_finish, "MAX_REVIEW_BACKLOG", 0)  # reviews stored before answers, as after an outage
    monkeypatch.setattr(engine.services, "reviews", FailingReviews(engine.services.reviews))  # the injected fault
    fields = {name: LARGE[name] for name in claim_request(LARGE).fields}
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        for key in ("", "recorded-once"):
            request_id = f"esc-{key or 'unkeyed'}"
            with pytest.raises(grpc.RpcError) as refused:
                client.decide("claims_triage", fields, tenant="acme", request_id=request_id, idempotency_key=key,
                              retries=5, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert dict(refused.value.trailing_metadata())["aios-audit-sequence"]
            assert _decisions_for(server, request_id) == 1  # decided once: no retry decided it again


def test_retries_must_be_a_count(server):
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(ValueError, match="retries must be an integer >= 0, got -1"):
            client.decide("claims_triage", {}, retries=-1)


class _CountedCalls(grpc.UnaryUnaryClientInterceptor):
    """Counts the Decide calls a client sends (its retries included)."""

    def __init__(self):
        self.sent = 0

    def intercept_unary_unary(self, continuation, details, request):
        self.sent += 1
        return continuation(details, request)


def _counted(client: DecisionClient) -> _CountedCalls:
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    counter = _CountedCalls()
    client.stub = kgrpc.DecisionServiceStub(grpc.intercept_channel(client.channel, counter))
    return counter


def test_an_unavailable_that_grpc_sent_ending_a_call_in_progress_is_sent_again_only_with_a_key(
        claims_models, tmp_path, monkeypatch):
    """The end of a drain's grace: gRPC ends a call still in progress with UNAVAILABLE ("Cancelling all calls"),
    and that call may have been decided. A docs audit found both clients sending it again, keyless (a second
    decision wherever the retry lands). Only an UNAVAILABLE the kernel marks ``aios-not-decided`` (or a channel
    that never reached a kernel) is safe to send again without a key."""
    import threading

    from conftest import start_claims_kernel
    from lane_support import hold_model_runs

    server = start_claims_kernel(claims_models, tmp_path)
    release, running = hold_model_runs(monkeypatch)  # the call's batch is held past the drain's grace
    fields = {name: LARGE[name] for name in claim_request(LARGE).fields}
    outcome = {}
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        counter = _counted(client)

        def decide():
            try:
                client.decide("claims_triage", fields, request_id="cut-at-grace", retries=3, timeout=30)
            except grpc.RpcError as error:
                outcome["error"] = error

        caller = threading.Thread(target=decide)
        caller.start()
        try:
            assert running.wait(30)
            server.stop(grace=0.5)  # the call is still in the model when the grace ends
        finally:
            release.set()
        caller.join(60)
    error = outcome["error"]
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "aios-not-decided" not in dict(error.trailing_metadata() or ())
    assert counter.sent == 1, f"sent {counter.sent} times after {error.details()!r}"


def test_the_kernels_own_unavailable_says_nothing_was_decided_and_is_sent_again(server, channel):
    """A pipeline whose model is not loaded: the kernel's UNAVAILABLE, before deciding anything, carries
    ``aios-not-decided``, and the client sends it again (keyless) as README "Retrying" says."""
    from kernel._proto.inference import grpc_service_pb2 as pb
    from kernel._proto.inference import grpc_service_pb2_grpc as pb_grpc

    repository = pb_grpc.GRPCInferenceServiceStub(channel)
    fields = {name: LARGE[name] for name in claim_request(LARGE).fields}
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        counter = _counted(client)
        repository.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="claims_triage"), timeout=30)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                client.decide("claims_triage", fields, request_id="not-loaded", retries=2, timeout=30)
        finally:
            repository.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="claims_triage"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert dict(refused.value.trailing_metadata())["aios-not-decided"] == "1"
        assert counter.sent == 3  # the first and both retries
        assert client.decide("claims_triage", fields, request_id="loaded-again", retries=5, timeout=30).action


# -- a client audit (session 24) ------------------------------------------------------------------------------------

def test_a_client_without_a_deadline_decides(server):
    """``DecisionClient(timeout=None)`` (README: "None: none") raised TypeError on every decide."""
    with DecisionClient(f"127.0.0.1:{server.port}", timeout=None) as client:
        assert client.decide("claims_triage", {"claim_amount": 800.0}).action
        assert client.decide("claims_triage", {"claim_amount": 800.0}, timeout=None).action


def test_grpcs_own_resource_exhausted_is_not_sent_again(server):
    """The client's receive limit refused an answer already decided (RESOURCE_EXHAUSTED, no hint): retried, the one
    request was decided four times. Only the kernel's RESOURCE_EXHAUSTED, with its retry-after-ms, is sent again."""
    with DecisionClient(f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 256)]) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.decide("claims_triage", {"claim_amount": 800.0}, request_id="tiny-receive", retries=3)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in info.value.details()
    assert _decisions_for(server, "tiny-receive") == 1


def test_a_negative_hint_is_no_hint():
    """(``time.sleep`` raised ValueError on a ``retry-after-ms: -5``.)"""
    from kernel.decision_client import retry_after_s

    class FakeRefusal:  # fault injected on purpose: a refusal whose trailer no kernel sends
        def trailing_metadata(self):
            return (("retry-after-ms", "-5"),)

    assert retry_after_s(FakeRefusal()) is None


def test_a_stream_left_early_is_cancelled_by_its_with(server):
    """A ``break`` left the stream running: every request sent was decided, no answer read (3,000 of 3,000)."""
    cases = data.generate_cases(64, seed=41)
    requests = [claim_request(cases[i % 64], request_id=f"left-{i}") for i in range(5000)]
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        with client.decide_stream(requests) as answers:
            for n, _ in enumerate(answers):
                if n == 9:
                    break
        with pytest.raises(grpc.RpcError) as info:
            next(answers)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert answers.code() == grpc.StatusCode.CANCELLED  # (gRPC's call methods, passed on)


def test_a_failing_request_iterable_ends_the_sending_and_is_raised_after_the_answers(server):
    """gRPC cut the stream with UNKNOWN "Exception iterating requests!", the cause lost with the answers."""
    cases = data.generate_cases(50, seed=42)

    def requests():
        for i, case in enumerate(cases):
            yield claim_request(case, request_id=f"gen-{i}")
        raise LookupError("the source of cases went away")

    answers = []
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(LookupError, match="the source of cases went away"):
            for answer in client.decide_stream(requests()):
                answers.append(answer.request_id)
    assert sorted(answers) == sorted(f"gen-{i}" for i in range(50))


def test_a_value_that_cannot_be_sent_names_its_field():
    from kernel.decision_client import make_request

    with pytest.raises(ValueError, match="field 'claim_amount': 10+ does not fit a 64-bit integer"):
        make_request("claims_triage", {"claim_amount": 10**30})
    with pytest.raises(ValueError, match="text field 'notes': not valid UTF-8 text"):
        make_request("claims_triage", {}, {"notes": "cut \ud83d"})
    with pytest.raises(TypeError, match="text field 'notes': must be a str, got int"):
        make_request("claims_triage", {}, {"notes": 5})


def test_an_item_that_is_no_request_ends_the_sending_and_is_raised_after_the_answers(server):
    """(A docs check: gRPC cut the stream with INTERNAL "Exception serializing request!", no answer delivered.)"""
    requests = [claim_request(case, request_id=f"item-{i}") for i, case in enumerate(data.generate_cases(5, seed=43))]
    answers = []
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(TypeError, match=r"requests\[5\] is a str, not a DecisionRequest"):
            for answer in client.decide_stream([*requests, "not a request"]):
                answers.append(answer.request_id)
    assert sorted(answers) == [f"item-{i}" for i in range(5)]


def test_a_page_of_reviews_larger_than_grpcs_default_limit_is_read(server):
    """The kernel pages reviews up to 16 MiB, but the clients kept gRPC's 4 MiB receive limit: RESOURCE_EXHAUSTED."""
    with DecisionClient(f"127.0.0.1:{server.port}") as client:
        for i in range(3):
            text = {"description": "é" * (2**19 - 10), "notes": "n" * (2**20 - 10)}
            decision = client.decide("claims_triage", {k: LARGE[k] for k in data.REQUEST_FIELDS}, text,
                                     tenant="bigtext", request_id=f"big-{i}")
            assert decision.outcome == kpb.ESCALATED
        page = client.reviews.ListReviews(kpb.ListReviewsRequest(tenant="bigtext", page_size=10), timeout=30)
    assert len(page.reviews) == 3 and page.ByteSize() > 4 * 2**20


def test_grpcs_refusal_past_the_threaded_front_ends_workers_is_sent_again(claims_models, tmp_path):
    """A review: once hintless RESOURCE_EXHAUSTED was no longer sent again, the busy threaded front end's usual
    answer — gRPC's "Concurrent RPC limit exceeded!" past `workers`, before the kernel saw the call — failed
    calls that used to succeed (1,668 of 1,920 at 64 threads and workers = 8)."""
    import threading

    from conftest import start_claims_kernel

    server = start_claims_kernel(claims_models, tmp_path, front_end="sync", workers=8)
    failures, done = [], []
    try:
        with DecisionClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            def send(i):
                for n in range(6):
                    try:
                        client.decide("claims_triage", {"claim_amount": 800.0}, request_id=f"busy-{i}-{n}",
                                      priority=1, retries=50)
                        done.append(1)
                    except grpc.RpcError as exc:
                        failures.append((exc.code(), exc.details()))

            threads = [threading.Thread(target=send, args=(i,)) for i in range(48)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    finally:
        server.stop(grace=1)
    assert not failures, failures[:3]
    assert len(done) == 48 * 6
