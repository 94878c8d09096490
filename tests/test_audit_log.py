"""The audit log itself: chaining, durability waits, reading back, rotation, checkpoints, recovery, faults.

Every test works on a real directory (real files, real fsync); the writer
failure is a real EFBIG from a file-size limit set in a child process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import (
    GENESIS_PREV_HASH, AuditCorrupt, AuditError, AuditLog, AuditTimeout, canonical_bytes, leaf_hash,
    verify_directory,
)
from kernel.config import SettingsError, load_settings
from kernel.errors import InvalidArgument, ResourceExhausted

ROOT = Path(__file__).resolve().parent.parent


def decision(i: int, tenant: str = "acme", pipeline: str = "claims", kind: int = pb.DECISION) -> pb.AuditRecord:
    record = pb.AuditRecord(kind=kind, tenant=tenant, pipeline=pipeline, principal="svc", request_id=f"req-{i}",
                            pipeline_version="v1", payload=json.dumps({"i": i}).encode())
    record.decision.request_id = f"req-{i}"
    record.decision.action = "approve" if i % 2 else "review"
    record.inputs["amount"].number_value = float(i)
    record.model_outputs["approve"] = 0.5
    return record


def segments_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_records_are_chained_hashed_and_durable(tmp_path):
    with AuditLog.open(tmp_path) as log:
        tickets = [log.append(decision(i)) for i in range(50)]
        results = [ticket.wait(10) for ticket in tickets]
        assert [seq for seq, _ in results] == list(range(50))
        assert log.size == 50
        records = list(log.read())
    previous = GENESIS_PREV_HASH
    for record, (seq, digest) in zip(records, results):
        assert record.sequence == seq
        assert record.prev_hash == previous
        assert record.hash == digest == leaf_hash(canonical_bytes(record))
        assert record.time_unix_ns > 0
        assert record.request_id == f"req-{seq}"
        previous = digest
    assert verify_directory(tmp_path).ok


def test_append_many_hands_a_group_to_the_writer_at_once(tmp_path):
    with AuditLog.open(tmp_path) as log:
        log.append(decision(0)).wait(10)
        groups_before = log.stats()["groups"]
        tickets = log.append_many([decision(i) for i in range(1, 41)])
        assert [t.sequence for t in tickets] == list(range(1, 41))
        assert tickets[-1].wait(10)[0] == 40 and all(t.wait(0)[0] == t.sequence for t in tickets)
        assert log.stats()["groups"] - groups_before <= 2  # one fsync for the lot (two if the writer woke mid-append)
        with pytest.raises(InvalidArgument):
            log.append_many([decision(41), pb.AuditRecord()])  # a record without a kind: nothing is queued
        assert log.append(decision(41)).wait(10)[0] == 41
    assert verify_directory(tmp_path).ok


def test_write_here_commits_on_the_callers_thread_when_the_writer_is_idle(tmp_path):
    with AuditLog.open(tmp_path, checkpoint_ms=60_000) as log:
        idle = threading.Event()
        while not log._sleeping:  # noqa: SLF001 - the writer thread has gone to sleep (nothing to do)
            idle.wait(0.001)
        tickets = log.append_many([decision(i) for i in range(5)], write_here=True)
        assert log.size == 5  # durable on return: written and fsynced by this thread, no writer hand-off
        assert [t.wait(0)[0] for t in tickets] == list(range(5))
        assert log.stats()["groups"] == 1


def test_write_here_and_the_writer_thread_share_one_gapless_chain(tmp_path):
    with AuditLog.open(tmp_path, checkpoint_records=25) as log:
        got: list[int] = []
        lock = threading.Lock()

        def work(k: int) -> None:
            for i in range(40):
                records = [decision(k * 1000 + i * 10 + j) for j in range(1 + i % 3)]
                sequences = [t.wait(10)[0] for t in log.append_many(records, write_here=bool((k + i) % 2))]
                with lock:
                    got.extend(sequences)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(got) == list(range(len(got)))
        assert log.latest_checkpoint().tree_size >= len(got) - 25
    assert verify_directory(tmp_path).ok


def test_append_fills_the_callers_record_and_rejects_bad_ones(tmp_path):
    with AuditLog.open(tmp_path) as log:
        record = decision(0)
        record.time_unix_ns = 1234  # a caller's own time is kept
        seq, digest = log.append_and_wait(record, 10)
        assert (record.sequence, record.hash, record.time_unix_ns) == (seq, digest, 1234)
        with pytest.raises(InvalidArgument, match="kind"):
            log.append(pb.AuditRecord(tenant="x"))
        with pytest.raises(InvalidArgument, match="AuditRecord"):
            log.append(pb.Decision())
    with pytest.raises(AuditError, match="closed"):
        log.append(decision(1))


def test_many_threads_get_distinct_gapless_sequences(tmp_path):
    got: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(100):
            seq, _ = log.append_and_wait(decision(i, tenant=f"t{t}"), 10)
            with lock:
                got.append(seq)

    with AuditLog.open(tmp_path) as log:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(got) == list(range(1600))
    assert verify_directory(tmp_path).ok


def test_read_filters_and_from_sequence(tmp_path):
    with AuditLog.open(tmp_path, segment_bytes=4096) as log:
        for i in range(300):
            kind = pb.CONFIG_CHANGE if i % 10 == 0 else pb.DECISION
            log.append(decision(i, tenant=f"t{i % 3}", pipeline=f"p{i % 2}", kind=kind))
        log.append_and_wait(decision(300), 10)
        assert len(segments_of(tmp_path)) > 5  # the index and segment hops are exercised
        assert [r.sequence for r in log.read(0)] == list(range(301))
        assert [r.sequence for r in log.read(257)] == list(range(257, 301))
        assert [r.sequence for r in log.read(10, tenant="t1", pipeline="p0")] == [
            i for i in range(10, 300) if i % 3 == 1 and i % 2 == 0
        ]
        assert [r.sequence for r in log.read(kind=pb.CONFIG_CHANGE)] == list(range(0, 300, 10))
        times = [r.time_unix_ns for r in log.read()]
        middle = times[150]
        assert all(r.time_unix_ns >= middle for r in log.read(since_unix_ns=middle))
        assert all(r.time_unix_ns < middle for r in log.read(until_unix_ns=middle))
        assert len(list(log.read(since_unix_ns=middle))) + len(list(log.read(until_unix_ns=middle))) == 301
        assert list(log.read(5000)) == []


def test_follow_waits_for_new_records_and_stops_on_request(tmp_path):
    with AuditLog.open(tmp_path) as log:
        log.append_and_wait(decision(0), 10)
        stop = threading.Event()
        seen: list[int] = []
        reached = threading.Event()

        def follow() -> None:
            for record in log.read(0, follow=True, stop=stop):
                seen.append(record.sequence)
                if len(seen) == 21:
                    reached.set()

        reader = threading.Thread(target=follow)
        reader.start()
        for i in range(1, 21):
            log.append_and_wait(decision(i), 10)
        assert reached.wait(10)
        stop.set()
        reader.join(5)
        assert not reader.is_alive()
        assert seen == list(range(21))


def test_follow_ends_when_the_log_closes(tmp_path):
    log = AuditLog.open(tmp_path)
    done = threading.Event()

    def follow() -> None:
        list(log.read(0, follow=True))
        done.set()

    reader = threading.Thread(target=follow)
    reader.start()
    log.close()
    assert done.wait(5)
    reader.join()


def test_reopen_continues_the_chain_and_checks_the_last_checkpoint(tmp_path):
    with AuditLog.open(tmp_path, segment_bytes=4096) as log:
        for i in range(100):
            log.append(decision(i))
        last_hash = log.append_and_wait(decision(100), 10)[1]
    with AuditLog.open(tmp_path, segment_bytes=4096) as log:
        assert log.size == 101
        seq, _ = log.append_and_wait(decision(101), 10)
        assert seq == 101
        assert list(log.read(101))[0].prev_hash == last_hash
        assert log.latest_checkpoint().tree_size == 101  # the newest one signed on open/close
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 102


def test_segments_rotate_by_size_and_are_named_by_first_sequence(tmp_path):
    with AuditLog.open(tmp_path, segment_bytes=8192) as log:
        for i in range(400):
            log.append(decision(i))
        log.append_and_wait(decision(400), 10)
    segments = segments_of(tmp_path)
    assert len(segments) > 3
    assert all(path.stat().st_size <= 8192 for path in segments)
    firsts = [int(path.stem) for path in segments]
    assert firsts[0] == 0 and firsts == sorted(firsts)
    with AuditLog.open(tmp_path) as log:
        for path in segments:
            assert next(iter(log.read(int(path.stem)))).sequence == int(path.stem)


def test_checkpoint_every_n_records(tmp_path):
    with AuditLog.open(tmp_path, checkpoint_records=10, checkpoint_ms=60_000, group_max=10) as log:
        for i in range(95):
            log.append_and_wait(decision(i), 10)
        # Each group of <= 10 records that brings 10 or more unsigned records gets a checkpoint.
        assert log.latest_checkpoint().tree_size >= 90
    from kernel.audit.checkpoints import read_all

    sizes = [c.tree_size for c in read_all(tmp_path)[0]]
    assert sizes[0] == 0 and sizes[-1] == 95  # the genesis head, ..., the one signed on close
    assert all(b - a <= 10 for a, b in zip(sizes, sizes[1:-1]))


@pytest.mark.parametrize("write_here", [False, True], ids=["writer", "here"])
def test_checkpoint_after_t_ms_without_more_records(tmp_path, write_here):
    """Also for records a caller wrote itself: the writer thread still signs them on its timer."""
    with AuditLog.open(tmp_path, checkpoint_records=1_000_000, checkpoint_ms=50) as log:
        log.append_many([decision(0)], write_here=write_here)[0].wait(10)
        log.append_many([decision(1)], write_here=write_here)[0].wait(10)
        signed = threading.Event()

        def poll():  # the writer signs on its own timer; watch for it without sleeping blindly
            while not signed.is_set():
                if log.latest_checkpoint().tree_size == 2:
                    signed.set()
                signed.wait(0.01)

        watcher = threading.Thread(target=poll)
        watcher.start()
        assert signed.wait(5), "no checkpoint within 5 s of the last record (checkpoint_ms=50)"
        watcher.join()


def test_async_mode_acknowledges_and_verifies(tmp_path):
    with AuditLog.open(tmp_path, mode="async", checkpoint_records=100) as log:
        for i in range(500):
            log.append(decision(i))
        assert log.append_and_wait(decision(500), 10)[0] == 500
    assert verify_directory(tmp_path).ok


def test_bad_options_are_named(tmp_path):
    with pytest.raises(InvalidArgument, match="mode"):
        AuditLog.open(tmp_path, mode="fast")
    with pytest.raises(InvalidArgument, match="segment_bytes"):
        AuditLog.open(tmp_path, segment_bytes=10)
    with pytest.raises(InvalidArgument, match="checkpoint_records"):
        AuditLog.open(tmp_path, checkpoint_records=0)


def test_ticket_timeout(tmp_path):
    with AuditLog.open(tmp_path) as log:
        # 20,000 records take the writer tens of milliseconds; the last one cannot be durable
        # a moment after it was appended.
        tickets = [log.append(decision(i)) for i in range(20_000)]
        with pytest.raises(AuditTimeout, match="record 19999 was not durable within 0 s"):
            tickets[-1].wait(0)
        assert tickets[-1].wait(30) == (19_999, log.leaf(19_999))


def test_pending_records_are_bounded(tmp_path):
    with AuditLog.open(tmp_path, max_pending=100) as log:
        accepted = []
        with pytest.raises(ResourceExhausted, match="the audit writer is behind: 100 records wait") as info:
            for i in range(100_000):  # appending faster than the writer writes
                accepted.append(log.append(decision(i)))
        assert 100 <= len(accepted) < 100_000
        # A hint, and nothing recorded: the clients send it again (they send no hintless RESOURCE_EXHAUSTED again)
        trailers = dict(info.value.trailers)
        assert int(trailers["retry-after-ms"]) >= 10 and trailers["aios-not-decided"] == "1"
        accepted[-1].wait(30)
        assert log.append_and_wait(decision(0), 10)[0] == len(accepted)


def logical_end(segment: Path) -> int:
    """Just past the last frame of a segment (its zero tail, if any, follows)."""
    data = segment.read_bytes()
    offset = 8  # past the file header
    while offset + 8 <= len(data) and int.from_bytes(data[offset:offset + 4], "little"):
        offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
    return offset


@pytest.mark.parametrize("preallocate_bytes", [1 << 20, 0], ids=["preallocated", "append-only"])
def test_torn_tail_is_cut_logged_and_kept(tmp_path, caplog, preallocate_bytes):
    with AuditLog.open(tmp_path, preallocate_bytes=preallocate_bytes) as log:
        for i in range(20):
            log.append(decision(i))
        log.append_and_wait(decision(20), 10)
    segment = segments_of(tmp_path)[-1]
    intact = logical_end(segment)
    assert (segment.stat().st_size > intact) == bool(preallocate_bytes)  # a zero tail only when preallocated
    with open(segment, "r+b") as f:  # a crash mid-group: a frame header promising more than was written
        f.seek(intact)
        f.write((500).to_bytes(4, "little") + b"\x00" * 4 + b"partial record bytes")
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        log = AuditLog.open(tmp_path, preallocate_bytes=preallocate_bytes)
    try:
        assert log.size == 21
        assert log.dropped_bytes == 28
        assert "dropped 28 bytes after record 20" in caplog.text
        assert segment.stat().st_size == intact
        kept = list(tmp_path.glob("*.torn-*"))
        assert len(kept) == 1 and kept[0].read_bytes().endswith(b"partial record bytes")
        assert log.append_and_wait(decision(21), 10)[0] == 21
    finally:
        log.close()
    assert verify_directory(tmp_path).ok


def test_open_refuses_a_log_changed_under_its_checkpoint(tmp_path):
    with AuditLog.open(tmp_path) as log:
        for i in range(30):
            log.append(decision(i))
        log.append_and_wait(decision(30), 10)
    segment = segments_of(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    offset = 8  # past the file header: walk to record 5's frame
    for _ in range(5):
        offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
    data[offset + 20] ^= 0x01  # record 5's checksum fails, in the (only, so last) segment
    segment.write_bytes(bytes(data))
    with pytest.raises(AuditCorrupt, match=r"record 5 at byte offset \d+: .*a signed checkpoint covers records 0\.\.30"):
        AuditLog.open(tmp_path)  # cutting at the damage would drop records a checkpoint covers
    assert segment.read_bytes() == bytes(data)  # and nothing was cut
    assert not list(tmp_path.glob("*.torn-*"))


def test_open_refuses_a_missing_segment(tmp_path):
    with AuditLog.open(tmp_path, segment_bytes=4096) as log:
        for i in range(100):
            log.append(decision(i))
        log.append_and_wait(decision(100), 10)
    segments_of(tmp_path)[1].unlink()
    with pytest.raises(AuditCorrupt, match=r"records are missing \(a segment was removed or renamed\)"):
        AuditLog.open(tmp_path)


def test_open_refuses_a_copied_segment_saying_it_overlaps(tmp_path):
    """A segment copied under another name (a restore gone wrong) is named as an overlap, not as a removal."""
    with AuditLog.open(tmp_path, segment_bytes=4096) as log:
        for i in range(100):
            log.append(decision(i))
        log.append_and_wait(decision(100), 10)
    first = segments_of(tmp_path)[0]
    copy = first.with_name(f"{1:0{len(first.stem)}d}{first.suffix}")  # records 0.. under a name saying 1..
    copy.write_bytes(first.read_bytes())
    with pytest.raises(AuditCorrupt, match=rf"{copy.name} starts at record 1 but the segments before it end at "
                                           r"\d+: it overlaps the segment before it \(a segment was copied or renamed\)"):
        AuditLog.open(tmp_path)


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_open_refuses_records_whose_checkpoints_were_removed(tmp_path, how):
    """A log signs tree size 0 before its first record, so records with no checkpoint mean the file was taken
    away: signing a fresh checkpoint over them would vouch for records nothing proves untouched."""
    with AuditLog.open(tmp_path) as log:
        for i in range(5):
            log.append(decision(i))
        log.append_and_wait(decision(5), 10)
    checkpoints = tmp_path / "checkpoints.log"
    checkpoints.unlink() if how == "removed" else checkpoints.write_bytes(b"")
    with pytest.raises(AuditCorrupt, match="holds 6 records but no signed checkpoint"):
        AuditLog.open(tmp_path)
    # Nothing signed over them: the file stays as it was found (at most a header, were one written).
    assert (checkpoints.read_bytes() == b"") if how == "emptied" else not checkpoints.exists()


def test_signing_key_is_created_private_and_reused(tmp_path):
    key = tmp_path / "keys" / "audit.pem"
    with AuditLog.open(tmp_path / "log", key_path=key) as log:
        first = log.public_key
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with AuditLog.open(tmp_path / "log", key_path=key) as log:
        assert log.public_key == first and len(first) == 32
    assert (tmp_path / "log" / "public-key.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


WRITER_UNDER_FILE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from kernel.audit import AuditError, AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], checkpoint_records=10**9, checkpoint_ms=10**9)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
    here = sys.argv[3] == "here"  # the caller writes its own records (append_many's write_here)
    acked = 0
    try:
        for i in range(100000):
            record = pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"x" * 200)
            seq, _ = log.append_many([record], write_here=here)[0].wait(10)
            acked = seq + 1
    except AuditError as exc:
        print("first error:", exc.message, flush=True)
    try:
        log.append(pb.AuditRecord(kind=pb.DECISION))
    except AuditError as exc:
        print("later append:", exc.message, flush=True)
    print("acked", acked, flush=True)
    log.close()
""")


@pytest.mark.parametrize("who", ["writer", "here"])
def test_writer_failure_fails_waiters_and_later_appends(tmp_path, who):
    """A real write error (EFBIG past RLIMIT_FSIZE, in a child process): fail-stop, nothing acknowledged falsely,
    whether the writer thread or the appending caller (write_here) hit it."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER_UNDER_FILE_LIMIT)
    directory = tmp_path / "log"
    done = subprocess.run([sys.executable, str(script), str(directory), str(ROOT), who], capture_output=True,
                          text=True, timeout=60)
    lines = done.stdout.splitlines()
    first = [line for line in lines if line.startswith("first error:")]
    assert first and "File too large" in first[0], done.stdout + done.stderr
    # Whoever hit it, its callers hear that the audit log stopped, and not the server's paths (an audit: the
    # caller that wrote its own group got a bare "OSError: [Errno 27] File too large: '/…/00000000.seg'").
    assert "the audit log failed" in first[0] or "was not written" in first[0], first[0]
    assert str(tmp_path) not in done.stdout and ".seg" not in first[0], first[0]
    assert any(line.startswith("later append:") and "takes no more records" in line for line in lines)
    acked = int(lines[-1].split()[1])
    assert acked > 10
    with AuditLog.open(directory) as log:  # the repaired log holds at least every acknowledged record
        assert log.size >= acked
        assert [r.request_id for r in log.read(0)][:acked] == [f"r{i}" for i in range(acked)]
    assert verify_directory(directory).ok


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"audit_mode": "sometimes"}, "audit_mode (from --audit-mode) must be one of fsync, async"),
        ({"audit_checkpoint_records": 0}, "audit_checkpoint_records (from --audit-checkpoint-records) must be >= 1"),
        ({"audit_checkpoint_ms": 0}, "audit_checkpoint_ms (from --audit-checkpoint-ms) must be > 0"),
        ({"audit_segment_bytes": 100}, "audit_segment_bytes (from --audit-segment-bytes) must be >= 4096"),
        ({"audit_preallocate_bytes": -1}, "audit_preallocate_bytes (from --audit-preallocate-bytes) must be 0..67108864 (64 MiB; 0 = append), got -1"),
        ({"audit_stream_enabled": "maybe"}, "audit_stream_enabled (from --audit-stream-enabled) must be bool"),
    ],
)
def test_audit_settings_are_validated(overrides, fragment):
    with pytest.raises(SettingsError) as info:
        load_settings(None, overrides, environ={})
    assert fragment in str(info.value)


def test_audit_settings_layers(tmp_path):
    defaults = load_settings(environ={})
    assert (defaults.audit_mode, defaults.audit_stream_enabled, defaults.audit_key) == ("fsync", False, "")
    config = tmp_path / "kernel.toml"
    config.write_text('[kernel]\naudit_mode = "async"\naudit_stream_enabled = true\naudit_checkpoint_ms = 250\n')
    settings = load_settings(config, environ={"AIOS_AUDIT_SEGMENT_BYTES": "1048576", "AIOS_AUDIT_KEY": "/k.pem"})
    assert settings.audit_mode == "async" and settings.audit_stream_enabled is True
    assert settings.audit_checkpoint_ms == 250.0 and settings.audit_segment_bytes == 1 << 20
    assert settings.audit_key == "/k.pem"
    assert load_settings(config, environ={"AIOS_AUDIT_STREAM_ENABLED": "off"}).audit_stream_enabled is False
    assert defaults.audit_preallocate_bytes == 256 << 10
    assert load_settings(config, environ={"AIOS_AUDIT_PREALLOCATE_BYTES": "0"}).audit_preallocate_bytes == 0


def test_one_open_log_per_directory(tmp_path):
    with AuditLog.open(tmp_path):
        with pytest.raises(AuditError, match="already open"):
            AuditLog.open(tmp_path)
    with AuditLog.open(tmp_path) as log:  # free again once closed
        assert log.size == 0
