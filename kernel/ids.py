"""Random ids for the hot path: 64 bits of ``os.urandom`` each, fetched thousands at a time.

Request ids the caller did not send and review ids are made once per call.
``os.urandom(8)`` per id is a ``getrandom`` system call that also lets go of
the GIL, so under load each id could cost its thread a GIL hand-off: in a
Decide run on one core, py-spy found the finisher thread's review-id line at
17 % of its busy time; Decide calls/s rose 1.11-1.24x without it while other
load shared the host, and stayed the same on a quiet one (bench/RESULTS.md,
"Decide: two GIL hand-offs per decision removed"). Here one ``os.urandom``
call serves ``BATCH`` ids; each id is still 64 bits from the OS's
cryptographic source, used once.
"""

from __future__ import annotations

import itertools
import os

BATCH = 4096  # ids per os.urandom call (32 KiB of hex kept)

_counter = itertools.count()  # next() on it is atomic under the GIL: every id gets its own index
_pool: tuple[int, str] = (-1, "")  # (epoch, hex of BATCH * 8 random bytes), replaced as a whole


def _forget_pool() -> None:
    """A forked child must not hand out the ids its parent still holds: it fetches its own bytes."""
    global _counter, _pool
    _counter = itertools.count()
    _pool = (-1, "")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def random_hex() -> str:
    """16 hex digits (64 random bits), never the same digits twice from one pool."""
    global _pool
    epoch, index = divmod(next(_counter), BATCH)
    pool_epoch, digits = _pool
    if pool_epoch != epoch:
        # A new epoch (or a thread that was preempted across one): a fresh pool. Two threads refilling at
        # once each use their own pool for their own indices, so no bytes serve two ids.
        digits = os.urandom(BATCH * 8).hex()
        if epoch > pool_epoch:
            _pool = (epoch, digits)
    start = index * 16
    return digits[start:start + 16]
