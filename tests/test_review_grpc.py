"""ReviewService over real gRPC (sync and grpc.aio): leases, claim-next, status codes, paging, SLA counts, watches.

Reviews are created in-process on the server's own queue, as the decision
layer does; everything else goes through gRPC stubs.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from _task_server import serve_task_kernel
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

TIMEOUT_S = 20


@pytest.fixture(scope="module", params=["sync", "aio"])
def kernel(request, tmp_path_factory):
    k, stop = serve_task_kernel(tmp_path_factory.mktemp(f"reviews-{request.param}"), request.param)
    yield k
    stop()
    k.close()


@pytest.fixture
def reviews(kernel):
    with grpc.insecure_channel(f"127.0.0.1:{kernel.port}") as channel:
        yield kgrpc.ReviewServiceStub(channel)


def escalate(kernel, pipeline: str, tenant: str = "acme", sla_seconds: float = 3600.0) -> kpb.Review:
    request = kpb.DecisionRequest(pipeline=pipeline, tenant=tenant)
    decision = kpb.Decision(action="approve", outcome=kpb.ESCALATED, pipeline=pipeline, tenant=tenant)
    return kernel.queue.create(decision, request, ["approve", "deny"], sla_seconds)


def failure(call, message) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(message, timeout=TIMEOUT_S)
    return info.value.code(), info.value.details()


def wait_until(predicate, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_leases_and_resolutions_answer_with_named_status_codes(kernel, reviews):
    rid = escalate(kernel, "leases").review_id
    claim = lambda who, lease=60: kpb.ClaimReviewRequest(review_id=rid, reviewer=who, lease_seconds=lease)  # noqa: E731
    resolve = lambda who, action: kpb.ResolveReviewRequest(review_id=rid, reviewer=who, action=action)  # noqa: E731
    S = grpc.StatusCode
    assert failure(reviews.ResolveReview, resolve("alice", "deny"))[0] == S.FAILED_PRECONDITION  # not claimed
    assert reviews.ClaimReview(claim("alice"), timeout=TIMEOUT_S).claimed_by == "alice"
    cases = [
        (reviews.ClaimReview, claim("bob"), S.FAILED_PRECONDITION, "claimed by alice until"),
        (reviews.ResolveReview, resolve("bob", "deny"), S.FAILED_PRECONDITION, "claimed by alice"),
        (reviews.ResolveReview, resolve("alice", "shrug"), S.INVALID_ARGUMENT, "action 'shrug' is not allowed"),
        (reviews.ResolveReview, resolve("alice", ""), S.INVALID_ARGUMENT, "action is required"),
        (reviews.ClaimReview, claim(""), S.INVALID_ARGUMENT, "reviewer is required"),
        (reviews.ClaimReview, claim("alice", 100_000), S.INVALID_ARGUMENT, "lease_seconds must be 0..86400"),
        (reviews.ClaimReview, kpb.ClaimReviewRequest(review_id="nope", reviewer="a"), S.NOT_FOUND, "review 'nope'"),
        (reviews.ResolveReview, kpb.ResolveReviewRequest(review_id="nope", reviewer="a", action="deny"), S.NOT_FOUND,
         "review 'nope' does not exist"),
        (reviews.ClaimReview, kpb.ClaimReviewRequest(reviewer="a"), S.INVALID_ARGUMENT, "review_id is required"),
    ]
    for call, message, code, text in cases:
        got_code, details = failure(call, message)
        assert (got_code, text in details) == (code, True), details
    done = reviews.ResolveReview(resolve("alice", "approve"), timeout=TIMEOUT_S)
    assert done.state == "RESOLVED" and done.resolution.action == "approve"
    code, details = failure(reviews.ResolveReview, resolve("bob", "deny"))
    assert code == S.FAILED_PRECONDITION and "already resolved (approve by alice)" in details


def test_list_pages_filters_and_counts_missed_slas(kernel, reviews):
    made = [escalate(kernel, "paging", tenant=("acme" if n % 2 else "globex")).review_id for n in range(7)]
    late = escalate(kernel, "paging", tenant="acme", sla_seconds=1e-9).review_id  # due 1 ns after creation
    acme = [rid for n, rid in enumerate(made) if n % 2] + [late]
    got, token, pages = [], "", 0
    while True:
        page = reviews.ListReviews(kpb.ListReviewsRequest(pipeline="paging", tenant="acme", page_size=2,
                                                          page_token=token), timeout=TIMEOUT_S)
        got += [r.review_id for r in page.reviews]
        pages += 1
        assert page.sla_missed == 1
        token = page.next_page_token
        if not token:
            break
    assert got == acme and pages == 2
    assert [r.sla_missed for r in reviews.ListReviews(kpb.ListReviewsRequest(pipeline="paging", tenant="acme"),
                                                      timeout=TIMEOUT_S).reviews] == [False] * 3 + [True]
    S = grpc.StatusCode
    code, details = failure(reviews.ListReviews, kpb.ListReviewsRequest(page_token="not-a-token"))
    assert code == S.INVALID_ARGUMENT and "page_token" in details
    token = reviews.ListReviews(kpb.ListReviewsRequest(pipeline="paging", page_size=1), timeout=TIMEOUT_S).next_page_token
    code, details = failure(reviews.ListReviews, kpb.ListReviewsRequest(pipeline="other", page_token=token))
    assert code == S.INVALID_ARGUMENT and "other filters" in details
    code, details = failure(reviews.ListReviews, kpb.ListReviewsRequest(state="LOST"))
    assert code == S.INVALID_ARGUMENT and "state must be one of" in details


def test_get_review_answers_one_review_as_the_list_shows_it(kernel, reviews):
    rid = escalate(kernel, "get-one", tenant="acme").review_id
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=rid, reviewer="alice"), timeout=TIMEOUT_S)
    got = reviews.GetReview(kpb.ReviewRef(review_id=rid), timeout=TIMEOUT_S)
    (listed,) = reviews.ListReviews(kpb.ListReviewsRequest(pipeline="get-one"), timeout=TIMEOUT_S).reviews
    assert got == listed and (got.state, got.claimed_by, list(got.actions)) == ("CLAIMED", "alice", ["approve", "deny"])
    S = grpc.StatusCode
    assert failure(reviews.GetReview, kpb.ReviewRef(review_id="nope")) == (S.NOT_FOUND, "review 'nope' does not exist")
    code, details = failure(reviews.GetReview, kpb.ReviewRef())
    assert code == S.INVALID_ARGUMENT and "review_id is required" in details


def test_watch_streams_new_matching_reviews_and_updates(kernel, reviews):
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline="watched", tenant="acme", include_open=True,
                                                          updates=True), timeout=TIMEOUT_S)
    first = escalate(kernel, "watched")
    escalate(kernel, "watched", tenant="globex")  # filtered out
    escalate(kernel, "unwatched")
    assert next(stream).review_id == first.review_id
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=first.review_id, reviewer="alice"), timeout=TIMEOUT_S)
    update = next(stream)
    assert (update.review_id, update.state) == (first.review_id, "CLAIMED")
    second = escalate(kernel, "watched")
    assert next(stream).review_id == second.review_id
    stream.cancel()


def test_a_client_leaving_a_review_watch_releases_it(kernel, reviews):
    wait_until(lambda: kernel.queue.watcher_count() == 0)  # earlier tests' watches have been released
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline="leaving", include_open=True), timeout=TIMEOUT_S)
    rid = escalate(kernel, "leaving").review_id
    assert next(stream).review_id == rid
    assert kernel.queue.watcher_count() == 1
    stream.cancel()
    wait_until(lambda: kernel.queue.watcher_count() == 0)


def test_a_watch_ends_with_the_calls_deadline(kernel, reviews):
    wait_until(lambda: kernel.queue.watcher_count() == 0)
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline="deadline"), timeout=0.3)
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: kernel.queue.watcher_count() == 0)


def test_ten_reviewers_claiming_next_each_get_a_different_case(kernel, reviews):
    made = [escalate(kernel, "claim-next").review_id for _ in range(30)]
    claims, refusals = [], []

    def reviewer(name: str) -> None:
        request = kpb.ClaimNextReviewRequest(pipeline="claim-next", reviewer=name, lease_seconds=60)
        while True:
            try:
                got = reviews.ClaimNextReview(request, timeout=TIMEOUT_S)
            except grpc.RpcError as exc:
                refusals.append((exc.code(), exc.details()))
                return
            claims.append((got.review_id, got.state, got.claimed_by == name))

    desk = [threading.Thread(target=reviewer, args=(f"reviewer-{n}",)) for n in range(10)]
    for thread in desk:
        thread.start()
    for thread in desk:
        thread.join(TIMEOUT_S * 3)
    assert sorted(rid for rid, _, _ in claims) == sorted(made)  # every case once: no two reviewers got one
    assert {(state, mine) for _, state, mine in claims} == {("CLAIMED", True)}
    assert [code for code, _ in refusals] == [grpc.StatusCode.NOT_FOUND] * 10  # no FAILED_PRECONDITION
    assert "no open review to claim (filters: pipeline 'claim-next', tenant any)" in refusals[0][1]


def test_claim_next_takes_the_oldest_match_and_checks_its_arguments(kernel, reviews):
    older, newer = escalate(kernel, "claim-oldest", tenant="acme"), escalate(kernel, "claim-oldest", tenant="acme")
    escalate(kernel, "claim-oldest", tenant="globex")
    claim_next = lambda who, lease=0: kpb.ClaimNextReviewRequest(  # noqa: E731
        pipeline="claim-oldest", tenant="acme", reviewer=who, lease_seconds=lease)
    got = reviews.ClaimNextReview(claim_next("alice"), timeout=TIMEOUT_S)
    assert (got.review_id, got.state, got.claimed_by) == (older.review_id, "CLAIMED", "alice")
    assert got.lease_expires_unix_ns - time.time_ns() > 290e9  # the default lease, as ClaimReview's
    assert reviews.ClaimNextReview(claim_next("bob", 60), timeout=TIMEOUT_S).review_id == newer.review_id
    S = grpc.StatusCode
    code, details = failure(reviews.ClaimNextReview, claim_next("carol"))
    assert code == S.NOT_FOUND and "tenant 'acme'" in details
    assert failure(reviews.ClaimNextReview, claim_next(""))[0] == S.INVALID_ARGUMENT
    code, details = failure(reviews.ClaimNextReview, claim_next("carol", 100_000))
    assert code == S.INVALID_ARGUMENT and "lease_seconds must be 0..86400" in details


def test_a_lapsed_lease_is_sent_to_a_watch_of_updates(kernel, reviews):
    # include_open: the review is sent even if it is created before the server has the watch
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline="lapsing", include_open=True, updates=True),
                                  timeout=TIMEOUT_S)
    rid = escalate(kernel, "lapsing").review_id
    assert (next(stream).review_id, reviews.ClaimReview(
        kpb.ClaimReviewRequest(review_id=rid, reviewer="gus", lease_seconds=1), timeout=TIMEOUT_S).state) == (
        rid, "CLAIMED")
    claimed = next(stream)
    assert (claimed.review_id, claimed.state, claimed.claimed_by) == (rid, "CLAIMED", "gus")
    lapsed = next(stream)  # the watch's own deadline (20 s) bounds the wait
    assert (lapsed.review_id, lapsed.state, lapsed.claimed_by) == (rid, "OPEN", "")
    assert time.time_ns() - claimed.lease_expires_unix_ns < 3e9  # sent at the lease's end, not much later
    stream.cancel()


def test_resolving_again_with_another_comment_is_refused(kernel, reviews):
    rid = escalate(kernel, "recomment").review_id
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=rid, reviewer="alice"), timeout=TIMEOUT_S)
    resolve = lambda comment: kpb.ResolveReviewRequest(  # noqa: E731
        review_id=rid, reviewer="alice", action="deny", comment=comment)
    first = reviews.ResolveReview(resolve("first"), timeout=TIMEOUT_S)
    code, details = failure(reviews.ResolveReview, resolve("second, different"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already resolved (deny by alice) with another comment" in details
    assert reviews.ResolveReview(resolve("first"), timeout=TIMEOUT_S) == first  # the same repeat stays OK
    assert reviews.GetReview(kpb.ReviewRef(review_id=rid), timeout=TIMEOUT_S).comment == "first"
