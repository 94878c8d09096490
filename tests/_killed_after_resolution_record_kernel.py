"""The real kernel (``aios-kernel serve``) with one fault injected on purpose: killed right after a resolution's
audit record, before the entry that says it was recorded (a crash audit found the instant: its delivery is
finished at the next start, which must find that record instead of writing a second one); a withdrawal's too (a
cancelled task's review), before the review is marked withdrawn::

    python tests/_killed_after_resolution_record_kernel.py JOURNAL serve --models ... (aios-kernel's own arguments)

It also writes JOURNAL, a line per store commit in commit order: ``durable`` for one fsynced, ``unsynced`` for one
not, followed by the idempotency key it stored when it was an idempotency entry. A test takes the commits after the
last durable one away, as a power cut can (tests/test_review_times_restart.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernel import cli  # noqa: E402
from kernel.review import ReviewQueue  # noqa: E402
from kernel.store.audit_needs import RESOLUTIONS_TENANT  # noqa: E402
from kernel.store.idempotency import IdempotencyStore  # noqa: E402
from kernel.store.sqlite import Database  # noqa: E402

_putting = threading.local()  # the idempotency key a thread's commit stores, if any


def killed_after_resolution_records(journal: Path) -> None:
    real_put, real_transact = IdempotencyStore.put, Database.transact
    lock = threading.Lock()

    def put(self, tenant, key, *args, **kwargs):
        if tenant == RESOLUTIONS_TENANT and key.startswith("review:"):  # (the "recorded" entry: after the record)
            os.kill(os.getpid(), signal.SIGKILL)
        _putting.key = key
        try:
            return real_put(self, tenant, key, *args, **kwargs)
        finally:
            _putting.key = ""

    def transact(self, work, durable=True, *args, **kwargs):
        result = real_transact(self, work, durable, *args, **kwargs)
        with lock, journal.open("a", encoding="utf-8") as out:
            out.write(f"{'durable' if durable else 'unsynced'} {getattr(_putting, 'key', '')}\n")
        return result

    def withdraw(self, *args, **kwargs):  # (its record is written before)
        os.kill(os.getpid(), signal.SIGKILL)

    IdempotencyStore.put, Database.transact, ReviewQueue.withdraw = put, transact, withdraw


if __name__ == "__main__":
    killed_after_resolution_records(Path(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
