"""Waiting for a count another thread moves to stop moving, for the tests of bounded streams and windows."""

from __future__ import annotations

import time
from collections.abc import Callable


def settled(read: Callable[[], int], quiet_s: float = 1.0, limit_s: float = 60.0) -> int:
    """``read()`` once it has not changed for ``quiet_s``; AssertionError if it still changes after ``limit_s``.

    The tests that use it bound a count from above (messages a producer ran ahead by), so a machine slow enough to
    pause a producer for ``quiet_s`` reads a smaller count: the test passes without proving its point, never fails
    for the pause.
    """
    deadline = time.monotonic() + limit_s
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    raise AssertionError(f"still changing after {limit_s} s: {value}")
