"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: each durable step takes longer.

For the random-kill harness (tests/kill_cycles.py): a kill lands in the gap between two steps (a group's
fsync and its answers, an escalation's record and its review row, a task's transitions, a resolution's
record and its bookkeeping, a segment's rollover, a checkpoint) only as often as the gap is long, and most
gaps here are microseconds. Every ``os.fsync`` and every store transaction is followed by a random pause of
up to ``PAUSE_S``, so the instants between steps are as likely a kill's as the steps themselves::

    python tests/_slow_steps_kernel.py serve --models ... (aios-kernel's own arguments)

Nothing else changes: the same pipeline, model, policy, audit log and store as a plain ``aios-kernel serve``.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernel import cli  # noqa: E402
from kernel.store.sqlite import Database  # noqa: E402

PAUSE_S = 0.004


def slow_steps() -> None:
    real_fsync, real_transact = os.fsync, Database.transact

    def fsync_then_pause(fd):
        real_fsync(fd)
        time.sleep(random.uniform(0, PAUSE_S))

    def transact_then_pause(self, *args, **kwargs):
        try:
            return real_transact(self, *args, **kwargs)
        finally:
            time.sleep(random.uniform(0, PAUSE_S))

    os.fsync = fsync_then_pause  # (before the kernel is built: every module calls os.fsync through os)
    Database.transact = transact_then_pause


if __name__ == "__main__":
    slow_steps()
    sys.exit(cli.main(sys.argv[1:]))
