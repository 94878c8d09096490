"""A watcher that stops reading cannot grow the kernel without limit (kernel/store/feed.py ``MAX_QUEUED``).

A WatchReviews whose client does not read blocks in gRPC's send, and the
events published meanwhile queued in its subscription with no bound: one
stalled watcher and 4,000 escalations took the kernel from 261 to 479 MB until
the watch was cancelled. Each subscription now keeps at most ``MAX_QUEUED``
events; the next one ends it, drops what it held, and its reader is told with
RESOURCE_EXHAUSTED how far it fell behind and how to resynchronise. Real
feeds and a real review queue over SQLite; the gRPC watch is a real claims
kernel's, on the threaded front end, its reviews opened by Decides.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import grpc
import pytest

from claims_support import claim_request
from conftest import start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.errors import ResourceExhausted
from kernel.review import ReviewQueue
from kernel.store import Feed, feed, open_database
from kernel.tasks import TaskStore

TIMEOUT_S = 20


class Event:
    """A published item that can be watched for being freed."""

    def __init__(self, n: int):
        self.n = n


def test_a_subscriber_that_does_not_take_its_events_is_ended_past_the_bound():
    events = Feed()
    stalled = events.subscribe()
    reading = events.subscribe()
    taken: list[int] = []
    for n in range(feed.MAX_QUEUED + 1):
        events.publish(n)
        if n % 100 == 0:  # a reader that keeps up, beside the stalled one
            while not reading.closed and (item := reading.get(0)) != n:
                taken.append(item)
            taken.append(n)
    assert stalled.closed and events.subscriber_count() == 1  # the stalled one is gone, the reader stays
    with pytest.raises(ResourceExhausted, match=f"fell behind by {feed.MAX_QUEUED + 1} events"):
        stalled.get(0)
    events.publish(-1)
    while (item := reading.get(1)) != -1:
        taken.append(item)
    assert taken == list(range(feed.MAX_QUEUED + 1))  # the reader that kept up missed nothing


def test_the_bound_frees_the_stalled_subscribers_events():
    events = Feed()
    stalled = events.subscribe()
    refs = []
    for n in range(feed.MAX_QUEUED + 1):
        event = Event(n)
        refs.append(weakref.ref(event))
        events.publish(event)
    del event
    gc.collect()
    assert stalled.closed
    assert sum(ref() is not None for ref in refs) == 0  # nothing kept for a watcher that is gone


def test_a_subscriber_is_ended_once_its_events_hold_more_bytes_than_the_bound(monkeypatch):
    """Regression: the bound counted events only, and a review carries its request's text (up to 1 MiB a
    field): one WatchReviews whose client stopped reading held 560 MB of a kernel after 400 escalations with 1 MB
    descriptions (a raw campaign), and would have held ~14 GB at 10,000. Sizes the publisher gives count too."""
    monkeypatch.setattr(feed, "MAX_QUEUED_BYTES", 10 << 20, raising=False)
    events = Feed()
    stalled = events.subscribe()
    sizes_asked = []

    def one_mib() -> int:
        sizes_asked.append(1)
        return 1 << 20

    for n in range(11):
        events.publish(n, size=one_mib)
    assert stalled.closed and events.subscriber_count() == 0
    with pytest.raises(ResourceExhausted, match="fell behind by 11 events"):
        stalled.get(0)
    assert len(sizes_asked) == 11
    events.publish(-1, size=one_mib)  # nobody subscribes: the size is not asked
    assert len(sizes_asked) == 11
    alone = events.subscribe()
    events.publish("large", size=lambda: 50 << 20)  # one item above the bound still goes to a reader that keeps up
    assert alone.get(0) == "large" and not alone.closed


@pytest.fixture
def queue(tmp_path):
    database = open_database(tmp_path / "var")
    yield ReviewQueue(database)
    database.close()


def _escalate(queue: ReviewQueue, n: int) -> kpb.Review:
    request = kpb.DecisionRequest(pipeline="claims", tenant="acme", request_id=f"req-{n}")
    decision = kpb.Decision(request_id=request.request_id, action="approve", outcome=kpb.ESCALATED,
                            pipeline="claims", tenant="acme")
    return queue.create(decision, request, ["approve", "deny"], 60.0)


def test_a_review_watch_that_fell_behind_says_how_to_resynchronise(queue, monkeypatch):
    monkeypatch.setattr(feed, "MAX_QUEUED", 5)
    watch = queue.watch()
    created = [_escalate(queue, n).review_id for n in range(7)]
    with pytest.raises(ResourceExhausted) as ended:
        next(watch)
    assert "fell behind by 6 events" in ended.value.message and "from_sequence = the highest" in ended.value.message
    assert "with none received, include_open = true" in ended.value.message
    assert queue.watcher_count() == 0
    again = queue.watch(include_open=True)  # the way back: every review still waiting, then new ones
    assert [next(again).review_id for _ in created] == created
    again.close()


def test_a_task_watch_that_fell_behind_says_how_to_resynchronise(tmp_path, monkeypatch):
    monkeypatch.setattr(feed, "MAX_QUEUED", 2)
    database = open_database(tmp_path / "var")
    try:
        store = TaskStore(database)
        task, _ = store.create(kpb.DecisionRequest(pipeline="claims"))
        watch = store.watch(task.task_id)
        assert next(watch).state == kpb.QUEUED
        for attempt in range(3):
            store.transition(task.task_id, kpb.RUNNING, (kpb.QUEUED,), attempts=attempt + 1)
            store.transition(task.task_id, kpb.QUEUED, (kpb.RUNNING,), "retry")
        with pytest.raises(ResourceExhausted) as ended:
            next(watch)
        assert "fell behind by 3 events" in ended.value.message and "watch the task again" in ended.value.message
        assert next(store.watch(task.task_id)).state == kpb.QUEUED  # a new watch starts from the current state
    finally:
        database.close()


@pytest.fixture(scope="module")
def review_kernel(claims_models, tmp_path_factory):
    server = start_claims_kernel(claims_models, tmp_path_factory.mktemp("backlog"), front_end="sync")
    yield server
    server.stop(grace=1)


def test_a_grpc_review_watch_whose_client_stops_reading_is_ended_not_grown(review_kernel, monkeypatch):
    """Threaded front end: the handler blocks in gRPC's send once the transport's windows are full; the
    events behind it are bounded, and the client, reading at last, gets what was sent and then the reason.
    A real claims kernel: each review is opened by a Decide of a large claim (R04), with a long description."""
    monkeypatch.setattr(feed, "MAX_QUEUED", 50)
    queue = review_kernel.decisions.reviews
    case = dict(data.generate_cases(1, seed=11)[0], claim_amount=90000.0)  # R04: always seen by a human
    big = "x" * 16000  # ~20 kB a review, a few MB in all: more than gRPC's windows hold, so the handler stalls
    with grpc.insecure_channel(f"127.0.0.1:{review_kernel.port}") as channel:
        decide = kgrpc.DecisionServiceStub(channel).Decide
        watch = kgrpc.ReviewServiceStub(channel).WatchReviews(kpb.WatchReviewsRequest(tenant="stalled"), timeout=60)
        _until(lambda: queue.watcher_count() == 1)
        for start in range(0, 2000, 10):  # a few at a time: the handler keeps up until gRPC's send stalls it
            for n in range(start, start + 10):
                request = claim_request(case, tenant="stalled", request_id=f"s{n}")
                request.text_fields["description"] = big
                assert decide(request, timeout=TIMEOUT_S).outcome == kpb.ESCALATED
            threading.Event().wait(0.01)
            if queue.watcher_count() == 0:
                break
        assert queue.watcher_count() == 0, "the stalled watch was never ended"
        received = 0
        with pytest.raises(grpc.RpcError) as ended:
            for _ in watch:
                received += 1
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fell behind by 51 events" in ended.value.details() and "include_open" in ended.value.details()
    assert 0 < received < start  # what gRPC had sent, then the reason: the rest was never held for it


def test_a_grpc_review_watch_is_ended_by_the_bytes_its_events_hold(review_kernel, monkeypatch):
    """The same stalled client, reviews of 1 MB descriptions: ended by the byte bound after a few dozen events,
    far from the count bound."""
    monkeypatch.setattr(feed, "MAX_QUEUED_BYTES", 16 << 20, raising=False)
    queue = review_kernel.decisions.reviews
    case = dict(data.generate_cases(1, seed=12)[0], claim_amount=90000.0)  # R04: always seen by a human
    text = "y" * 1_000_000
    with grpc.insecure_channel(f"127.0.0.1:{review_kernel.port}") as channel:
        decide = kgrpc.DecisionServiceStub(channel).Decide
        watch = kgrpc.ReviewServiceStub(channel).WatchReviews(kpb.WatchReviewsRequest(tenant="large"), timeout=60)
        _until(lambda: queue.watcher_count() == 1)
        for n in range(200):
            request = claim_request(case, tenant="large", request_id=f"l{n}")
            request.text_fields["description"] = text
            assert decide(request, timeout=TIMEOUT_S).outcome == kpb.ESCALATED
            if queue.watcher_count() == 0:
                break
        assert queue.watcher_count() == 0, "the stalled watch was never ended"
        assert n < 100, f"{n + 1} reviews of 1 MB were held for a client that reads none"
        with pytest.raises(grpc.RpcError) as ended:
            for _ in watch:
                pass
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MiB" in ended.value.details() and "include_open" in ended.value.details()


def _until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        threading.Event().wait(0.01)
