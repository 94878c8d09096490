"""Watching the review queue: a backlog of waiting reviews (optional), then changes as they happen."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..store.feed import FellBehind

CREATED, UPDATED = "created", "updated"
# What a watch that fell behind (its client stopped reading) is told: WatchReviews has no position to resume
# from, so the reviews still waiting are sent again, and ListReviews has the ones resolved meanwhile.
RESYNC = ("watch again with include_open = true (the reviews still waiting, OPEN or CLAIMED, are sent first), "
          "and read ListReviews with state RESOLVED for those resolved meanwhile")


class ReviewWatch:
    """Reviews as they are created (and, if asked, claimed, resolved, and OPEN again when a lease lapses), as
    of when they are sent.

    The subscription is opened before the backlog is read, so a review
    created meanwhile is sent once: from the backlog or as new, never both
    and never neither. The backlog comes as ``(position, review)``; only a
    review stored after ``published`` (the highest position whose "created"
    event was published when the watch subscribed) has that event coming,
    so only its id is kept until the event is dropped (keeping every sent
    id held ~190 bytes a review for the watch's life). Runs until ``close()`` (from any thread: it wakes a
    blocked reader at once); iterating raises DeadlineExceeded when the
    subscription's ``timeout_s`` passes without an event, the queue's
    error once ``ReviewQueue.end_watches`` ended it, and RESOURCE_EXHAUSTED
    (``FellBehind``, saying how to resynchronise) once more events waited
    for its reader than the feed keeps (``kernel.store.feed.MAX_QUEUED``).
    """

    __slots__ = ("_sub", "_backlog", "_present", "_published", "_sent")

    def __init__(self, sub, backlog: Iterator[tuple[int, kpb.Review]], present: Callable[[kpb.Review], kpb.Review],
                 published: int = 0):
        self._sub = sub
        self._backlog = backlog
        self._present = present
        self._published = published
        self._sent: set[str] = set()  # ids sent from the backlog whose "created" events are coming: not sent again

    def __iter__(self):
        return self

    def __next__(self) -> kpb.Review:
        if self._backlog is not None:
            for position, review in self._backlog:
                if self._sub.closed:
                    break
                if position > self._published:  # stored since the watch began: published to it as well
                    self._sent.add(review.review_id)
                return self._present(review)
            self._backlog = None
        while True:
            try:
                kind, review = next(self._sub)  # StopIteration once closed
            except FellBehind as exc:
                raise FellBehind(exc.behind, RESYNC) from None
            if kind == CREATED and self._sent and review.review_id in self._sent:
                self._sent.discard(review.review_id)
                continue
            return self._present(review)

    def close(self) -> None:
        self._sub.close()
