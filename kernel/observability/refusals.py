"""Calls the kernel answered with an error status, by method and gRPC code: what ``aios_calls_failed_total`` reads.

The model and decision counters see only what reached a model or a pipeline: a
call refused before that (a request that does not parse or names no model, a
full call or stream budget, an unknown task or review, a store or audit log that
refused) and every call of the task, review, audit and admin services were in
no counter, so an SRE's dashboard showed a kernel answering nothing but errors
as idle. Each place that turns an error into a call's status counts it here.

Labels are bounded: the method is one the kernel serves (its handlers are built
from the proto's service descriptors, so a client cannot add one) and the code
one of gRPC's 16. Counted once per call, under a lock (a dict update: nothing
on the hot path of a call that succeeds).
"""

from __future__ import annotations

import threading


class CallRefusals:
    """``count(method, code)`` from any thread; ``snapshot()`` for a scrape."""

    __slots__ = ("_counts", "_lock")

    def __init__(self):
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def count(self, method: str, code: str) -> None:
        """One call of ``method`` ("Service.Method") answered ``code`` (a ``grpc.StatusCode`` name)."""
        key = (method, code)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)
