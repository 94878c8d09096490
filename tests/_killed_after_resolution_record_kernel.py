"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: killed right after a resolution's
audit record, before the entry that says it was recorded (a crash audit found the instant: its delivery is
finished at the next start, which must find that record instead of writing a second one)::

    python tests/_killed_after_resolution_record_kernel.py serve --models ... (aios-kernel's own arguments)
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
from kernel.store.audit_needs import RESOLUTIONS_TENANT  # noqa: E402
from kernel.store.idempotency import IdempotencyStore  # noqa: E402


def killed_after_resolution_records() -> None:
    real = IdempotencyStore.put

    def put(self, tenant, key, *args, **kwargs):
        if tenant == RESOLUTIONS_TENANT and key.startswith("review:"):  # (the "recorded" entry: after the record)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, tenant, key, *args, **kwargs)

    IdempotencyStore.put = put


if __name__ == "__main__":
    killed_after_resolution_records()
    sys.exit(cli.main(sys.argv[1:]))
