"""Retention: resolved reviews and finished tasks are deleted a set time after they ended.

Without it nothing in the store ever left (a soak audit: ~240 MB an hour at a sustained 124 decisions a
second), and every review row keeps the escalated case's request, free text included: personal data a bank
must be able to let go of after a set period. The audit log is not touched: it keeps each decision and each
resolution (free text as digests), so deleting these working rows loses no evidence.

What goes: reviews resolved before ``now - retention`` whose resolution reached every hook (its audit record,
the task waiting on it), and tasks that SUCCEEDED, FAILED or were CANCELLED before then. What stays: open and
claimed reviews, resolutions still being delivered, resolved reviews whose task has not finished, and tasks
that may still run, however old.

Each sweep deletes in batches of ``BATCH`` rows, one transaction each, so it never holds SQLite's write lock
long against the decisions sharing it. Before its first delete it reports the cut-off, after its last what it
deleted (the kernel puts both on the audit log, the first durable before any row goes).
A sweep runs at start and then every ``SWEEP_EVERY_S``; a failed one (a full disk) is logged and tried again
at the next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("aios.store")

DAY_NS = 86_400 * 10**9
BATCH = 500
SWEEP_EVERY_S = 3600.0


@dataclass(frozen=True)
class Swept:
    """What one sweep deleted, and the end time it deleted before (wall clock, ns)."""

    cutoff_unix_ns: int
    reviews: int
    tasks: int


class RetentionSweeper:
    """Deletes the rows past retention from ``db.reviews`` and ``db.tasks``, at start and then periodically."""

    def __init__(self, db, retention_days: float, on_swept: Callable[[Swept], None] = lambda swept: None,
                 clock: Callable[[], int] = time.time_ns, on_sweeping: Callable[[int], None] = lambda cutoff: None):
        if not retention_days > 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        self._reviews = db.reviews
        self._tasks = db.tasks
        self.retention_ns = int(retention_days * DAY_NS)
        self._on_swept = on_swept
        self._on_sweeping = on_sweeping
        self._clock = clock  # wall clock: rows carry wall-clock end times
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, now_unix_ns: int | None = None) -> Swept:
        """Delete everything past retention as of ``now_unix_ns`` (the clock's now by default)."""
        cutoff = (self._clock() if now_unix_ns is None else now_unix_ns) - self.retention_ns
        if not (self._reviews.any_resolved_before(cutoff) or self._tasks.any_finished_before(cutoff)):
            return Swept(cutoff, 0, 0)
        # Said before the first row goes (and durable: on_sweeping waits for its record): a sweep cut off by a kill
        # or a failing log still leaves the cut-off on the record (a review audit: deleted rows went unrecorded).
        self._on_sweeping(cutoff)
        reviews = self._drain(self._reviews.delete_resolved_before, cutoff)
        tasks = self._drain(self._tasks.delete_finished_before, cutoff)
        swept = Swept(cutoff, reviews, tasks)
        if reviews or tasks:  # (what was deleted: the count, after the fact)
            log.info("retention: deleted %d resolved reviews and %d finished tasks that ended before %s",
                     reviews, tasks, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(cutoff / 1e9)))
            self._on_swept(swept)
        return swept

    def _drain(self, delete: Callable[[int, int], int], cutoff: int) -> int:
        total = 0
        while not self._stop.is_set():
            deleted = delete(cutoff, BATCH)
            total += deleted
            if deleted < BATCH:
                break
        return total

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aios-retention", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception as exc:  # a full or failing disk, a closed store: the next sweep tries again
                log.error("retention: a sweep failed (tried again in %.0f s): %s", SWEEP_EVERY_S, exc)
            self._stop.wait(SWEEP_EVERY_S)

    def stop(self) -> None:
        """Stop sweeping; a sweep in progress ends after its current batch."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
