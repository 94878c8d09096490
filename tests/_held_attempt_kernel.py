"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: task attempts held RUNNING.

For the restart test, which must kill a kernel while a task's attempt runs: a real attempt takes
milliseconds, so one is held at its start until a file appears (a file, because the kernel and the test
are two processes, and the hold must outlive a SIGKILL and a restart)::

    python tests/_held_attempt_kernel.py MARKER serve --models ... (aios-kernel's own arguments)

Every attempt of a task whose request's tenant is ``held`` waits until MARKER exists, then runs the
claims pipeline, model, policy and audit log as a plain ``aios-kernel serve`` does; every other task,
and everything else the kernel does, is untouched.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernel import cli  # noqa: E402
from kernel.decisions import DecisionSide  # noqa: E402

HELD_TENANT = "held"
POLL_S = 0.02  # how often a held attempt looks for its file (it waits on another process)


def hold_attempts_until(marker: Path) -> None:
    real_run = DecisionSide._run_task

    def held_until_the_file_appears(self, task):
        if task.request.tenant == HELD_TENANT:
            while not marker.exists():
                time.sleep(POLL_S)
        return real_run(self, task)

    DecisionSide._run_task = held_until_the_file_appears  # (before the kernel is built: its runner takes this one)


if __name__ == "__main__":
    hold_attempts_until(Path(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
