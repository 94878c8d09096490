"""``aios-kernel audit archive``: the oldest segments move out, a signed base stays, nothing is lost.

Logs are real ones written by ``AuditLog`` with small segments (many
boundaries to cut at). After an archive the live log must open, take new
records, prove them against roots the full history gives, verify strictly,
and refuse (FAILED_PRECONDITION) what only the archive holds; the archive
must verify on its own and hold exactly the records that left. A base that
was edited, checkpoints cut below it, or an archive stopped half-way are
each refused or finished, never silently accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from test_audit_verify import build_log, decision, read_frames, run_cli, write_frames

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc
from kernel.api import kernel_services
from kernel.api.audit_service import audit_handlers
from kernel.audit import AuditCorrupt, AuditLog, iter_directory, verify_directory
from kernel.audit.archive import ArchiveRefused, archive
from kernel.audit.base import FILE_NAME as BASE_FILE
from kernel.audit.errors import AuditArchived
from kernel.audit.merkle import verify_consistency, verify_inclusion
from kernel.audit.checkpoints import read_all as read_checkpoints
from kernel.audit.keys import load_public_key
from kernel.audit.segments import CHECKPOINT_MAGIC, frame
from kernel.backup import backup
from kernel.review import ReviewQueue
from kernel.store import open_database
from kernel.tasks import TaskStore

RECORDS = 300
SEGMENT_BYTES = 4096  # ~35 records a segment: a few boundaries to cut at


def rfc_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162's MTH, straight from its definition (the reference the kernel's trees are checked against)."""
    if len(leaves) == 1:
        return leaves[0]
    if not leaves:
        return hashlib.sha256(b"").digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + rfc_mth(leaves[:k]) + rfc_mth(leaves[k:])).digest()


@pytest.fixture
def log_dir(tmp_path) -> Path:
    directory = tmp_path / "audit"
    build_log(directory, records=RECORDS, checkpoint_every=7, segment_bytes=SEGMENT_BYTES)
    return directory


def segment_starts(directory: Path) -> list[int]:
    return sorted(int(path.stem) for path in directory.glob("*.seg"))


def hashes(directory: Path) -> list[bytes]:
    return [record.hash for record in iter_directory(directory)]


def test_archive_leaves_a_log_that_opens_grows_proves_and_verifies(log_dir, tmp_path):
    everything = hashes(log_dir)
    dest = tmp_path / "archive-1"
    result = archive(log_dir, dest, before=150, no_store=True)
    starts = segment_starts(log_dir)
    cut = result.end
    assert 0 < cut <= 150 and starts[0] == cut and result.first == 0  # cut at a segment boundary
    assert segment_starts(dest) == [s for s in segment_starts(dest) if s < cut] and segment_starts(dest)[0] == 0

    kept = verify_directory(dest, strict=True)
    assert kept.ok and kept.records == cut, kept.describe()
    assert "an archive" in kept.reason
    assert hashes(dest) == everything[:cut]
    live = verify_directory(log_dir, strict=True)
    assert live.ok and live.first_sequence == cut and live.records == RECORDS, live.describe()
    assert f"records {cut}..{RECORDS - 1}" in live.describe()

    with AuditLog.open(log_dir, checkpoint_records=7, checkpoint_ms=60_000, segment_bytes=SEGMENT_BYTES) as log:
        assert log.size == RECORDS and log.base.tree_size == cut
        for i in range(RECORDS, RECORDS + 100):  # rotates into new segments
            log.append_and_wait(decision(i), 10)
        everything += [record.hash for record in log.read(RECORDS)]
        size = log.size
        root = log.root(size)
        assert root == rfc_mth(everything)
        for index in (cut, cut + 1, RECORDS - 1, size - 1):
            assert verify_inclusion(everything[index], index, size, log.inclusion_proof(index, size), root)
        for old in (cut, cut + 5, RECORDS):
            assert verify_consistency(old, size, rfc_mth(everything[:old]), root, log.consistency_proof(old, size))
        assert [r.sequence for r in log.read(cut)][:2] == [cut, cut + 1]
        for call in (lambda: log.read(cut - 1), lambda: log.inclusion_proof(cut - 1, size),
                     lambda: log.consistency_proof(cut - 1, size), lambda: log.root(cut - 1), lambda: log.leaf(0)):
            with pytest.raises(AuditArchived, match=f"records 0..{cut - 1} were archived"):
                call()
    live = verify_directory(log_dir, strict=True)
    assert live.ok and live.records == RECORDS + 100 + 0 and live.first_sequence == cut, live.describe()


def test_a_second_archive_starts_where_the_first_ended(log_dir, tmp_path):
    everything = hashes(log_dir)
    first = archive(log_dir, tmp_path / "a1", before=100, no_store=True)
    second = archive(log_dir, tmp_path / "a2", before=250, no_store=True)
    assert second.first == first.end < second.end <= 250
    older = verify_directory(tmp_path / "a2", strict=True)
    assert older.ok and older.first_sequence == first.end and older.records == second.end, older.describe()
    assert hashes(tmp_path / "a1") + hashes(tmp_path / "a2") + hashes(log_dir) == everything
    assert verify_directory(log_dir, strict=True).ok
    with AuditLog.open(log_dir) as log:
        log.append_and_wait(decision(1), 10)
    assert verify_directory(log_dir, strict=True).ok


def test_archiving_every_record_leaves_a_log_that_goes_on(log_dir, tmp_path):
    everything = hashes(log_dir)
    result = archive(log_dir, tmp_path / "all", before=10 ** 9, no_store=True)
    assert result.end == RECORDS and not list(log_dir.glob("*.seg"))
    assert verify_directory(log_dir, strict=True).ok
    with AuditLog.open(log_dir) as log:
        assert log.size == RECORDS
        sequence, digest = log.append_and_wait(decision(7), 10)
        assert sequence == RECORDS
        record = next(iter(log.read(RECORDS)))
        assert record.prev_hash == everything[-1]  # the chain goes on from the archived last record
    done = verify_directory(log_dir, strict=True)
    assert done.ok and done.records == RECORDS + 1, done.describe()


def test_older_than_cuts_where_the_records_get_younger(log_dir, tmp_path):
    times = [record.time_unix_ns for record in iter_directory(log_dir)]
    now = times[200] + 86_400 * 10 ** 9  # record 200 is exactly one day old
    result = archive(log_dir, tmp_path / "old", older_than_days=1, now_unix_ns=now, no_store=True)
    assert 0 < result.end <= 200
    assert max(times[:result.end]) < times[200]
    starts = segment_starts(log_dir)
    following = starts[1] if len(starts) > 1 else RECORDS  # the segment kept first holds a record as young
    assert max(times[result.end:following]) >= times[200]


def test_nothing_to_archive_changes_nothing(log_dir, tmp_path):
    before = sorted(path.name for path in log_dir.iterdir())
    result = archive(log_dir, tmp_path / "none", before=3, no_store=True)
    assert result.end == result.first == 0
    assert sorted(path.name for path in log_dir.iterdir()) == before


def test_refusals_change_nothing(log_dir, tmp_path):
    before = sorted(path.name for path in log_dir.iterdir())
    with AuditLog.open(log_dir):
        with pytest.raises(ArchiveRefused, match="stop it first"):
            archive(log_dir, tmp_path / "x", before=100, no_store=True)
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("mine")
    with pytest.raises(ArchiveRefused, match="not an empty folder"):
        archive(log_dir, used, before=100, no_store=True)
    with pytest.raises(ArchiveRefused, match="inside the log directory"):
        archive(log_dir, log_dir / "old", before=100, no_store=True)
    other = tmp_path / "other"
    build_log(other, records=1)
    with pytest.raises(ArchiveRefused, match="does not verify with the signing key"):
        archive(log_dir, tmp_path / "y", before=100, key_path=other / "signing-key.pem", no_store=True)
    path = sorted(log_dir.glob("*.seg"))[2]
    data = bytearray(path.read_bytes())
    data[60] ^= 1  # inside a record of a middle segment
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match="does not verify"):
        archive(log_dir, tmp_path / "z", before=100, no_store=True)
    assert sorted(path.name for path in log_dir.iterdir()) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def edit_base(directory: Path, change) -> None:
    path = directory / BASE_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d["peaks"][0].update(hash="00" * 32), "peaks do not fold"),
    (lambda d: d.update(last_hash="11" * 32), "is not proven"),
    (lambda d: d.update(tree_size=d["tree_size"] - 1), "peaks are not those"),
    (lambda d: d.update(checkpoint="bm90IGEgY2hlY2twb2ludA=="), "not a readable archive base"),
])
def test_an_edited_base_is_refused(log_dir, tmp_path, change, fragment):
    archive(log_dir, tmp_path / "a", before=150, no_store=True)
    edit_base(log_dir, change)
    with pytest.raises(AuditCorrupt, match=fragment):
        AuditLog.open(log_dir)
    result = verify_directory(log_dir)
    assert not result.ok and fragment in result.reason


def test_checkpoints_cut_back_below_the_base_are_refused(log_dir, tmp_path):
    archive(log_dir, tmp_path / "a", before=150, no_store=True)
    (log_dir / "checkpoints.log").write_bytes((tmp_path / "a" / "checkpoints.log").read_bytes()[:100])
    with pytest.raises(AuditCorrupt, match="checkpoints were removed"):
        AuditLog.open(log_dir)


def test_an_archive_stopped_before_removing_its_segments_is_finished_by_the_next(log_dir, tmp_path, caplog):
    result = archive(log_dir, tmp_path / "a", before=150, no_store=True)
    for path in (tmp_path / "a").glob("*.seg"):  # as if the run stopped after writing the base
        shutil.copyfile(path, log_dir / path.name)
    assert verify_directory(log_dir, strict=True).ok
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        with AuditLog.open(log_dir) as log:
            assert log.size == RECORDS
    assert "hold only archived records" in caplog.text
    again = archive(log_dir, tmp_path / "b", before=result.end, no_store=True)
    assert again.end == result.end and again.removed_leftovers == len(list((tmp_path / "a").glob("*.seg")))
    assert segment_starts(log_dir)[0] == result.end and not (tmp_path / "b").exists()


def test_readers_and_backup_of_an_archived_log(log_dir, tmp_path, caplog):
    result = archive(log_dir, tmp_path / "a", before=150, no_store=True)
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        exported = [record.sequence for record in iter_directory(log_dir)]
    assert exported == list(range(result.end, RECORDS)) and "were archived" in caplog.text
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sqlite3.connect(data_dir / "kernel.sqlite3").close()
    shutil.copytree(log_dir, data_dir / "audit")
    copied = backup(data_dir, tmp_path / "copy")
    assert copied.ok, copied.summary
    assert (tmp_path / "copy" / "audit" / BASE_FILE).exists()
    assert verify_directory(tmp_path / "copy" / "audit", strict=True).ok


def test_archived_records_over_grpc_are_failed_precondition(log_dir, tmp_path):
    result = archive(log_dir, tmp_path / "a", before=150, no_store=True)
    log = AuditLog.open(log_dir, checkpoint_records=7, checkpoint_ms=60_000)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        kernel_services.generic_handlers(None, None, asynchronous=False, implemented=audit_handlers(log)))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kernel_pb2_grpc.AuditServiceStub(channel)
            for call in (lambda: list(stub.StreamAudit(pb.StreamAuditRequest(from_sequence=0))),
                         lambda: list(stub.StreamAuditBatches(pb.StreamAuditBatchesRequest())),
                         lambda: stub.GetInclusionProof(pb.InclusionProofRequest(sequence=result.end - 1)),
                         lambda: stub.GetConsistencyProof(pb.ConsistencyProofRequest(old_size=5))):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
                assert f"records 0..{result.end - 1} were archived" in info.value.details()
                assert dict(info.value.trailing_metadata())["aios-first-sequence"] == str(result.end)
            streamed = list(stub.StreamAudit(pb.StreamAuditRequest(from_sequence=result.end)))
            assert [r.sequence for r in streamed] == list(range(result.end, RECORDS))
            proof = stub.GetInclusionProof(pb.InclusionProofRequest(sequence=result.end))
            assert verify_inclusion(streamed[0].hash, result.end, proof.tree_size, list(proof.hashes), proof.root)
    finally:
        server.stop(grace=1)
        log.close()


def test_the_command_line(log_dir, tmp_path):
    done = run_cli("archive", str(log_dir), str(tmp_path / "a"), "--before", "150", "--no-store")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "archived records 0.." in done.stdout and "the live log starts at record" in done.stdout
    done = run_cli("verify", str(tmp_path / "a"), "--strict")
    assert done.returncode == 0 and "an archive" in done.stdout, done.stdout + done.stderr
    done = run_cli("archive", str(log_dir), str(tmp_path / "a"), "--before", "250", "--no-store")
    assert done.returncode == 2 and "not an empty folder" in done.stderr
    done = run_cli("archive", str(log_dir), str(tmp_path / "b"))
    assert done.returncode == 2 and "--before" in done.stderr
    done = run_cli("export", str(log_dir))
    assert done.returncode == 0 and "were archived" in done.stderr


def test_keys_found_in_the_directory_are_not_trusted_an_earlier_epoch_is_given(tmp_path):
    """A rotation: checkpoints by K1, then by K2. The archive signs with K2 over what it verified, so K1 must be
    given (--from-key); a key merely kept in public-keys/ could be anyone's (a review audit)."""
    directory = tmp_path / "audit"
    for key in ("k1.pem", "k2.pem"):
        key_id_of(tmp_path / key)  # (made here: a key the log has not seen yet is a new epoch's)
    for key in ("k1.pem", "k2.pem"):
        with AuditLog.open(directory, key_path=tmp_path / key, checkpoint_records=7, segment_bytes=SEGMENT_BYTES) as log:
            for i in range(120):
                log.append_and_wait(decision(i), 10)
    with pytest.raises(ArchiveRefused, match="not by the trusted key"):
        archive(directory, tmp_path / "a", before=200, key_path=tmp_path / "k2.pem", no_store=True)
    k1 = load_public_key(directory / "public-keys" / f"{key_id_of(tmp_path / 'k1.pem')}.pem")
    result = archive(directory, tmp_path / "a", before=200, key_path=tmp_path / "k2.pem", no_store=True,
                     from_keys=[k1])
    assert 120 < result.end <= 200
    assert verify_directory(directory, strict=True).ok


def key_id_of(private_pem: Path) -> str:
    from kernel.audit.keys import load_or_create

    return load_or_create(private_pem).key_id


def test_the_cut_stops_before_what_the_store_still_reads_back(log_dir, tmp_path):
    """The review mark and a task stopped mid-attempt: the kernel reads the log back from there at its next start
    (kernel/store/audit_needs.py), so the archive keeps those records (a review audit: a task decided twice)."""
    db = open_database(tmp_path)  # kernel.sqlite3 beside the log directory, as in a data dir
    try:
        ReviewQueue(db).close()
        db.reviews.mark_recorded_before(240)
        tasks = TaskStore(db)
        task, _ = tasks.create(pb.DecisionRequest(pipeline="p", tenant="t", request_id="x"))
        tasks.transition(task.task_id, pb.RUNNING, (pb.QUEUED,), "attempt 1", audit_from=120)
    finally:
        db.close()
    starts = segment_starts(log_dir)
    result = archive(log_dir, tmp_path / "a", before=10 ** 9)
    assert result.end == max(start for start in starts if start <= 120)  # the segment holding record 120 stays
    assert "held back" in result.held_back and "stopped in an attempt" in result.held_back
    assert segment_starts(log_dir)[0] == result.end

    lone = tmp_path / "lone" / "audit"  # a log with no store beside it: said, not guessed
    build_log(lone, records=3)
    with pytest.raises(ArchiveRefused, match="no kernel store beside the log"):
        archive(lone, tmp_path / "b", before=1)


def test_an_archive_cut_back_fails_its_verify(log_dir, tmp_path):
    """Cut back to one of its own checkpoints, an archive would verify as a shorter log: its archive.json names
    where it ends (and the live log's base signs that end: --min-records)."""
    result = archive(log_dir, tmp_path / "a", before=150, no_store=True)
    dest = tmp_path / "a"
    checkpoints = read_checkpoints(dest)[0]
    keep = [c for c in checkpoints if c.tree_size < result.end][-1]
    last = sorted(dest.glob("*.seg"))[-1]
    while int(last.stem) >= keep.tree_size:
        last.unlink()
        last = sorted(dest.glob("*.seg"))[-1]
    magic, payloads = read_frames(last)
    write_frames(last, magic, payloads[:keep.tree_size - int(last.stem)])
    (dest / "checkpoints.log").write_bytes(CHECKPOINT_MAGIC + b"".join(
        frame(c.SerializeToString()) for c in checkpoints if c.tree_size <= keep.tree_size))
    checked = verify_directory(dest, strict=True)
    assert not checked.ok and "records were removed" in checked.reason, checked.describe()


def test_no_store_is_refused_where_the_kernels_store_is_beside_the_log(log_dir, tmp_path):
    """(Operator walk-through) `--no-store` beside a kernel's store archived past what that store still reads back
    (the next start warned of tasks decided again)."""
    open_database(tmp_path).close()  # the log's folder is now a data dir with its store
    with pytest.raises(ArchiveRefused, match="is beside the log"):
        archive(log_dir, tmp_path / "a", before=100, no_store=True)
    assert not (tmp_path / "a").exists()


def test_nothing_to_archive_in_a_one_segment_log_says_why(tmp_path):
    directory = tmp_path / "audit"
    build_log(directory, records=20)  # default segment size: one segment
    result = archive(directory, tmp_path / "a", before=15, no_store=True)
    assert result.end == result.first == 0
    assert "the log is one segment, the one a kernel writes into" in result.summary(directory, tmp_path / "a")


def test_unsigned_records_are_never_archived_and_signed(log_dir, tmp_path):
    """(Session review) the archive verifies the log holding the log's writer lock, and its strict check took that
    lock for a live kernel's: records no checkpoint covered (here: the checkpoints after the second cut away, as
    someone without the key would leave forged records) were archived and signed by the base. --accept-adopted
    relaxes only the adopted-clean-stop check, not this one."""
    path = log_dir / "checkpoints.log"
    magic, payloads = read_frames(path)
    write_frames(path, magic, payloads[:3])  # signed up to 14 records; the rest unsigned
    assert not verify_directory(log_dir, strict=True).ok
    for accept in (False, True):
        with pytest.raises(ArchiveRefused, match="not covered by any signed checkpoint"):
            archive(log_dir, tmp_path / f"a{accept}", before=150, no_store=True, accept_adopted=accept)


def test_a_verify_that_meets_an_archive_moving_segments_out_says_so(log_dir):
    """`audit verify` run (a monitor's cron) while `audit archive` holds the log's LOCK and removes the segments it
    archived: a segment gone under the walk read "FAILED: cannot read the log: [Errno 2] No such file or directory",
    as if the log were damaged. The walk's own progress report stands in for the moment the archive removes the
    next segment (the LOCK held as the archive holds it)."""
    import fcntl
    import os

    segments = sorted(log_dir.glob("*.seg"))
    holder = os.open(log_dir / "LOCK", os.O_RDWR | os.O_CREAT)

    def archive_removes_the_next_segment(_: str) -> None:
        if segments[1].exists():
            segments[1].unlink()

    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = verify_directory(log_dir, progress=archive_removes_the_next_segment)
    finally:
        os.close(holder)
    assert not result.ok
    assert f"{segments[1].name} went away while verify read the log, and a process holds its LOCK" in result.reason
    assert "aios-kernel audit archive" in result.reason and "verify again" in result.reason, result.reason
