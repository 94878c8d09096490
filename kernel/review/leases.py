"""Lapsing leases as events: a timer on the earliest running lease of the review queue.

A lease runs out without anything being written (from then on the review
simply reads as OPEN), so the change feed had nothing to say and a queue
board built on WatchReviews showed the case claimed for good. ``LeaseTimer``
sleeps until the earliest running lease ends (or a claim brings an earlier
one), then asks the store which leases lapsed since its last look and
publishes each. It never polls: between expiries it waits on a condition,
and with no lease running it sleeps until a claim wakes it.

Leases are wall-clock times (they are persisted), waits are not: a wait is
cut at ``MAX_WAIT_S`` so that a wall clock set forward is noticed within
that time, not a lease's 24 hours later; one set back is noticed by the
first lease that ends before the last look (``expect``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import FailedPrecondition
from ..observability.repeats import RepeatedFailure
from ..threads import name_native_thread

log = logging.getLogger("aios.review")

NS = 1_000_000_000
MAX_WAIT_S = 60.0
SLACK_S = 0.001  # wake just after the lease ends, so the store sees it ended
RETRY_S = 1.0  # after a failed look at the store

# lapsed(after_unix_ns) -> (now, reviews whose lease ended in (after, now], earliest lease still running or 0)
Lapsed = Callable[[int], tuple[int, list, int]]


class LeaseTimer:
    """Calls ``lapsed(after)`` when the earliest lease it knows of has ended; started by ``start()``."""

    def __init__(self, lapsed: Lapsed, clock: Callable[[], int], name: str = "aios-leases"):
        self._lapsed = lapsed
        self._clock = clock
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # wall-clock ns of the earliest lease end known to be pending; 0 = none
        self._checked = clock()  # leases that ended up to here have been looked at
        self._pass = threading.Lock()  # one look at a time (the thread, or a test calling check())
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._settled = True  # the thread is waiting with no look due and no wake-up pending (settled())
        self._failing = RepeatedFailure(log, "publishing lapsed review leases")

    def start(self) -> None:
        """Start the thread (once; not after ``stop``). Its first look finds the leases already running."""
        with self._cond:
            if self._thread is not None or self._stopped:
                return
            self._checked = self._clock()  # a lease that lapsed before anyone watched is no news now
            self._next = self._checked  # look at once: learn the earliest lease from the store
            self._settled = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def expect(self, expires_unix_ns: int) -> None:
        """A lease now ends at ``expires_unix_ns``: wake earlier for it if need be (a claim or a renewal)."""
        with self._cond:
            if expires_unix_ns and expires_unix_ns <= self._checked:
                # The wall clock was set back (an NTP step, a VM resumed) below the last look's time: this lease
                # ends before it, and a look from there on never found it lapse (a board showed it claimed for
                # good). The next look starts just before it; a lapse told again then is harmless.
                self._checked = expires_unix_ns - 1
            if expires_unix_ns and (not self._next or expires_unix_ns < self._next):
                self._next = expires_unix_ns
                self._settled = False
                self._cond.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread for good (the kernel is stopping); a look in progress finishes first."""
        with self._cond:
            self._stopped = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def settled(self) -> bool:
        """Whether the thread (if started) has made every look due by the clock and woken for every claim:
        what a test waits for before it moves a settable clock, or the thread's late first look would
        take a lapse the test means to find itself."""
        with self._cond:
            return self._settled

    def check(self) -> int:
        """Look for leases that ended since the last look and publish them (via ``lapsed``); how many."""
        with self._pass:
            after = self._checked
            now, reviews, next_expiry = self._lapsed(after)
            with self._cond:  # (a wall clock set back must not repeat a lapse: max; but see expect)
                self._checked = max(after, now) if self._checked == after else min(self._checked, now)
        self.expect(next_expiry)
        return len(reviews)

    def _run(self) -> None:
        name_native_thread()
        while self._wait_until_due():
            try:
                self.check()
            except FailedPrecondition:  # the database was closed under us: the kernel is stopping
                return
            except Exception as exc:
                self._failing.failed(f"{type(exc).__name__}: {exc}; trying again in {RETRY_S:g} s")
                self.expect(self._clock() + int(RETRY_S * NS))
                continue
            self._failing.succeeded()

    def _wait_until_due(self) -> bool:
        """Block until the earliest pending lease has ended (True) or ``stop()`` (False)."""
        with self._cond:
            while not self._stopped:
                due = self._next
                left_s = None if not due else (due - self._clock()) / NS
                if left_s is not None and left_s <= 0:
                    # Forget it: the look finds every lease still running and expects the earliest again.
                    self._next = 0
                    return True
                self._settled = True
                self._cond.wait(None if left_s is None else min(left_s + SLACK_S, MAX_WAIT_S))  # none: until a claim
                self._settled = False
            return False
