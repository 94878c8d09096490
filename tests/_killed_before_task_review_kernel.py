"""The real kernel (``aios-kernel serve``) with two faults injected on purpose: attempts of tenant ``held`` are held
at their start until a file appears (tests/_held_attempt_kernel.py), and the kernel kills itself (SIGKILL) when
such an attempt, its escalated decision recorded, comes to store its review: the instant between a task's
escalation record and its review row, which a random kill hits only now and then (tests/kill_cycles.py found it)::

    python tests/_killed_before_task_review_kernel.py MARKER serve --models ... (aios-kernel's own arguments)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from _held_attempt_kernel import HELD_TENANT, hold_attempts_until  # noqa: E402
from kernel import cli  # noqa: E402
from kernel.review import ReviewQueue  # noqa: E402


def killed_before_held_task_reviews() -> None:
    real = ReviewQueue.create_many

    def create_many(self, items, *args, **kwargs):
        if any(len(item) > 4 and item[4] and item[1].tenant == HELD_TENANT for item in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, items, *args, **kwargs)

    ReviewQueue.create_many = create_many


if __name__ == "__main__":
    hold_attempts_until(Path(sys.argv[1]))
    killed_before_held_task_reviews()
    sys.exit(cli.main(sys.argv[2:]))
