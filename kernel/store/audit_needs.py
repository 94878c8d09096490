"""The oldest audit record a data dir's store may still read back: where ``aios-kernel audit archive`` must stop.

The kernel reads its audit log back from points the store keeps, and a record
archived away from under one of them would be missed without a word:

- a task the kernel stopped in (RUNNING) looks for the decision its attempt
  recorded from its ``audit_from_sequence`` on; missing it, the task would be
  decided a second time (the archive review: a clean stop leaves such a task);
- reviews and idempotency keys a crash lost are restored from the review mark;
- a resolution whose delivery was cut off looks for its own record from the
  note taken before recording it ("recording:" entries), so as not to record
  it twice.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .sqlite_reviews import RECORDED_BEFORE

RESOLUTIONS_TENANT = "__review_resolutions__"  # idempotency-store tenant recording each review's audited resolution
# (no caller can send it: kernel/limits.py RESERVED_TENANT_PREFIX)
RECORDING_PREFIX = "recording:"  # + review id: the log's size before that resolution was recorded


def oldest_needed(store: Path) -> tuple[int, str] | None:
    """(sequence, why) of the lowest audit record the store at ``store`` may read back, None if none."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        needs = []
        for (body,) in conn.execute("SELECT body FROM tasks WHERE state = ?", (kpb.RUNNING,)):
            task = kpb.Task.FromString(body)
            needs.append((task.audit_from_sequence, f"task {task.task_id} stopped in an attempt that began there"))
        found = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()
        if found is not None:
            needs.append((int(found[0]), "reviews and idempotency keys a crash lost are restored from there"))
        rows = conn.execute(
            "SELECT i.response, r.review_id FROM idempotency i JOIN reviews r ON i.key = ? || r.review_id"
            " WHERE i.tenant = ? AND r.delivered = 0", (RECORDING_PREFIX, RESOLUTIONS_TENANT))
        needs += [(int(response), f"the resolution of review {review_id} is still being delivered")
                  for response, review_id in rows]
    finally:
        conn.close()
    return min(needs, default=None)
