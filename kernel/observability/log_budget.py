"""At most so many log lines a window for one kind of event; the rest counted and named in the next line.

A model that fails on every request logged one line per request (2,000 requests to a model refusing its inputs:
2,250 WARNING lines in a few seconds), burying everything else in the log and costing the lane's thread a
formatted line each. ``RepeatedFailure`` fits a step that fails until it works again; a model failing on some
inputs and not others never "works again", so this keeps a plain budget instead: the first ``lines`` events of
each ``every_s`` window are logged as they are (a sporadic fault keeps its request id in the log), later ones
are counted, and the next line logged says how many were not.
"""

from __future__ import annotations

import threading
import time
import weakref


class LogBudget:
    __slots__ = ("_lines", "_every_ns", "_window_ns", "_used", "_skipped", "_lock", "_clock")

    def __init__(self, lines: int = 10, every_s: float = 10.0, clock=time.monotonic_ns):
        self._clock = clock
        self._lines = lines
        self._every_ns = int(every_s * 1e9)
        self._window_ns = 0  # when the current window began (monotonic)
        self._used = 0  # lines logged in it
        self._skipped = 0  # events not logged since the last line
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: do not log this event (it is counted). Else log it, saying that the returned number of events
        before it were not logged (0: none)."""
        now = self._clock()
        with self._lock:
            if now - self._window_ns >= self._every_ns:
                self._window_ns, self._used = now, 0
            if self._used >= self._lines:
                self._skipped += 1
                return None
            self._used += 1
            skipped, self._skipped = self._skipped, 0
            return skipped


def not_logged(skipped: int) -> str:
    """The words a line adds for the events before it that its budget did not log ("" for none)."""
    return f" ({skipped} more like it not logged one by one; log_level DEBUG logs each)" if skipped else ""


# Budgets by what they are about (a model version) and the kind of line: a failing model's lines, in each place
# that logs them, stay within one budget per kind however many threads fail at once.
_budgets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_budgets_lock = threading.Lock()


def budget_for(owner, kind: str) -> LogBudget:
    """The budget of ``owner``'s lines of ``kind``, made on first use and gone with ``owner``."""
    try:
        return _budgets[owner][kind]
    except (KeyError, TypeError):  # (TypeError: an owner that cannot be weakly referenced: one budget a call)
        with _budgets_lock:
            try:
                kinds = _budgets.setdefault(owner, {})
            except TypeError:
                return LogBudget()
            return kinds.setdefault(kind, LogBudget())
