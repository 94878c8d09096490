"""ReviewService over real gRPC (sync and grpc.aio): leases, claim-next, status codes, paging, SLA counts, watches.

A real kernel serving the claims pipeline (its model, policy and audit log), once per front end. Every review
is opened the way a caller opens one: a Decide of a large claim, which the policy always sends to a human
(R04). A second pipeline, ``claims_late`` (the same pipeline under another name, its review SLA cut to 1 ns),
gives the filters a second pipeline to tell apart and the SLA counts a case that is late as soon as it is
opened. Each test works under tenants of its own, so the tests share the kernel without seeing each other's
cases.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.decision_client import make_request

TIMEOUT_S = 20
PIPELINE, LATE = "claims_triage", "claims_late"
ACTIONS = ["approve", "deny", "request_info"]  # the claims pipeline's [escalation] review_actions


def _late_pipeline(folder) -> None:
    text = (folder / f"{PIPELINE}.toml").read_text(encoding="utf-8")
    assert f'name = "{PIPELINE}"' in text and "review_sla_s = 14400" in text, "the claims pipeline changed its lines"
    text = text.replace(f'name = "{PIPELINE}"', f'name = "{LATE}"', 1)
    text = text.replace("review_sla_s = 14400", "review_sla_s = 1e-9")
    (folder / f"{LATE}.toml").write_text(text, encoding="utf-8")


server, channel = module_claims_kernel("reviews", edit_pipelines=_late_pipeline, front_ends=("sync", "aio"))


@pytest.fixture
def reviews(channel):
    return kgrpc.ReviewServiceStub(channel)


LARGE_CLAIM = dict(data.generate_cases(1, seed=11)[0], claim_amount=90000.0)  # R04: always seen by a human


def escalate(channel, tenant: str, pipeline: str = PIPELINE) -> str:
    """A Decide the policy escalates: the id of the review it opened."""
    request = claim_request(LARGE_CLAIM, tenant=tenant)
    request.pipeline = pipeline
    decision = kgrpc.DecisionServiceStub(channel).Decide(request, timeout=TIMEOUT_S)
    assert decision.outcome == kpb.ESCALATED and decision.review_id, decision
    return decision.review_id


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


def resolutions(server, review_id: str) -> list[kpb.AuditRecord]:
    return [r for r in server.decisions.audit.read(from_sequence=0, kind=kpb.REVIEW_RESOLUTION)
            if r.decision.review_id == review_id]


def test_leases_and_resolutions_answer_with_named_status_codes(server, channel, reviews):
    rid = escalate(channel, "leases")
    claim = lambda who, lease=60: kpb.ClaimReviewRequest(review_id=rid, reviewer=who, lease_seconds=lease)  # noqa: E731
    resolve = lambda who, action: kpb.ResolveReviewRequest(review_id=rid, reviewer=who, action=action)  # noqa: E731
    S = grpc.StatusCode
    assert failure(reviews.ResolveReview, resolve("alice", "deny"))[0] == S.FAILED_PRECONDITION  # not claimed
    assert reviews.ClaimReview(claim("alice"), timeout=TIMEOUT_S).claimed_by == "alice"
    cases = [
        (reviews.ClaimReview, claim("bob"), S.FAILED_PRECONDITION, "claimed by alice until"),
        (reviews.ResolveReview, resolve("bob", "deny"), S.FAILED_PRECONDITION, "claimed by alice"),
        (reviews.ResolveReview, resolve("alice", "shrug"), S.INVALID_ARGUMENT, "action 'shrug' is not allowed"),
        (reviews.ResolveReview, resolve("alice", "review"), S.INVALID_ARGUMENT, "action 'review' is not allowed"),
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
    assert resolutions(server, rid) == []  # nothing refused reached the audit log
    done = reviews.ResolveReview(resolve("alice", "approve"), timeout=TIMEOUT_S)
    assert done.state == "RESOLVED" and done.resolution.action == "approve"
    (record,) = resolutions(server, rid)  # the resolution is an audited decision
    assert (record.principal, record.decision.action, record.decision.outcome) == ("alice", "approve", kpb.REVIEWED)
    code, details = failure(reviews.ResolveReview, resolve("bob", "deny"))
    assert code == S.FAILED_PRECONDITION and "already resolved (approve by alice)" in details


def test_a_review_gives_the_defaults_its_decision_used_for_fields_left_out(server, channel, reviews):
    """(Review desk audit) the reviewer saw the request as sent: a field left out was simply not there, while the
    model had decided it with the pipeline's default (the audit record's defaulted_fields). ``Review.defaults``
    names each with the value used; ``request`` stays the case as sent. A task's review has them too."""
    sent = {"claim_amount": 90000.0, "customer_tier": "gold"}  # R04 escalates it; the six others are left out
    request = make_request(PIPELINE, sent, tenant="defaults")
    decision = kgrpc.DecisionServiceStub(channel).Decide(request, timeout=TIMEOUT_S)
    record = next(server.decisions.audit.read(from_sequence=decision.audit_sequence))
    assert record.decision.review_id == decision.review_id
    assert len(record.defaulted_fields) == 6
    task = kgrpc.TaskServiceStub(channel).StartTask(kpb.StartTaskRequest(request=request), timeout=TIMEOUT_S)
    for update in kgrpc.TaskServiceStub(channel).WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=TIMEOUT_S):
        if update.state == kpb.WAITING_FOR_REVIEW:
            break
    for review_id in (decision.review_id, update.review_id):
        review = reviews.GetReview(kpb.ReviewRef(review_id=review_id), timeout=TIMEOUT_S)
        assert set(review.request.fields) == set(sent)  # as sent
        assert dict(review.defaults) == {name: record.inputs[name] for name in record.defaulted_fields}
        assert review.defaults["fraud_score"].number_value == 0.21  # the pipeline file's default
    listed = reviews.ListReviews(kpb.ListReviewsRequest(tenant="defaults"), timeout=TIMEOUT_S).reviews
    assert all(dict(review.defaults) == dict(listed[0].defaults) for review in listed) and len(listed) == 2


def test_list_pages_filters_and_counts_missed_slas(channel, reviews):
    made = [escalate(channel, ("paging-acme" if n % 2 else "paging-globex")) for n in range(7)]
    late = escalate(channel, "paging-acme", pipeline=LATE)  # due 1 ns after it was opened
    acme = [rid for n, rid in enumerate(made) if n % 2] + [late]
    got, token, pages = [], "", 0
    while True:
        page = reviews.ListReviews(kpb.ListReviewsRequest(tenant="paging-acme", page_size=2, page_token=token),
                                   timeout=TIMEOUT_S)
        got += [r.review_id for r in page.reviews]
        pages += 1
        assert page.sla_missed == 1
        token = page.next_page_token
        if not token:
            break
    assert got == acme and pages == 2
    assert [r.sla_missed for r in reviews.ListReviews(kpb.ListReviewsRequest(tenant="paging-acme"),
                                                      timeout=TIMEOUT_S).reviews] == [False] * 3 + [True]
    # The pipeline filter, with the tenant's: each pipeline's own cases, and its own count of missed SLAs.
    on_time = reviews.ListReviews(kpb.ListReviewsRequest(pipeline=PIPELINE, tenant="paging-acme"), timeout=TIMEOUT_S)
    assert [r.review_id for r in on_time.reviews] == acme[:3] and on_time.sla_missed == 0
    missed = reviews.ListReviews(kpb.ListReviewsRequest(pipeline=LATE, tenant="paging-acme"), timeout=TIMEOUT_S)
    assert [r.review_id for r in missed.reviews] == [late] and missed.sla_missed == 1
    S = grpc.StatusCode
    code, details = failure(reviews.ListReviews, kpb.ListReviewsRequest(page_token="not-a-token"))
    assert code == S.INVALID_ARGUMENT and "page_token" in details
    token = reviews.ListReviews(kpb.ListReviewsRequest(pipeline=PIPELINE, tenant="paging-acme", page_size=1),
                                timeout=TIMEOUT_S).next_page_token
    code, details = failure(reviews.ListReviews, kpb.ListReviewsRequest(pipeline=LATE, tenant="paging-acme",
                                                                        page_token=token))
    assert code == S.INVALID_ARGUMENT and "other filters" in details
    code, details = failure(reviews.ListReviews, kpb.ListReviewsRequest(state="LOST"))
    assert code == S.INVALID_ARGUMENT and "state must be one of" in details


def test_get_review_answers_one_review_as_the_list_shows_it(channel, reviews):
    rid = escalate(channel, "get-one")
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=rid, reviewer="alice"), timeout=TIMEOUT_S)
    got = reviews.GetReview(kpb.ReviewRef(review_id=rid), timeout=TIMEOUT_S)
    (listed,) = reviews.ListReviews(kpb.ListReviewsRequest(tenant="get-one"), timeout=TIMEOUT_S).reviews
    assert got == listed and (got.state, got.claimed_by, list(got.actions)) == ("CLAIMED", "alice", ACTIONS)
    assert (got.proposed.action, got.proposed.outcome, got.pipeline) == ("review", kpb.ESCALATED, PIPELINE)
    assert got.request.fields["claim_amount"].number_value == 90000.0  # the case as the caller sent it
    S = grpc.StatusCode
    assert failure(reviews.GetReview, kpb.ReviewRef(review_id="nope")) == (S.NOT_FOUND, "review 'nope' does not exist")
    code, details = failure(reviews.GetReview, kpb.ReviewRef())
    assert code == S.INVALID_ARGUMENT and "review_id is required" in details


def test_watch_streams_new_matching_reviews_and_updates(channel, reviews):
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(pipeline=PIPELINE, tenant="watched", include_open=True,
                                                          updates=True), timeout=TIMEOUT_S)
    first = escalate(channel, "watched")
    escalate(channel, "watched-not")  # another tenant: filtered out
    escalate(channel, "watched", pipeline=LATE)  # another pipeline: filtered out
    assert next(stream).review_id == first
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=first, reviewer="alice"), timeout=TIMEOUT_S)
    update = next(stream)
    assert (update.review_id, update.state) == (first, "CLAIMED")
    second = escalate(channel, "watched")
    assert next(stream).review_id == second
    stream.cancel()


def test_a_client_leaving_a_review_watch_releases_it(server, channel, reviews):
    queue = server.decisions.reviews
    wait_until(lambda: queue.watcher_count() == 0)  # earlier tests' watches have been released
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(tenant="leaving", include_open=True), timeout=TIMEOUT_S)
    rid = escalate(channel, "leaving")
    assert next(stream).review_id == rid
    assert queue.watcher_count() == 1
    stream.cancel()
    wait_until(lambda: queue.watcher_count() == 0)


def test_a_watch_ends_with_the_calls_deadline(server, reviews):
    queue = server.decisions.reviews
    wait_until(lambda: queue.watcher_count() == 0)
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(tenant="deadline"), timeout=0.3)
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: queue.watcher_count() == 0)


def test_ten_reviewers_claiming_next_each_get_a_different_case(channel, reviews):
    made = [escalate(channel, "claim-next") for _ in range(30)]
    claims, refusals = [], []

    def reviewer(name: str) -> None:
        request = kpb.ClaimNextReviewRequest(pipeline=PIPELINE, tenant="claim-next", reviewer=name, lease_seconds=60)
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
    assert f"no open review to claim (filters: pipeline '{PIPELINE}', tenant 'claim-next')" in refusals[0][1]


def test_claim_next_takes_the_oldest_match_and_checks_its_arguments(channel, reviews):
    older, newer = escalate(channel, "oldest-acme"), escalate(channel, "oldest-acme")
    escalate(channel, "oldest-globex")
    escalate(channel, "oldest-acme", pipeline=LATE)
    claim_next = lambda who, lease=0: kpb.ClaimNextReviewRequest(  # noqa: E731
        pipeline=PIPELINE, tenant="oldest-acme", reviewer=who, lease_seconds=lease)
    got = reviews.ClaimNextReview(claim_next("alice"), timeout=TIMEOUT_S)
    assert (got.review_id, got.state, got.claimed_by) == (older, "CLAIMED", "alice")
    assert got.lease_expires_unix_ns - time.time_ns() > 290e9  # the default lease, as ClaimReview's
    assert reviews.ClaimNextReview(claim_next("bob", 60), timeout=TIMEOUT_S).review_id == newer
    S = grpc.StatusCode
    code, details = failure(reviews.ClaimNextReview, claim_next("carol"))
    assert code == S.NOT_FOUND and "tenant 'oldest-acme'" in details
    assert failure(reviews.ClaimNextReview, claim_next(""))[0] == S.INVALID_ARGUMENT
    code, details = failure(reviews.ClaimNextReview, claim_next("carol", 100_000))
    assert code == S.INVALID_ARGUMENT and "lease_seconds must be 0..86400" in details


def test_a_lapsed_lease_is_sent_to_a_watch_of_updates(channel, reviews):
    # include_open: the review is sent even if it is opened before the server has the watch
    stream = reviews.WatchReviews(kpb.WatchReviewsRequest(tenant="lapsing", include_open=True, updates=True),
                                  timeout=TIMEOUT_S)
    rid = escalate(channel, "lapsing")
    assert (next(stream).review_id, reviews.ClaimReview(
        kpb.ClaimReviewRequest(review_id=rid, reviewer="gus", lease_seconds=1), timeout=TIMEOUT_S).state) == (
        rid, "CLAIMED")
    claimed = next(stream)
    assert (claimed.review_id, claimed.state, claimed.claimed_by) == (rid, "CLAIMED", "gus")
    lapsed = next(stream)  # the watch's own deadline (20 s) bounds the wait
    assert (lapsed.review_id, lapsed.state, lapsed.claimed_by) == (rid, "OPEN", "")
    assert time.time_ns() - claimed.lease_expires_unix_ns < 3e9  # sent at the lease's end, not much later
    stream.cancel()


def test_resolving_again_with_another_comment_is_refused(server, channel, reviews):
    rid = escalate(channel, "recomment")
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=rid, reviewer="alice"), timeout=TIMEOUT_S)
    resolve = lambda comment: kpb.ResolveReviewRequest(  # noqa: E731
        review_id=rid, reviewer="alice", action="deny", comment=comment)
    first = reviews.ResolveReview(resolve("first"), timeout=TIMEOUT_S)
    code, details = failure(reviews.ResolveReview, resolve("second, different"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already resolved (deny by alice) with another comment" in details
    assert reviews.ResolveReview(resolve("first"), timeout=TIMEOUT_S) == first  # the same repeat stays OK
    assert reviews.GetReview(kpb.ReviewRef(review_id=rid), timeout=TIMEOUT_S).comment == "first"
    assert len(resolutions(server, rid)) == 1  # the repeat recorded nothing more


@pytest.mark.parametrize("filters,fragment", [
    ({"tenant": "rv-tenant\n"}, "tenant must not contain control characters"),
    ({"tenant": "t" * 129}, "tenant must be at most 128 characters"),
    # (a pipeline's name is letters, digits, '_' and '-': one with a newline, a space or a '/' is no pipeline's)
    ({"pipeline": PIPELINE + "\n"}, "pipeline 'claims_triage\\n' cannot name a pipeline"),
    ({"pipeline": "claims triage"}, "pipeline 'claims triage' cannot name a pipeline"),
])
def test_a_filter_no_review_can_have_is_refused_naming_it(channel, reviews, filters, fragment):
    """A tenant or pipeline read with its newline (or too long to be a tenant) matched nothing: ListReviews came
    back empty, ClaimNextReview said none was open and WatchReviews waited for ever, where ListTasks refused it."""
    watch_status = {}

    def watch() -> None:  # (a watch that is not refused waits: the test's deadline ends it)
        try:
            list(reviews.WatchReviews(kpb.WatchReviewsRequest(**filters, include_open=True), timeout=2))
        except grpc.RpcError as exc:
            watch_status.update(code=exc.code(), details=exc.details())

    watching = threading.Thread(target=watch)
    watching.start()
    for call, message in ((reviews.ListReviews, kpb.ListReviewsRequest(**filters)),
                          (reviews.ClaimNextReview, kpb.ClaimNextReviewRequest(**filters, reviewer="alice"))):
        code, details = failure(call, message)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details, (code, details)
    watching.join(TIMEOUT_S)
    assert watch_status.get("code") == grpc.StatusCode.INVALID_ARGUMENT and fragment in watch_status["details"], \
        watch_status


def test_a_cut_watch_resumes_from_its_last_sequence_with_no_gap_or_duplicate(channel, reviews):
    """WatchReviews had no resume point: a dashboard whose stream was cut either read everything again or missed
    what was escalated while it was away. from_sequence = the highest Review.sequence received + 1 sends exactly
    the reviews stored since (as they are now), then new ones."""
    watch = lambda **options: reviews.WatchReviews(  # noqa: E731
        kpb.WatchReviewsRequest(tenant="resume", **options), timeout=TIMEOUT_S)
    stream = watch(include_open=True, updates=True)
    first = escalate(channel, "resume")
    seen = next(stream)
    assert seen.review_id == first and seen.sequence > 0
    claimed = reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=first, reviewer="alice"), timeout=TIMEOUT_S)
    update = next(stream)
    assert (update.state, update.sequence) == ("CLAIMED", seen.sequence) == (claimed.state, claimed.sequence)
    stream.cancel()  # cut

    missed = [escalate(channel, "resume"), escalate(channel, "resume-other"), escalate(channel, "resume")]
    reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=missed[0], reviewer="bob"), timeout=TIMEOUT_S)
    resumed = watch(from_sequence=seen.sequence + 1)
    got = [next(resumed), next(resumed)]
    assert [(r.review_id, r.state) for r in got] == [(missed[0], "CLAIMED"), (missed[2], "OPEN")]  # as they are now
    assert seen.sequence < got[0].sequence < got[1].sequence
    later = escalate(channel, "resume")
    assert next(resumed).review_id == later  # nothing sent twice before it
    resumed.cancel()
    listed = reviews.ListReviews(kpb.ListReviewsRequest(tenant="resume", state="RESOLVED"), timeout=TIMEOUT_S)
    assert not listed.reviews
    listed = reviews.ListReviews(kpb.ListReviewsRequest(tenant="resume"), timeout=TIMEOUT_S)
    assert [r.sequence for r in listed.reviews] == [seen.sequence, got[0].sequence, got[1].sequence,
                                                    listed.reviews[-1].sequence]


def test_bad_resume_points_are_refused_naming_the_field(channel, reviews):
    def refused(**options) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            next(reviews.WatchReviews(kpb.WatchReviewsRequest(tenant="resume-bad", **options), timeout=TIMEOUT_S))
        return info.value.code(), info.value.details()

    code, details = refused(from_sequence=2**63)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"from_sequence {2**63} is past the "
                                                                           "newest review stored"), details
    code, details = refused(from_sequence=1, include_open=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "from_sequence (1)" in details and "include_open" in details
