"""Preallocated audit segments: the zero tail ahead of the records, on real files with real fsync.

The writer keeps the bytes after its write position written as zeros, so a
segment ends in unused zeros: reopening, recovery, the live reader, the
directory reader, verify and export must all treat them as unused space,
and garbage inside them (a crash mid-group) as a torn tail.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog, export_jsonl, iter_directory, verify_directory
from kernel.audit.segments import MAGIC, MAGIC_V1, FrameScanner, frame, zeros_from

CHUNK = 8192  # small, so segments are zero-filled at creation and again part-way


def decision(i: int) -> pb.AuditRecord:
    record = pb.AuditRecord(kind=pb.DECISION, tenant="acme", pipeline="claims", request_id=f"req-{i}",
                            payload=json.dumps({"i": i}).encode())
    record.decision.action = "approve"
    return record


def segments_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def logical_end(data: bytes) -> int:
    offset = len(MAGIC)
    while offset + 8 <= len(data) and int.from_bytes(data[offset:offset + 4], "little"):
        offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
    return offset


def write_log(directory: Path, count: int, **options) -> bytes:
    """``count`` records; returns the last one's hash."""
    with AuditLog.open(directory, **options) as log:
        for i in range(count - 1):
            log.append(decision(i))
        return log.append_and_wait(decision(count - 1), 10)[1]


# --------------------------------------------------------------------------- the format
def test_a_zero_header_ends_the_frames_cleanly():
    data = MAGIC + frame(b"one") + frame(b"two") + bytes(100)
    scanner = FrameScanner(data, len(MAGIC))
    assert [payload for _, payload in scanner] == [b"one", b"two"]
    assert (scanner.end, scanner.problem, scanner.torn) == (len(MAGIC) + 22, None, False)
    short = MAGIC + frame(b"one") + bytes(5)  # fewer zeros than a header: still unused space
    scanner = FrameScanner(short, len(MAGIC))
    assert len(list(scanner)) == 1 and scanner.problem is None


@pytest.mark.parametrize("tail,torn", [
    (bytes(4096) + b"\x07", True),  # zeros, then bytes of the same group: its first page never reached the disk
    (b"\x00\x00\x00\x00\x01\x00\x00\x00" + bytes(64), True),  # a header half written
    (frame(b"three")[:-2] + b"\x00\x00" + bytes(64), True),  # a frame whose end was never written
    (frame(b"three")[:-1] + b"!" + bytes(64), False),  # a whole frame with a wrong byte: damage
])
def test_bytes_after_the_last_frame_are_a_torn_tail_or_damage(tail, torn):
    data = MAGIC + frame(b"one") + tail
    scanner = FrameScanner(data, len(MAGIC))
    assert [payload for _, payload in scanner] == [b"one"]
    assert scanner.end == len(MAGIC) + 11
    assert scanner.problem is not None and scanner.torn is torn


def test_segments_end_in_synced_zeros_and_never_pass_segment_bytes(tmp_path):
    write_log(tmp_path, 1500, segment_bytes=32 * 1024, preallocate_bytes=CHUNK)
    segments = segments_of(tmp_path)
    assert len(segments) > 3
    for path in segments:
        data = path.read_bytes()
        end = logical_end(data)
        assert end < len(data) <= 32 * 1024  # a zero tail, inside the segment limit
        assert zeros_from(data, end)
    assert verify_directory(tmp_path).ok


# --------------------------------------------------------------------------- reopening
def test_reopen_keeps_the_zero_tail_and_continues_the_chain(tmp_path, caplog):
    last_hash = write_log(tmp_path, 50, preallocate_bytes=CHUNK)
    segment = segments_of(tmp_path)[0]
    size_before = segment.stat().st_size
    end_before = logical_end(segment.read_bytes())
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        with AuditLog.open(tmp_path, preallocate_bytes=CHUNK) as log:
            assert log.dropped_bytes == 0 and log.size == 50
            assert segment.stat().st_size == size_before  # the zeros are kept, not cut
            assert log.append_and_wait(decision(50), 10)[0] == 50
            assert list(log.read(50))[0].prev_hash == last_hash
    assert "dropped" not in caplog.text and "torn" not in caplog.text
    assert not list(tmp_path.glob("*.torn-*"))
    assert segments_of(tmp_path) == [segment]  # written in place, inside the zeros
    data = segment.read_bytes()
    assert logical_end(data) > end_before and len(data) == size_before
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 51


@pytest.mark.parametrize("gap", [0, 4096], ids=["at-the-end", "after-zeros"])
def test_garbage_in_the_zero_tail_is_a_torn_tail_cut_and_kept(tmp_path, caplog, gap):
    write_log(tmp_path, 30, preallocate_bytes=CHUNK)
    segment = segments_of(tmp_path)[0]
    intact = logical_end(segment.read_bytes())
    garbage = b"\x2a\x01\x00\x00" + os.urandom(4) + b"half a record"
    with open(segment, "r+b") as f:  # a crash mid-group inside the preallocated area
        f.seek(intact + gap)
        f.write(garbage)
    result = verify_directory(tmp_path)
    assert not result.ok and result.first_bad_sequence == 30 and result.records == 30
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        log = AuditLog.open(tmp_path, preallocate_bytes=CHUNK)
    try:
        assert log.size == 30 and log.dropped_bytes == gap + len(garbage)
        assert f"dropped {gap + len(garbage)} bytes after record 29" in caplog.text
        kept = list(tmp_path.glob("*.torn-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == bytes(gap) + garbage  # the zeros after it are not kept
        assert segment.stat().st_size == intact  # cut; the next write zero-fills again
        assert log.append_and_wait(decision(30), 10)[0] == 30
        assert zeros_from(segment.read_bytes(), logical_end(segment.read_bytes()))
        assert segment.stat().st_size > logical_end(segment.read_bytes())
    finally:
        log.close()
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 31


def test_append_only_segments_open_verify_and_take_preallocation(tmp_path, caplog):
    """Segments written before preallocation (no zero tail) read as before; writing on preallocates."""
    write_log(tmp_path, 300, segment_bytes=8192, preallocate_bytes=0)
    old = segments_of(tmp_path)
    assert all(logical_end(path.read_bytes()) == path.stat().st_size for path in old)
    assert verify_directory(tmp_path).ok
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        with AuditLog.open(tmp_path, segment_bytes=8192, preallocate_bytes=CHUNK) as log:
            assert log.dropped_bytes == 0 and log.size == 300
            for i in range(300, 599):
                log.append(decision(i))
            log.append_and_wait(decision(599), 10)
            assert [r.sequence for r in log.read(0)] == list(range(600))
    assert not caplog.text
    new = segments_of(tmp_path)[len(old):]
    assert new and all(path.stat().st_size == 8192 for path in new[:-1])  # whole segments zero-filled at creation
    with AuditLog.open(tmp_path, segment_bytes=8192, preallocate_bytes=0) as log:  # and back: still one log
        assert log.append_and_wait(decision(600), 10)[0] == 600
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 601


def test_version_1_segments_read_as_before_and_are_relabelled_before_zeros_go_in(tmp_path):
    """A log written before preallocation (header version 1, append-only): every reader takes it;
    the writer relabels the segment it continues as version 2 before writing zeros into it, so a
    kernel that knows only version 1 refuses the file by its header rather than misreading it."""
    write_log(tmp_path, 200, segment_bytes=8192, preallocate_bytes=0)
    for path in segments_of(tmp_path):  # what the previous kernel version wrote: the same bytes, header 1
        data = bytearray(path.read_bytes())
        assert data[:len(MAGIC)] == MAGIC
        data[:len(MAGIC_V1)] = MAGIC_V1
        path.write_bytes(bytes(data))
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 200
    assert [r.sequence for r in iter_directory(tmp_path, 0)] == list(range(200))
    *full, last = segments_of(tmp_path)
    with AuditLog.open(tmp_path, segment_bytes=8192, preallocate_bytes=CHUNK) as log:
        assert log.size == 200
        assert log.append_and_wait(decision(200), 10)[0] == 200
    assert last.read_bytes()[:len(MAGIC)] == MAGIC  # continued, so relabelled
    assert all(path.read_bytes()[:len(MAGIC_V1)] == MAGIC_V1 for path in full)  # untouched
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 201


# --------------------------------------------------------------------------- readers
def test_rotation_and_every_reader_skip_the_zero_tails(tmp_path):
    write_log(tmp_path, 700, segment_bytes=16 * 1024, preallocate_bytes=CHUNK)
    segments = segments_of(tmp_path)
    assert len(segments) > 5
    assert [r.sequence for r in iter_directory(tmp_path)] == list(range(700))
    assert [r.sequence for r in iter_directory(tmp_path, 650)] == list(range(650, 700))  # the header walk
    with AuditLog.open(tmp_path, segment_bytes=16 * 1024, preallocate_bytes=CHUNK) as log:
        assert [r.sequence for r in log.read(0)] == list(range(700))
        for path in segments:
            assert next(iter(log.read(int(path.stem)))).sequence == int(path.stem)
    out = _Lines()
    assert export_jsonl(iter_directory(tmp_path), out) == 700
    assert [json.loads(line)["sequence"] for line in out.lines] == list(range(700))
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 700 and not result.reason


class _Lines:
    def __init__(self):
        self.lines: list[str] = []
        self._part = ""

    def write(self, text: str) -> None:
        self._part += text
        if self._part.endswith("\n"):
            self.lines.append(self._part[:-1])
            self._part = ""


def test_follow_sees_each_record_written_over_the_zeros_it_read_ahead(tmp_path):
    """A follower that has read (and buffered) the zeros after record k must still see record k+1 there."""
    with AuditLog.open(tmp_path, segment_bytes=4096, preallocate_bytes=CHUNK) as log:
        stop = threading.Event()
        seen: list[int] = []
        arrived = threading.Condition()
        failed: list[BaseException] = []

        def follow() -> None:
            try:
                for record in log.read(0, follow=True, stop=stop):
                    with arrived:
                        seen.append(record.sequence)
                        arrived.notify_all()
            except BaseException as exc:  # reported below, not lost in the thread
                failed.append(exc)
                with arrived:
                    arrived.notify_all()

        reader = threading.Thread(target=follow)
        reader.start()
        try:
            for i in range(120):  # one at a time, crossing several rotations
                log.append_and_wait(decision(i), 10)
                with arrived:
                    assert arrived.wait_for(lambda: len(seen) > i or failed, 10), i
                assert not failed, failed
        finally:
            stop.set()
            reader.join(10)
        assert seen == list(range(120))
        assert len(segments_of(tmp_path)) > 2


def test_verify_of_an_open_log_passes_over_its_zero_tail(tmp_path):
    with AuditLog.open(tmp_path, preallocate_bytes=CHUNK) as log:
        for i in range(40):
            log.append(decision(i))
        log.append_and_wait(decision(40), 10)
        result = verify_directory(tmp_path)
        assert result.ok and result.records == 41 and not result.reason


# --------------------------------------------------------------------------- a full disk
def test_zeros_that_cannot_be_written_do_not_fail_the_records_written_before_them(tmp_path, monkeypatch, caplog):
    """(Crash audit) on a full disk the zero-fill after a group's records failed, the group was answered failed,
    and the next start adopted and signed its records anyway. The zeros only make later fsyncs cheaper: the
    group stands, and the segment goes on without them."""
    import errno

    from kernel.audit.segments import SegmentFile

    def disk_full(self, chunk):  # fault injected on purpose: no room for the zeros
        raise OSError(errno.ENOSPC, "No space left on device")

    with AuditLog.open(tmp_path, preallocate_bytes=CHUNK) as log:
        log.append_and_wait(decision(0), 10)
        monkeypatch.setattr(SegmentFile, "_zero_fill", disk_full)
        with caplog.at_level(logging.WARNING, logger="aios.audit"):
            for i in range(1, 400):  # well past the first chunk of zeros
                assert log.append_and_wait(decision(i), 10)[0] == i
    assert "without preallocation" in caplog.text
    monkeypatch.undo()
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 400, result.describe()


def test_a_group_that_failed_is_cut_back_off_so_no_start_adopts_it(tmp_path, monkeypatch):
    """A group whose write or fsync failed is answered failed (the log stops taking records): its records are cut
    from the file, so the next start does not find, adopt and sign what its callers were told was not written."""
    import errno

    from kernel.audit import AuditError
    from kernel.audit.segments import SegmentFile

    def io_error(self):  # fault injected on purpose: the device fails the group's fsync
        raise OSError(errno.EIO, "Input/output error")

    log = AuditLog.open(tmp_path, preallocate_bytes=CHUNK)
    try:
        for i in range(10):
            log.append_and_wait(decision(i), 10)
        monkeypatch.setattr(SegmentFile, "sync", io_error)
        with pytest.raises(AuditError, match="was not written"):
            log.append_and_wait(decision(10), 10)
        monkeypatch.undo()
    finally:
        log.close()
    with AuditLog.open(tmp_path, preallocate_bytes=CHUNK) as reopened:
        assert reopened.size == 10  # not 11: the failed group is gone
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 10, result.describe()


def test_a_segment_whose_header_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """(Crash audit) a rotation on a full disk left a new segment cut inside its header: every verify failed after."""
    import errno

    from kernel.audit import AuditError
    from kernel.audit import segments

    real = segments._pwrite_all

    def full_past_the_first_bytes(fd, data, offset):  # fault injected on purpose: room for 3 bytes, then none
        if offset == 0:  # (a new segment's header, with its zeros or alone)
            real(fd, bytes(data[:3]), 0)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    log = AuditLog.open(tmp_path, segment_bytes=4096, preallocate_bytes=CHUNK)
    acknowledged = 0
    try:
        monkeypatch.setattr(segments, "_pwrite_all", full_past_the_first_bytes)
        with pytest.raises(AuditError):
            for i in range(200):  # groups of several records each, until a rotation needs a new segment
                futures = [log.append(decision(10 * i + j)) for j in range(10)]
                for future in futures:
                    future.wait(10)
                    acknowledged += 1
        monkeypatch.undo()
    finally:
        log.close()
    assert len(segments_of(tmp_path)) == 1
    result = verify_directory(tmp_path)
    assert result.ok, result.describe()
    assert result.records == acknowledged  # none of the failed group's records is left to be adopted


def test_a_new_segment_without_room_for_its_zeros_goes_on_without_them(tmp_path, monkeypatch, caplog):
    """(Session review) a rotation on a nearly full disk fail-stopped the log for want of the new segment's zeros,
    where a header alone fits: it is made without them, as a segment whose zeros fail later goes on."""
    import errno

    from kernel.audit import segments

    real = segments._pwrite_all

    def no_room_for_zeros(fd, data, offset):  # fault injected on purpose: the header fits, zeros do not
        if offset == 0 and len(data) > len(MAGIC):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    with AuditLog.open(tmp_path, segment_bytes=4096, preallocate_bytes=CHUNK) as log:
        log.append_and_wait(decision(0), 10)
        monkeypatch.setattr(segments, "_pwrite_all", no_room_for_zeros)
        with caplog.at_level(logging.WARNING, logger="aios.audit"):
            for i in range(1, 120):  # past a few rotations
                assert log.append_and_wait(decision(i), 10)[0] == i
        monkeypatch.undo()
    assert len(segments_of(tmp_path)) > 2 and "without preallocation" in caplog.text
    result = verify_directory(tmp_path)
    assert result.ok and result.records == 120, result.describe()
