"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: killed while it stops.

On SIGTERM it drains and writes its "kernel stopping" record as a plain ``aios-kernel serve`` does, then,
instead of closing the audit log (whose final checkpoint signs that record), kills itself with SIGKILL: the
instant a supervisor's SIGKILL after its SIGTERM can land in (a crash audit found it, narrow but real)::

    python tests/_killed_while_stopping_kernel.py serve --models ... (aios-kernel's own arguments)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernel import cli  # noqa: E402
from kernel.audit import AuditLog  # noqa: E402


def killed_before_the_final_checkpoint(self, timeout_s=None):
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    AuditLog.close = killed_before_the_final_checkpoint
    sys.exit(cli.main(sys.argv[1:]))
