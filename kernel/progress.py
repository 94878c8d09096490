"""A line on stderr now and then while a long command works: `audit verify` of a year's log, an export, a backup.

Silent for the first seconds (a short run prints only its summary, as before), then one line every few seconds
saying how far it got, so an operator can tell a slow run from a hung one (an operator walk-through: minutes of
silence at the documented log growth).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

FIRST_AFTER_S = 5.0
EVERY_S = 10.0
COUNT_EVERY = 4096  # items between two looks at the clock in ``counted``


class Progress:
    """``progress(text)``: print ``<what>: <text> ...`` if it is time to (after ``first_after_s``, then every
    ``every_s``); cheap to call often."""

    def __init__(self, what: str, out: TextIO | None = None, first_after_s: float = FIRST_AFTER_S,
                 every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.what = what
        self._out = out
        self._every_s = every_s
        self._clock = clock
        self._next = clock() + first_after_s

    def __call__(self, text: str) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._every_s
        print(f"{self.what}: {text} ...", file=self._out or sys.stderr, flush=True)


def counted(items: Iterable[T], progress: Progress, unit: str) -> Iterator[T]:
    """``items`` as they are, telling ``progress`` how many went by (every ``COUNT_EVERY``)."""
    for count, item in enumerate(items, 1):
        if not count % COUNT_EVERY:
            progress(f"{count:,} {unit}")
        yield item
