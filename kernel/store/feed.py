"""In-process change feeds: what the local backend offers for watching tasks and reviews.

A writer publishes an item after its change is committed; every open
subscription under that key whose filter accepts the item gets it, in
publish order. Subscribers block on a condition (no polling) and can be
closed from any thread, which wakes them at once: gRPC handlers close theirs
when the call ends. Only changes made by this process are seen; a clustered
backend would feed these from its own watch (e.g. a JetStream consumer).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from ..errors import DeadlineExceeded

_CLOSED = object()


class Subscription:
    """Items published under one key, oldest first; iterate, or ``get(timeout)``."""

    __slots__ = ("_feed", "key", "_match", "_items", "_cond", "_closed", "timeout_s")

    def __init__(self, feed: Feed, key: Hashable, match: Callable[[object], bool] | None, timeout_s: float | None):
        self._feed = feed
        self.key = key
        self._match = match
        self._items: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.timeout_s = timeout_s  # for __next__: None waits for ever

    def _offer(self, item) -> None:
        if self._match is not None and not self._match(item):
            return
        with self._cond:
            if not self._closed:
                self._items.append(item)
                self._cond.notify()

    def get(self, timeout_s: float | None = None):
        """The next item; ``_CLOSED`` once closed; raises DeadlineExceeded after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                if self._closed:
                    return _CLOSED
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(f"no change within {timeout_s:g} s")
                self._cond.wait(remaining)
            if self._closed:
                return _CLOSED
            return self._items.popleft()

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

    def close(self) -> None:
        """Stop the subscription; a thread blocked in ``get`` returns at once. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
        self._feed._remove(self)


class Feed:
    """Publish/subscribe within the process, keyed (e.g. by task id) with optional filters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[Hashable, set[Subscription]] = {}

    def subscribe(self, key: Hashable = None, match: Callable[[object], bool] | None = None,
                  timeout_s: float | None = None) -> Subscription:
        sub = Subscription(self, key, match, timeout_s)
        with self._lock:
            self._subscribers.setdefault(key, set()).add(sub)
        return sub

    def publish(self, item, key: Hashable = None) -> None:
        with self._lock:
            subscribers = tuple(self._subscribers.get(key, ()))
        for sub in subscribers:
            sub._offer(item)

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
