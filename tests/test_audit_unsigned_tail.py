"""A start signs the records after the last checkpoint only when they continue the log, as a crash leaves them.

A helper's audit (2026-11-28) copied a kernel's segment in after its last one: the next start adopted the copy's
305 records (sequence numbers from 0 again, a chain that does not link), signed them with the kernel's key, and
``audit verify`` failed on them from then on. The open now checks the unsigned tail as ``audit verify`` checks every
record (kernel/audit/tail.py) and refuses, changing nothing. A real crash's tail (a writer killed before its
checkpoint) is still adopted, also right after an archive base.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pytest
from test_audit_adopted import crash_with_unsigned_records
from test_audit_verify import forge, parsed, read_frames

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditCorrupt, AuditLog, verify_directory
from kernel.audit.archive import archive

RECORDS = 30


def _frames_end(data: bytes) -> int:
    offset = 8
    while offset + 8 <= len(data) and (length := int.from_bytes(data[offset:offset + 4], "little")):
        offset += 8 + length
    return offset


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


def _append(path: Path, payload: bytes) -> None:
    data = path.read_bytes()
    end = _frames_end(data)
    with open(path, "r+b") as file:
        file.seek(end)
        file.write(_frame(payload))


def _last(path: Path) -> pb.AuditRecord:
    _, payloads = read_frames(path)
    return parsed([p for p in payloads if p][-1])


@pytest.fixture
def stopped_log(tmp_path) -> Path:
    """A log closed cleanly: every record signed."""
    directory = tmp_path / "audit"
    with AuditLog.open(directory) as log:
        for i in range(RECORDS):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 10)
    return directory


def _copied_segment(directory: Path) -> str:
    [segment] = sorted(directory.glob("*.seg"))
    shutil.copy(segment, directory / f"{RECORDS:020d}.seg")
    return f"record {RECORDS} ({RECORDS:020d}.seg) carries sequence 0"


def _edited_bytes_with_the_hash_kept(directory: Path) -> str:
    [segment] = sorted(directory.glob("*.seg"))
    last = _last(segment)
    record = pb.AuditRecord(kind=pb.DECISION, request_id="appended", sequence=RECORDS, prev_hash=last.hash)
    stored = forge(record)
    edited = pb.AuditRecord.FromString(stored[:-34])
    edited.request_id = "edited"
    _append(segment, edited.SerializeToString(deterministic=True) + stored[-34:])
    return f"record {RECORDS} (00000000000000000000.seg) does not hash to the hash stored with it"


def _unchained(directory: Path) -> str:
    [segment] = sorted(directory.glob("*.seg"))
    _append(segment, forge(pb.AuditRecord(kind=pb.DECISION, request_id="loose", sequence=RECORDS,
                                          prev_hash=bytes(range(32)))))
    return f"record {RECORDS} (00000000000000000000.seg) does not chain to record {RECORDS - 1}"


@pytest.mark.parametrize("craft", [_copied_segment, _edited_bytes_with_the_hash_kept, _unchained])
def test_an_unsigned_tail_that_does_not_continue_the_log_is_refused_and_nothing_changes(stopped_log, craft):
    said = craft(stopped_log)
    before = {path.name: path.read_bytes() for path in stopped_log.iterdir() if path.is_file() and path.name != "LOCK"}
    with pytest.raises(AuditCorrupt) as refused:
        AuditLog.open(stopped_log)
    assert said in refused.value.message, refused.value.message
    assert f"records {RECORDS}.." in refused.value.message and "nothing was changed on disk" in refused.value.message
    after = {path.name: path.read_bytes() for path in stopped_log.iterdir() if path.is_file() and path.name != "LOCK"}
    assert after == before
    assert not verify_directory(stopped_log).ok  # what verify says of it too


def test_a_crash_tail_right_after_an_archive_base_is_still_adopted(tmp_path):
    """The first unsigned record chains to the base's last hash, not to a leaf the tree holds."""
    directory = tmp_path / "audit"
    with AuditLog.open(directory, segment_bytes=4096) as log:
        for i in range(60):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"x" * 100), 10)
    archive(directory, tmp_path / "archived", before=60, no_store=True)
    assert not list(directory.glob("*.seg"))  # (20 records a segment: every one archived, the base at 60)
    crash_with_unsigned_records(directory, 5, tmp_path)  # killed before a checkpoint covers its 5 records
    with AuditLog.open(directory) as log:
        assert log.recovery["adopted"] == [60, 64]
    assert verify_directory(directory, strict=True).ok
