"""Watching the review queue: a backlog of waiting reviews (optional), then changes as they happen."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

CREATED, UPDATED = "created", "updated"


class ReviewWatch:
    """Reviews as they are created (and, if asked, claimed and resolved), as of when they are sent.

    The subscription is opened before the backlog is read, so a review
    created meanwhile is sent once: from the backlog or as new, never both
    and never neither. Runs until ``close()`` (from any thread: it wakes a
    blocked reader at once); iterating raises DeadlineExceeded when the
    subscription's ``timeout_s`` passes without an event, and the queue's
    error once ``ReviewQueue.end_watches`` ended it.
    """

    __slots__ = ("_sub", "_backlog", "_present", "_sent")

    def __init__(self, sub, backlog: Iterator[kpb.Review], present: Callable[[kpb.Review], kpb.Review]):
        self._sub = sub
        self._backlog = backlog
        self._present = present
        self._sent: set[str] = set()  # ids sent from the backlog: their "created" events are not sent again

    def __iter__(self):
        return self

    def __next__(self) -> kpb.Review:
        if self._backlog is not None:
            for review in self._backlog:
                if self._sub.closed:
                    break
                self._sent.add(review.review_id)
                return self._present(review)
            self._backlog = None
        while True:
            kind, review = next(self._sub)  # StopIteration once closed
            if kind == CREATED and self._sent and review.review_id in self._sent:
                self._sent.discard(review.review_id)
                continue
            return self._present(review)

    def close(self) -> None:
        self._sub.close()
