"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: its wall clock set OFFSET seconds on.

For tests of what a restart does with the times a stopped kernel stored (review leases and SLAs, idempotency
keys' lifetimes, task back-offs, all wall-clock ``*_unix_ns``): "the kernel came back two days later", or "NTP
stepped the clock back an hour", without waiting and without libfaketime (not installed here)::

    python tests/_wall_clock_offset_kernel.py OFFSET_S serve --models ... (aios-kernel's own arguments)

Only ``time.time_ns`` moves, and before the kernel is imported (its modules bind it as a default clock and at
import): that is the clock of every instant the kernel stores. ``time.time`` is left alone: gRPC reads the
calls' deadlines against it, and moving it would expire every call. The monotonic clocks are untouched.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def offset_wall_clock(offset_s: float) -> None:
    real = time.time_ns
    offset_ns = round(offset_s * 1e9)
    time.time_ns = lambda: real() + offset_ns


if __name__ == "__main__":
    offset_wall_clock(float(sys.argv[1]))
    from kernel import cli  # noqa: E402  (after the clock moved: see above)

    sys.exit(cli.main(sys.argv[2:]))
