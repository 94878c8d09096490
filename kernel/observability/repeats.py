"""A failure that repeats is logged in full once, then as one line now and then, and its recovery once.

A full disk or a dead dependency makes the same step fail on every try: a
traceback per try buried the one line an operator needs (a 4-second run on a
full disk logged 1,144 of them). The first failure of a run keeps its
traceback (or, for an expected error such as a ``KernelError`` whose message
says what to do, is one ERROR line without it); later ones are counted and
summed up at most every ``every_s`` seconds; the first success after them says
how many there were.
"""

from __future__ import annotations

import logging
import threading
import time


class RepeatedFailure:
    def __init__(self, logger: logging.Logger, what: str, every_s: float = 30.0):
        self._log = logger
        self._what = what  # e.g. "storing review rows"
        self._every_ns = int(every_s * 1e9)
        self._count = 0  # failures in the current run
        self._unlogged = 0  # of them, not yet in a log line
        self._last_ns = 0
        self._traced = False  # whether the first failure of the run logged a traceback
        self._lock = threading.Lock()  # (a step that fails on several threads at once: one first line, one count)

    def failed(self, detail: str, traceback: bool = True) -> None:
        """Call in the ``except`` block: the first failure logs its traceback, later ones one line at most
        every ``every_s`` seconds. ``traceback=False`` for an expected error whose message says it all
        (a ``KernelError`` such as the audit log having stopped): the first one is an ERROR line without it."""
        with self._lock:
            self._failed(detail, traceback)

    def _failed(self, detail: str, traceback: bool) -> None:
        now = time.monotonic_ns()
        self._count += 1
        if self._count == 1:
            self._traced = traceback
            (self._log.exception if traceback else self._log.error)("%s failed: %s", self._what, detail)
        elif now - self._last_ns >= self._every_ns:
            self._log.error("%s failed again: %s (%d failures in a row; the first one%s is logged above)",
                            self._what, detail, self._count, "'s traceback" if self._traced else "")
        else:
            self._unlogged += 1
            return
        self._unlogged = 0
        self._last_ns = now

    def succeeded(self) -> None:
        if self._count:  # (read without the lock: the common case, nothing failed, costs one attribute read)
            with self._lock:
                if not self._count:
                    return
                self._log.warning("%s works again, after %d failures in a row", self._what, self._count)
                self._count = self._unlogged = 0
