"""``audit archive --older-than DAYS`` moves only segments whose every record is older than DAYS, also when the
wall clock was set back while they were written.

Record times are the wall clock's. Here it was set back 40 days for a while (an NTP step, a host booted before
its clock was set) and then put right: a real log written by ``AuditLog`` with small segments, each record dated
as that clock read when it was written (the writer keeps a time set on a record). The first segment holds
records written today and ends with some dated 40 days back: it is not older than 30 days, and stays.
"""

from __future__ import annotations

import time

from test_audit_verify import decision

from kernel.audit import AuditLog, iter_directory
from kernel.audit.archive import archive

DAY_NS = 86_400 * 10**9
RECORDS = 120
SET_BACK = range(25, 50)  # records written while the clock was 40 days behind
SEGMENT_BYTES = 4096  # about 35 records a segment: the first ends among the records dated back


def test_older_than_keeps_a_segment_with_young_records_whose_last_ones_were_dated_back(tmp_path):
    directory, now = tmp_path / "audit", time.time_ns()
    with AuditLog.open(directory, checkpoint_records=10, checkpoint_ms=60_000, segment_bytes=SEGMENT_BYTES) as log:
        for i in range(RECORDS):
            record = decision(i)
            record.time_unix_ns = now - 40 * DAY_NS if i in SET_BACK else now
            log.append_and_wait(record, 10)
    second = sorted(int(path.stem) for path in directory.glob("*.seg"))[1]
    assert second - 1 in SET_BACK and second > SET_BACK.start, "the first segment must end among the records set back"

    result = archive(directory, tmp_path / "old", older_than_days=30, no_store=True)
    assert result.end == 0, f"records #0-#{result.end - 1} archived; #0-#{SET_BACK.start - 1} were written today"
    assert len(list(iter_directory(directory))) == RECORDS
