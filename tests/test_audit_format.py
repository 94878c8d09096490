"""A log file of a newer format than this kernel reads is said to be that, not damage (an upgrade audit: after a
rollback across a format change the start said "does not start with the expected file header" and `audit verify`
"FAILED at record 0", which reads as tampering to a compliance team)."""

from __future__ import annotations

import pytest

from test_audit_verify import run_cli

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog
from kernel.audit.errors import AuditFormatTooNew


def a_newer_format(tmp_path, name: str):
    """A real log whose ``name`` file (a segment or checkpoints.log) has its header's version byte raised."""
    with AuditLog.open(tmp_path) as log:
        for i in range(3):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 10)
    path = sorted(tmp_path.glob(name))[0]
    data = bytearray(path.read_bytes())
    data[7] += 1
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("name", ["*.seg", "checkpoints.log"])
def test_a_newer_file_format_is_named_as_such_by_the_open_and_by_verify(tmp_path, name):
    path = a_newer_format(tmp_path, name)
    before = path.read_bytes()
    with pytest.raises(AuditFormatTooNew, match=r"file format \d was written by a newer aios-kernel; this one "):
        AuditLog.open(tmp_path)
    done = run_cli("verify", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr  # could not run: not FAILED
    assert "was written by a newer aios-kernel" in done.stderr and "FAILED" not in done.stdout
    assert path.read_bytes() == before


def test_export_of_a_newer_segment_format_could_not_run_rather_than_calls_the_log_damaged(tmp_path):
    """``audit export`` said such a log "does not verify" and exited 1, as for damage."""
    a_newer_format(tmp_path, "*.seg")
    done = run_cli("export", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "was written by a newer aios-kernel" in done.stderr and "does not verify" not in done.stderr
