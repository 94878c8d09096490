"""Review rows stored in the background, in large transactions, visible to every read that follows.

An escalated decision whose audit record is already durable does not need
its review row stored before the caller hears the answer: the row can be
rebuilt from the record after a crash (``kernel/review/reopen.py``). What a
caller does need is to find the review when it asks for it next. So rows
queue here and a background thread stores whatever queued over a short
window in one transaction — a SQLite insert costs ~9 µs at 64 rows per
transaction against ~21 µs at 5 (bench/RESULTS.md) — and every read of the
review queue first ``settle()``s: it stores what is still queued on its own
thread, or waits for the transaction in progress, so it always sees the
reviews of every decision answered before it began.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import KernelError
from ..observability.repeats import RepeatedFailure
from ..threads import name_native_thread

log = logging.getLogger("aios.review")

WINDOW_S = 0.02  # how long the thread lets rows gather before storing them


class DeferredRows:
    """``add(rows, context)`` now; ``store(rows, contexts)`` later, on the thread or in ``settle``.

    ``store`` gets every row queued since the last call, in order, and the
    contexts that came with them; it is never called concurrently. If it
    raises, the failure is logged and the rows stay queued: the thread tries
    again after a back-off (1 s, doubling up to 30 s), and a ``settle`` tries
    once more and returns. Rows still unstored when the process dies are
    rebuilt at the next start (the caller's part: ``kernel/review/reopen.py``).
    """

    def __init__(self, store: Callable[[list, list], None], window_s: float = WINDOW_S, name: str = "aios-reviews"):
        self._store = store
        self._window_s = window_s
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # held while a batch is taken and stored
        self._rows: list = []
        self._contexts: list = []
        self._sizes: list[int] = []  # bytes of each add's rows, as its caller counted them
        self._bytes = 0  # their sum: what the queued rows hold in memory, about
        self._storing = 0  # rows taken by the store in progress (still held, and back in _rows if it fails)
        self.failing = False  # the last store failed (the rows wait for a retry)
        self._armed = False  # the thread has been woken for the rows queued now
        self._wakeup = threading.Event()  # set at most once per batch: its Python-level cost does not matter
        self._closing = False
        self._stopping = threading.Event()  # cuts the gathering window short at close
        self.batches = 0  # for tests and stats
        self.rows = 0
        self.failures = 0
        self._failing = RepeatedFailure(log, "storing review rows")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, rows: list, context, nbytes: int = 0) -> None:
        """Queue ``rows`` (``nbytes``: about what they hold in memory, for ``backlog_bytes``); never blocks."""
        with self._lock:
            self._rows.extend(rows)
            self._contexts.append(context)
            self._sizes.append(nbytes)
            self._bytes += nbytes
            wake = not self._armed
            self._armed = True
        if wake:
            self._wakeup.set()

    @property
    def backlog(self) -> int:
        """Rows queued and not stored yet, those being stored included (grows only while storing fails)."""
        return len(self._rows) + self._storing

    @property
    def backlog_bytes(self) -> int:
        """About the bytes the rows queued and not stored yet hold (their free text can be MiBs a row)."""
        return self._bytes

    def settle(self) -> None:
        """Return once every row queued before this call is stored (or its storing failed)."""
        if self._rows or self._flushing.locked():
            self._flush()

    def waiting(self, match: Callable[[object], bool] | None = None) -> int:
        """Rows (all, or those ``match`` accepts) still queued after the last store failed; 0 while storing works."""
        if not self.failing:
            return 0
        with self._lock:
            rows = list(self._rows)
        return len(rows) if match is None else sum(1 for row in rows if match(row))

    def retry_now(self) -> None:
        """Cut a failed store's back-off short (the store takes writes again): the thread stores the rows now."""
        self._wakeup.set()

    def close(self) -> None:
        """Store what is queued and stop the thread."""
        with self._lock:
            self._closing = True
            self._armed = True
        self._wakeup.set()  # (also cuts a retry's back-off short)
        self._stopping.set()
        self._thread.join(10.0)
        self._flush()
        if self.batches:
            log.info("review rows: %d stored in %d background transactions (%.1f per transaction)",
                     self.rows, self.batches, self.rows / self.batches)

    def _run(self) -> None:
        name_native_thread()
        backoff = 0.0
        while True:
            if backoff:
                self._wakeup.wait(backoff)  # a failed store is retried, sooner if closing asks
            else:
                self._wakeup.wait()
            self._wakeup.clear()
            if not self._closing and not backoff:
                self._stopping.wait(self._window_s)  # let more rows gather: one transaction for all of them
            backoff = 0.0 if self._flush() else min(30.0, max(1.0, backoff * 2))
            if self._closing:
                return

    def _flush(self) -> bool:
        """Store what is queued; False if storing failed (the rows stay queued, first, for a retry)."""
        with self._flushing:
            with self._lock:
                rows, contexts, sizes = self._rows, self._contexts, self._sizes
                self._rows, self._contexts, self._sizes = [], [], []
                self._storing = len(rows)
                self._armed = False
            if not rows:
                return True
            try:
                self._store(rows, contexts)
            except Exception as exc:
                # (A full or failing store is expected and says what it is: no traceback for it.)
                self._failing.failed(f"{len(rows)} rows kept to retry (after a crash they are reopened from the audit "
                                     f"log): {type(exc).__name__}: {exc}", traceback=not isinstance(exc, KernelError))
                with self._lock:
                    self._rows[:0], self._contexts[:0], self._sizes[:0] = rows, contexts, sizes
                    self._storing = 0
                    self._armed = True  # the thread retries them; new rows need not wake it
                self.failures += 1
                self.failing = True
                return False
            self._failing.succeeded()
            self.failing = False
            with self._lock:
                self._bytes -= sum(sizes)
                self._storing = 0
            self.batches += 1
            self.rows += len(rows)
            return True
