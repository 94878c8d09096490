"""Watching the review queue: a backlog (the reviews waiting, or those stored since a resume point), then changes
as they happen."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..store.feed import FellBehind

CREATED, UPDATED = "created", "updated"
# What a watch that fell behind (its client stopped reading) is told: every review stored since the last one it
# received comes again from its resume point; the changes to older ones meanwhile are in their current state.
RESYNC = ("watch again with from_sequence = the highest Review.sequence received + 1 (every matching review stored "
          "since is sent, as it is now; with none received, include_open = true), and read ListReviews for older "
          "ones claimed or resolved meanwhile")


class ReviewWatch:
    """Reviews as they are created (and, if asked, claimed, resolved, and OPEN again when a lease lapses), as
    of when they are sent.

    The subscription is opened before the backlog is read, and the backlog
    ends at ``published`` (the highest position whose "created" event was
    published when the watch subscribed): every review stored after it has
    that event coming. So a review created meanwhile is sent once, never
    both and never neither, and new reviews go out in the order they were
    stored (``Review.sequence`` rises): a client resuming from the highest
    it received (``from_sequence``) misses none. The backlog comes as
    ``(position, review)``, read a page at a time; nothing is kept per
    review sent. Runs until ``close()`` (from any thread: it wakes a
    blocked reader at once); iterating raises DeadlineExceeded when the
    subscription's ``timeout_s`` passes without an event, the queue's
    error once ``ReviewQueue.end_watches`` ended it, and RESOURCE_EXHAUSTED
    (``FellBehind``, saying how to resume) once more events waited for its
    reader than the feed keeps (``kernel.store.feed.MAX_QUEUED``).
    """

    __slots__ = ("_sub", "_backlog", "_present", "_published")

    def __init__(self, sub, backlog: Iterator[tuple[int, kpb.Review]], present: Callable[[kpb.Review], kpb.Review],
                 published: int = 0):
        self._sub = sub
        self._backlog = backlog
        self._present = present
        self._published = published

    def __iter__(self):
        return self

    def __next__(self) -> kpb.Review:
        if self._backlog is not None:
            for position, review in self._backlog:
                if self._sub.closed or position > self._published:  # (stored since it subscribed: coming as new)
                    break
                return self._present(review)
            self._backlog = None
        try:
            _kind, review = next(self._sub)  # StopIteration once closed
        except FellBehind as exc:
            raise FellBehind(exc.behind, RESYNC) from None
        return self._present(review)

    def close(self) -> None:
        self._sub.close()
