"""In-process change feeds: what the local backend offers for watching tasks and reviews.

A writer publishes an item after its change is committed; every open
subscription under that key whose filter accepts the item gets it, in
publish order. Subscribers block on a condition (no polling) and can be
closed from any thread, which wakes them at once: gRPC handlers close theirs
when the call ends. Only changes made by this process are seen; a clustered
backend would feed these from its own watch (e.g. a JetStream consumer).

A feed closed as a whole (the kernel draining at stop) closes every
subscription with an error, which their readers raise instead of ending
quietly, and every later subscription starts closed with the same error:
a watch tells its caller why it ended, and none holds the drain open.

A subscription holds at most ``MAX_QUEUED`` items its reader has not taken.
A reader that stops (a gRPC watch whose client does not read blocks in its
send) would otherwise grow the process without limit: one stalled review
watcher and 4,000 escalations took the kernel from 261 to 479 MB. The item
that finds the queue full ends the subscription instead: what it held is
dropped at once and its reader raises ``FellBehind`` (RESOURCE_EXHAUSTED),
which each watch words with how to resynchronise. A publisher that says how
large its items are (``publish(size=...)``) is bounded in bytes too, at
``MAX_QUEUED_BYTES``: a review carries its request's text fields (up to 1 MiB
each), and one stalled review watcher held 560 MB after 400 escalations with
1 MB descriptions, on its way to ~14 GB at the count bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from ..errors import DeadlineExceeded, ResourceExhausted

MAX_QUEUED = 10_000  # items per subscription not yet taken by its reader; one more ends it (FellBehind)
MAX_QUEUED_BYTES = 64 << 20  # their bytes, where the publisher gives sizes (one item larger than this still goes)

ErrorFactory = Callable[[], BaseException]  # a fresh exception per reader: readers on many threads raise it

_CLOSED = object()


class FellBehind(ResourceExhausted):
    """A subscription's reader fell ``behind`` items back (more than ``MAX_QUEUED``): it was ended."""

    def __init__(self, behind: int, resync: str = ""):
        super().__init__(f"the watch fell behind by {behind} events (at most {MAX_QUEUED}, and {MAX_QUEUED_BYTES >> 20} "
                         f"MiB of them, are kept for a reader that is not taking them) and was ended"
                         + (f"; {resync}" if resync else ""))
        self.behind = behind


class Subscription:
    """Items published under one key, oldest first; iterate, or ``get(timeout)``."""

    __slots__ = ("_feed", "key", "_match", "_items", "_bytes", "_cond", "_closed", "_error", "timeout_s")

    def __init__(self, feed: Feed, key: Hashable, match: Callable[[object], bool] | None, timeout_s: float | None):
        self._feed = feed
        self.key = key
        self._match = match
        self._items: deque = deque()  # (item, its size in bytes: 0 where the publisher gives none)
        self._bytes = 0  # the sizes of the items held
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._error: ErrorFactory | None = None  # set when the feed closed it: raised instead of ending quietly
        self.timeout_s = timeout_s  # for __next__: None waits for ever

    def _offer(self, item, size: int) -> None:
        if self._match is not None and not self._match(item):
            return
        with self._cond:
            if self._closed:
                return
            if len(self._items) < MAX_QUEUED and (self._bytes + size <= MAX_QUEUED_BYTES or not self._items):
                self._items.append((item, size))
                self._bytes += size
                self._cond.notify()
                return
            behind = len(self._items) + 1  # (this one too)
        self.close(lambda: FellBehind(behind))

    def get(self, timeout_s: float | None = None):
        """The next item; ``_CLOSED`` once closed; raises DeadlineExceeded after ``timeout_s``.

        A subscription the feed closed (``Feed.close(error)``) raises ``error()`` instead of
        returning ``_CLOSED``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._items and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(f"no change within {timeout_s:g} s")
                self._cond.wait(remaining)
            if not self._closed:
                item, size = self._items.popleft()
                self._bytes -= size
                return item
            error = self._error
        if error is not None:
            raise error()
        return _CLOSED

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get(self.timeout_s)
        if item is _CLOSED:
            raise StopIteration
        return item

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, error: ErrorFactory | None = None) -> None:
        """Stop the subscription; a thread blocked in ``get`` returns (or raises ``error()``) at once.

        Idempotent: the first close decides how readers end.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._error = error
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
        self._feed._remove(self)


class Feed:
    """Publish/subscribe within the process, keyed (e.g. by task id) with optional filters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[Hashable, set[Subscription]] = {}
        self._closed_with: ErrorFactory | None = None  # set by close(): new subscriptions start closed

    def subscribe(self, key: Hashable = None, match: Callable[[object], bool] | None = None,
                  timeout_s: float | None = None) -> Subscription:
        sub = Subscription(self, key, match, timeout_s)
        with self._lock:
            error = self._closed_with
            if error is None:
                self._subscribers.setdefault(key, set()).add(sub)
        if error is not None:
            sub.close(error)
        return sub

    def close(self, error: ErrorFactory) -> None:
        """End every subscription, now and later: their readers raise ``error()`` (e.g. UNAVAILABLE
        "shutting down"). Publishing goes on reaching no one. Idempotent: the first error stays."""
        with self._lock:
            if self._closed_with is None:
                self._closed_with = error
            error = self._closed_with
            subscribers = [sub for subs in self._subscribers.values() for sub in subs]
        for sub in subscribers:
            sub.close(error)

    def publish(self, item, key: Hashable = None, size: Callable[[], int] | None = None) -> None:
        """``item`` to the subscriptions under ``key`` that match it; ``size()``: its bytes, asked once and only
        when someone subscribes, for the byte bound (``MAX_QUEUED_BYTES``)."""
        with self._lock:
            subscribers = tuple(self._subscribers.get(key, ()))
        nbytes = size() if subscribers and size is not None else 0
        for sub in subscribers:
            sub._offer(item, nbytes)

    def subscriber_count(self, key: Hashable = None) -> int:
        with self._lock:
            return len(self._subscribers.get(key, ()))

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subscribers.get(sub.key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[sub.key]
