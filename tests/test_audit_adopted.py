"""Records no signed checkpoint covers: a crash leaves them, a clean stop never does, and a forger can add them.

The next open signs them (crash recovery must go on working), so it must say
so: a WARNING naming the range, its last hash and where such records come
from. ``audit verify --strict`` fails on them while no kernel has the log
open. The crash is a real kill -9 of a writer process; the forgery is a
well-formed, chained record appended to a real kernel's log by someone
without the key (test_audit_verify's ``forge``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from claims_support import build_small_model
from conftest import start_kernel
from test_audit_verify import forge, frame, run_cli

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditError, AuditLog, verify_directory
from kernel.audit.segments import MAGIC
from kernel.testing.processes import killed_after

ROOT = Path(__file__).resolve().parent.parent

# Checkpoints neither by count nor by time while it runs: only the tree-size-0 head is signed.
UNSIGNED_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from kernel.audit import AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], checkpoint_records=1_000_000, checkpoint_ms=600_000)
    for i in range(int(sys.argv[3])):
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 30)
    print("written", flush=True)
    sys.stdin.read()  # killed here
""")


def crash_with_unsigned_records(directory: Path, records: int, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(UNSIGNED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(directory), str(ROOT), str(records)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with killed_after(proc):
        assert proc.stdout.readline().strip() == "written", proc.stderr.read()


def adopted_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("audit: adopting records")]


def test_a_crash_tail_fails_strict_verify_and_is_adopted_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "audit"
    crash_with_unsigned_records(directory, 30, tmp_path)

    done = run_cli("verify", str(directory))  # the default still passes: a crash is no damage
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("the last 30 are chained but not yet signed (records 0..29: a crash leaves this, a clean stop never "
            "does; the next start signs them; --strict fails here)") in done.stdout
    done = run_cli("verify", str(directory), "--strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED in records 0..29: not covered by any signed checkpoint (the last covers 0 records)" in done.stdout

    with caplog.at_level(logging.WARNING, logger="aios.audit"), AuditLog.open(directory) as log:
        assert log.size == 30 and log.latest_checkpoint().tree_size == 30  # recovery goes on: signed at once
        last_hash = log.leaf(29).hex()
        assert log.recovery == {"adopted": [0, 29], "adopted_last_hash": last_hash, "cuts": [],
                                "previous_key_id": ""}
    [warning] = adopted_warnings(caplog)
    assert warning.startswith(f"audit: adopting records 0..29 of {directory} (the last one's hash {last_hash[:16]}): "
                              "no signed checkpoint covered them. A crash of the kernel that wrote them leaves such "
                              "a tail, a clean stop never does")
    assert f"`aios-kernel audit export {directory} --from 0`" in warning

    assert run_cli("verify", str(directory), "--strict").returncode == 0  # signed now
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aios.audit"), AuditLog.open(directory) as log:
        assert log.recovery["adopted"] is None  # closed cleanly last time: nothing to adopt
    assert not adopted_warnings(caplog)


def test_strict_allows_the_unsigned_tail_of_a_log_a_kernel_has_open(tmp_path):
    with AuditLog.open(tmp_path, checkpoint_records=1000, checkpoint_ms=600_000) as log:
        for i in range(5):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 10)
        result = verify_directory(tmp_path, strict=True)  # its next checkpoint signs them: no failure
        assert result.ok, result.reason
        assert "the last 5 are chained but not yet signed (the log is open" in result.describe()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return build_small_model(tmp_path_factory.mktemp("models"))


def append_forged(directory: Path) -> int:
    """Append a chained, correctly hashed REVIEW_RESOLUTION after the last record (over the segment's zero
    tail): what someone who can write the directory, but has no key, can add. Returns its sequence."""
    path = sorted(directory.glob("*.seg"))[-1]
    data = path.read_bytes()
    offset, last = len(MAGIC), None
    while int.from_bytes(data[offset:offset + 4], "little"):
        length = int.from_bytes(data[offset:offset + 4], "little")
        last = pb.AuditRecord.FromString(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    fake = pb.AuditRecord(kind=pb.REVIEW_RESOLUTION, sequence=last.sequence + 1, prev_hash=last.hash,
                          principal="alice", links_to=1, has_link=True)
    fake.decision.action = "approve"
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(frame(forge(fake)))
    return fake.sequence


def test_a_record_appended_to_a_cleanly_stopped_kernel_log_is_flagged(models, tmp_path, caplog):
    data_dir = tmp_path / "data"
    start_kernel(models, data_dir=str(data_dir)).stop(grace=1)
    audit = data_dir / "audit"
    assert run_cli("verify", str(audit), "--strict").returncode == 0  # a clean stop signs every record
    forged = append_forged(audit)

    done = run_cli("verify", str(audit), "--strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAILED at record {forged}: not covered by any signed checkpoint (the last covers {forged} records)" \
        in done.stdout

    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        server = start_kernel(models, data_dir=str(data_dir))
    try:
        assert server.decisions.audit.recovery["adopted"] == [forged, forged]
    finally:
        server.stop(grace=1)
    [warning] = adopted_warnings(caplog)
    assert warning.startswith(f"audit: adopting records {forged}..{forged} of {audit}")
    assert "if it stopped cleanly they were added by someone without the key" in warning
    # ...and on the record, where an auditor reads the log months later: the start's own record names them.
    import json

    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.audit import RecordFilter, iter_directory
    started = [json.loads(r.payload) for r in iter_directory(audit, forged + 1, RecordFilter(kind=kpb.CONFIG_CHANGE))]
    assert started[0]["event"] == "kernel started" and started[0]["recovery"]["adopted"] == [forged, forged]

    # Signed now, by the start that adopted it: still no kernel had opened the log after the clean stop before it
    # (a helper's audit: this passed --strict --from-key, with a note calling the stop unclean).
    done = run_cli("verify", str(audit), "--strict", "--from-key", str(audit / "public-key.pem"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"FAILED at record {forged}: records {forged}..{forged} follow the clean stop at #{forged - 1}, yet no "
            "kernel opened the log before them") in done.stdout
    assert f"`aios-kernel audit export --from {forged}`" in done.stdout


# A kernel's life on a bare AuditLog: its start and stop records as the kernel writes them (kernel/decisions.py).
def _kernel_event(log: AuditLog, event: dict) -> None:
    import json

    log.append_and_wait(pb.AuditRecord(kind=pb.CONFIG_CHANGE, principal="kernel", payload=json.dumps(event).encode()),
                        10)


CRASHING_KERNEL = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    from kernel.audit import AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], checkpoint_records=1_000_000, checkpoint_ms=600_000)
    log.append_and_wait(pb.AuditRecord(kind=pb.CONFIG_CHANGE, principal="kernel",
                                       payload=json.dumps({"event": "kernel started"}).encode()), 30)
    for i in range(3):
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"after-restart-{i}"), 30)
    print("written", flush=True)
    sys.stdin.read()  # killed here, before its first checkpoint
""")


def test_a_kernel_killed_before_its_first_checkpoint_after_a_clean_stop_still_passes_strict(tmp_path):
    """What the rule above must not fail: a clean stop, a start, a kill -9 before the new kernel's first
    checkpoint, a start that adopts its records. The open after the clean stop signed the size it found, so the
    records after the stop follow a kernel's open, and --strict passes (listing them)."""
    directory = tmp_path / "audit"
    with AuditLog.open(directory) as log:
        _kernel_event(log, {"event": "kernel started"})
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id="before"), 10)
        _kernel_event(log, {"event": "kernel stopping"})
    script = tmp_path / "kernel.py"
    script.write_text(CRASHING_KERNEL)
    proc = subprocess.Popen([sys.executable, str(script), str(directory), str(ROOT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with killed_after(proc):
        assert proc.stdout.readline().strip() == "written", proc.stderr.read()
    with AuditLog.open(directory, sign_adopted=False) as log:
        assert log.recovery["adopted"] == [3, 6]
        _kernel_event(log, {"event": "kernel started", "recovery": log.recovery})
        log.adoption_recorded()
        _kernel_event(log, {"event": "kernel stopping"})

    done = run_cli("verify", str(directory), "--strict")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "records 3..6 were signed by the start at #7, after an unclean stop" in done.stdout


def test_a_start_refused_after_the_log_opened_leaves_the_unsigned_tail_unsigned(models, tmp_path):
    """An upgrade audit: the open signed the tail at once, and the start record naming it comes later; a start
    refused in between (here: kernel.sqlite3 moved aside) left the tail signed with nothing on the log saying so,
    and `audit verify --strict` passed from then on. Now the tail is signed only once that record is durable."""
    from kernel.errors import FailedPrecondition
    from kernel.store.sqlite import DATABASE_FILE

    data_dir = tmp_path / "data"
    start_kernel(models, data_dir=str(data_dir)).stop(grace=1)
    audit = data_dir / "audit"
    forged = append_forged(audit)
    (data_dir / DATABASE_FILE).rename(tmp_path / "aside")
    with pytest.raises(FailedPrecondition, match="refusing to start"):
        start_kernel(models, data_dir=str(data_dir))
    (tmp_path / "aside").rename(data_dir / DATABASE_FILE)

    done = run_cli("verify", str(audit), "--strict")
    assert done.returncode == 1 and f"FAILED at record {forged}: not covered by any signed checkpoint" in done.stdout

    server = start_kernel(models, data_dir=str(data_dir))  # a start that goes through names it, then signs it
    server.stop(grace=1)
    done = run_cli("verify", str(audit))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"records {forged}..{forged} follow the clean stop at #{forged - 1}" in done.stdout  # listed
    done = run_cli("verify", str(audit), "--strict")  # and, signed or not, no kernel opened the log before it
    assert done.returncode == 1 and f"FAILED at record {forged}: records {forged}..{forged} follow the clean stop" \
        in done.stdout, done.stdout + done.stderr


def _cleanly_stopped_kernel_log(directory: Path) -> None:
    with AuditLog.open(directory) as log:
        _kernel_event(log, {"event": "kernel started"})
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id="before"), 10)
        _kernel_event(log, {"event": "kernel stopping"})


def test_a_process_holding_the_lock_does_not_pass_records_appended_after_a_clean_stop(tmp_path):
    """(A helper's audit) `flock LOCK sleep 600` beside a stopped kernel's log made `verify --strict` take the
    forged tail for a live kernel's records about to be signed: "OK ... (the log is open: its next checkpoint
    signs them)". A kernel that opened the log after its clean stop signed the size it found; none did here."""
    import fcntl

    directory = tmp_path / "audit"
    _cleanly_stopped_kernel_log(directory)
    forged = append_forged(directory)
    holder = os.open(directory / "LOCK", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = run_cli("verify", str(directory), "--strict")
    finally:
        os.close(holder)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAILED at record {forged}: not covered by any signed checkpoint" in done.stdout
    assert (f"(a process holds the log's LOCK, but no kernel opened the log after the clean stop at #{forged - 1}: it "
            "is not a kernel writing these records)") in done.stdout


def test_strict_allows_the_unsigned_tail_of_a_kernel_that_opened_the_log_after_a_clean_stop(tmp_path):
    directory = tmp_path / "audit"
    _cleanly_stopped_kernel_log(directory)
    with AuditLog.open(directory, checkpoint_records=1000, checkpoint_ms=600_000) as log:
        for i in range(3):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"after-{i}"), 10)
        result = verify_directory(directory, strict=True)
        assert result.ok, result.reason
        assert "the last 3 are chained but not yet signed (the log is open" in result.describe()


def _append_in_a_new_segment(directory: Path, after: pb.AuditRecord) -> int:
    """A chained, correctly hashed record in a segment of its own after ``after`` (the log's segments all archived:
    the live directory holds none to append to)."""
    from kernel.audit.segments import segment_name

    fake = pb.AuditRecord(kind=pb.REVIEW_RESOLUTION, sequence=after.sequence + 1, prev_hash=after.hash,
                          principal="alice", links_to=1, has_link=True)
    (directory / segment_name(fake.sequence)).write_bytes(MAGIC + frame(forge(fake)))
    return fake.sequence


def test_records_appended_after_a_whole_log_was_archived_are_flagged_as_after_a_clean_stop(tmp_path):
    """(A helper's audit) Archiving a stopped log whole moves its "kernel stopping" record out of the walk, so a
    record appended to the empty live directory no longer followed a clean stop: `flock LOCK` made --strict pass
    it as a live kernel's, and so did a restart that adopted it, even with the archive base's checkpoint, the one
    signed at the cut, copied into checkpoints.log as if a kernel had opened the log there."""
    import base64
    import fcntl
    import json

    from kernel.audit import iter_directory
    from kernel.audit.archive import archive

    directory = tmp_path / "audit"
    with AuditLog.open(directory, segment_bytes=4096) as log:
        _kernel_event(log, {"event": "kernel started"})
        for i in range(60):  # a few segments: the last boundary is the log's end
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"before-{i}"), 10)
        _kernel_event(log, {"event": "kernel stopping"})
    result = archive(directory, tmp_path / "all", before=10 ** 9, no_store=True)
    assert not list(directory.glob("*.seg")), result.summary(directory, tmp_path / "all")
    last = list(iter_directory(tmp_path / "all"))[-1]
    forged = _append_in_a_new_segment(directory, last)
    base_checkpoint = base64.b64decode(json.loads((directory / "archive-base.json").read_text())["checkpoint"])
    with open(directory / "checkpoints.log", "ab") as f:
        f.write(frame(base_checkpoint))

    holder = os.open(directory / "LOCK", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = verify_directory(directory, strict=True)
    finally:
        os.close(holder)
    assert not held.ok and held.first_bad_sequence == forged, held.describe()
    assert "no kernel opened the log after the archive base" in held.reason, held.reason

    with AuditLog.open(directory, sign_adopted=False) as log:
        assert log.recovery["adopted"] == [forged, forged]
        _kernel_event(log, {"event": "kernel started", "recovery": log.recovery})
        log.adoption_recorded()
        _kernel_event(log, {"event": "kernel stopping"})
    done = run_cli("verify", str(directory), "--strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAILED at record {forged}: records {forged}..{forged} follow the archive base" in done.stdout


def test_a_kernel_that_opened_a_whole_archived_log_and_was_killed_still_passes_strict(tmp_path):
    directory = tmp_path / "audit"
    with AuditLog.open(directory, segment_bytes=4096) as log:
        _kernel_event(log, {"event": "kernel started"})
        for i in range(60):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"before-{i}"), 10)
        _kernel_event(log, {"event": "kernel stopping"})
    from kernel.audit.archive import archive

    archive(directory, tmp_path / "all", before=10 ** 9, no_store=True)
    script = tmp_path / "kernel.py"
    script.write_text(CRASHING_KERNEL)
    proc = subprocess.Popen([sys.executable, str(script), str(directory), str(ROOT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with killed_after(proc):
        assert proc.stdout.readline().strip() == "written", proc.stderr.read()
    with AuditLog.open(directory, sign_adopted=False) as log:
        adopted = log.recovery["adopted"]
        _kernel_event(log, {"event": "kernel started", "recovery": log.recovery})
        log.adoption_recorded()
        _kernel_event(log, {"event": "kernel stopping"})
    done = run_cli("verify", str(directory), "--strict")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"records {adopted[0]}..{adopted[1]} were signed by the start" in done.stdout


def test_a_lock_file_that_links_to_another_logs_lock_does_not_pass_a_crash_tail(tmp_path):
    """(A helper's audit) `LOCK` replaced by a symbolic link to the lock of another log a running kernel holds: verify
    --strict read that kernel's flock as this log's writer and passed the crash tail, "the log is open: its next
    checkpoint signs them", with no process of the one who made the link; and this log's kernel could not start
    ("already open"). The lock is this directory's own file: a link is none."""
    directory = tmp_path / "audit"
    crash_with_unsigned_records(directory, 30, tmp_path)
    with AuditLog.open(tmp_path / "other" / "audit"):  # another log, open: its LOCK is held
        (directory / "LOCK").unlink()
        (directory / "LOCK").symlink_to(tmp_path / "other" / "audit" / "LOCK")
        done = run_cli("verify", str(directory), "--strict")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "FAILED in records 0..29: not covered by any signed checkpoint" in done.stdout
        with pytest.raises(AuditError, match="LOCK is a symbolic link"):
            AuditLog.open(directory)
