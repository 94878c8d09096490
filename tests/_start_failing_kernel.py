"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: its start fails once the log is open.

Loading the models raises ENOSPC, as writing a model's MODEL_DEPLOY record does on a full disk: the start fails
after the audit log and the store are open and before the reviews a crash left unopened are reopened, and the
kernel releases what it holds (its stop steps) before it exits::

    python tests/_start_failing_kernel.py serve --models ... (aios-kernel's own arguments)
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernel import cli  # noqa: E402
from kernel.models import ModelHub  # noqa: E402


def load_all_on_a_full_disk(self):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


if __name__ == "__main__":
    ModelHub.load_all = load_all_on_a_full_disk
    sys.exit(cli.main(sys.argv[1:]))
