"""Many concurrent decisions, unary and streamed, against the finisher thread and the background review rows.

Every call is answered exactly once with its own decision; every escalated
answer's review can be claimed by the very next call the client makes (the
review queue stores queued rows before it reads); the audit log holds one
verified record per decision; a clean stop leaves nothing to reopen.
"""

from __future__ import annotations

import threading

import grpc

from claims_support import claim_request
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import verify_directory

THREADS = 12
PER_THREAD = 25
STREAMED = 120


def test_concurrent_unary_and_streamed_decisions_each_find_their_review(claims_kernel):
    cases = data.generate_cases(THREADS * PER_THREAD + STREAMED, seed=41)
    address = f"127.0.0.1:{claims_kernel.port}"
    audit_before = claims_kernel.decisions.audit.size
    answered: dict[str, kpb.Decision] = {}
    claimed: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()

    def unary(k: int) -> None:
        with grpc.insecure_channel(address) as channel:
            decide = kgrpc.DecisionServiceStub(channel).Decide
            reviews = kgrpc.ReviewServiceStub(channel)
            for i in range(PER_THREAD):
                request_id = f"u{k}-{i}"
                decision = decide(claim_request(cases[k * PER_THREAD + i], request_id=request_id), timeout=30)
                if decision.request_id != request_id:
                    problems.append(f"{request_id} got the answer for {decision.request_id}")
                if decision.review_id:  # the next call must find it, whatever else is in flight
                    review = reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=decision.review_id,
                                                                        reviewer=f"r{k}"), timeout=30)
                    if review.state != "CLAIMED" or review.proposed.audit_sequence != decision.audit_sequence:
                        problems.append(f"{request_id}: review {review.state} for #{review.proposed.audit_sequence}")
                    with lock:
                        claimed.append(decision.review_id)
                with lock:
                    answered[request_id] = decision

    def streamed() -> None:
        with grpc.insecure_channel(address) as channel:
            requests = [claim_request(case, request_id=f"s{i}") for i, case in enumerate(cases[-STREAMED:])]
            for decision in kgrpc.DecisionServiceStub(channel).DecideStream(iter(requests), timeout=60):
                with lock:
                    if decision.error_code:
                        problems.append(f"{decision.request_id}: {decision.error_code} {decision.error_message}")
                    answered[decision.request_id] = decision

    workers = [threading.Thread(target=unary, args=(k,)) for k in range(THREADS)] + [threading.Thread(target=streamed)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not problems, problems[:5]
    assert len(answered) == THREADS * PER_THREAD + STREAMED
    assert claimed, "no decision escalated"
    sequences = [d.audit_sequence for d in answered.values()]
    assert len(set(sequences)) == len(sequences)  # one record each
    engine = claims_kernel.decisions.engine
    assert engine.finisher.items >= THREADS * PER_THREAD  # unary and streamed decisions went through the finisher
    # Decisions and claims are recorded; every escalation's row is stored once the queue has settled.
    with grpc.insecure_channel(address) as channel:
        listed = kgrpc.ReviewServiceStub(channel).ListReviews(
            kpb.ListReviewsRequest(pipeline="claims_triage", page_size=1000), timeout=30)
    ids = {review.review_id for review in listed.reviews}
    escalated = {d.review_id for d in answered.values() if d.review_id}
    assert escalated <= ids
    assert engine.recorded_before() == claims_kernel.decisions.audit.size >= audit_before + len(answered)
    assert verify_directory(claims_kernel.decisions.audit.directory).ok


def test_every_decide_in_flight_reaches_the_lane_without_a_thread_each(claims_kernel, monkeypatch):
    """More Decides than any worker-thread pool holds (asyncio's default has at most 32) are all queued in the
    lane at once: on grpc.aio a Decide waits on the event loop, not on a thread (kernel/api/decision_service.py);
    on the threaded front end it is answered later by the finisher (kernel/api/answer_later.py), and at most
    the one thread running the held batch is busy."""
    from kernel.models.runtime import OnnxModel
    release = threading.Event()
    run = OnnxModel.run
    held_rows: list[int] = []

    def held_run(self, feeds, options=None):  # the injected fault: the claims model waits until released
        held_rows.append(len(next(iter(feeds.values()))))
        release.wait(30)
        return run(self, feeds, options)

    monkeypatch.setattr(OnnxModel, "run", held_run)
    calls = 40
    cases = data.generate_cases(calls, seed=43)
    mv = claims_kernel.hub.get("claims_triage")
    lane = claims_kernel.lanes.for_model(mv)
    with grpc.insecure_channel(f"127.0.0.1:{claims_kernel.port}") as channel:
        decide = kgrpc.DecisionServiceStub(channel).Decide
        try:
            futures = [decide.future(claim_request(case, request_id=f"held-{i}"), timeout=60)
                       for i, case in enumerate(cases)]
            seen = 0
            for _ in range(3000):  # up to ~30 s: every call prepared and queued or running
                queued, _ = lane.load(mv)
                seen = max(seen, queued + sum(held_rows))
                if seen >= calls:
                    busy_threads = claims_kernel._pool.in_progress() if claims_kernel._pool else 0
                    break
                threading.Event().wait(0.01)
        finally:
            release.set()
        answers = [f.result() for f in futures]
    assert seen >= calls, f"only {seen} of {calls} decisions reached the lane at once"
    if claims_kernel.front_end == "sync":
        assert busy_threads <= 1, f"{busy_threads} handler threads held by decisions waiting in the lane"
    assert sorted(a.request_id for a in answers) == sorted(f"held-{i}" for i in range(calls))
