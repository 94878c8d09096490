"""Damage that is not a torn tail: the log refuses to open and changes nothing; a real torn tail is still cut.

A crash leaves at most an unfinished write at the end of the last segment, or
an unfinished last checkpoint (kernel/audit/recovery.py says why). Anything
else (a flipped byte in a record that has records after it, a zeroed or
garbled header with a valid record after it, a damaged checkpoint with signed
ones after it) is damage: cutting there would delete acknowledged records and
reuse their sequence numbers, or drop the signed checkpoints that expose a
forgery. Logs are real ones written by ``AuditLog`` (the crashed ones by a
child process that exits without closing its log, as a kill leaves it);
damage is done with plain file writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_audit_verify import forge, frame, parsed, read_frames, write_frames

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditCorrupt, AuditLog, iter_directory, verify_directory
from kernel.audit.checkpoints import read_all
from kernel.audit.segments import MAGIC, FrameScanner, SegmentFile, frame_after

ROOT = Path(__file__).resolve().parent.parent
SIGNED = 20  # checkpoints at tree sizes 0, 10, 20: records 20..24 are past the last one
RECORDS = 25

# Writes RECORDS records, one group each (fsync: each acknowledged once on disk), a checkpoint every 10,
# then exits without closing the log: no final checkpoint, files as a kill leaves them.
CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[4])
    from kernel.audit import AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], mode=sys.argv[2], preallocate_bytes=int(sys.argv[3]), checkpoint_records=10,
                        checkpoint_ms=600_000)
    for i in range(int(sys.argv[5])):
        # A fixed time: the same records (and hashes) every run, so the tests' byte positions are stable.
        record = pb.AuditRecord(kind=pb.DECISION, tenant="acme", request_id=f"req-{i}", payload=b"p" * (40 + i),
                                time_unix_ns=1_800_000_000_000_000_000 + i)
        log.append_and_wait(record, 30)
    os._exit(0)
""")


@pytest.fixture(scope="module", params=[("fsync", 256 << 10), ("async", 0)], ids=["fsync-preallocated", "async-append"])
def crashed_template(request, tmp_path_factory) -> tuple[Path, str, int]:
    mode, preallocate = request.param
    root = tmp_path_factory.mktemp("crashed")
    script = root / "writer.py"
    script.write_text(CRASHING_WRITER)
    directory = root / "audit"
    done = subprocess.run([sys.executable, str(script), str(directory), mode, str(preallocate), str(ROOT),
                           str(RECORDS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [c.tree_size for c in read_all(directory)[0]] == [0, 10, SIGNED]
    return directory, mode, preallocate


@pytest.fixture
def crashed(crashed_template, tmp_path) -> Path:
    """A copy of a log whose writer stopped without closing it: records 20..24 acknowledged, not yet signed."""
    template = crashed_template[0]
    directory = tmp_path / "audit"
    shutil.copytree(template, directory)
    return directory


def segment_of(directory: Path) -> Path:
    segments = sorted(directory.glob("*.seg"))
    assert len(segments) == 1
    return segments[0]


def frame_offsets(data: bytes) -> list[int]:
    """Start of each frame, from the format description; the last entry is the logical end."""
    offsets, offset = [], len(MAGIC)
    while offset + 8 <= len(data) and int.from_bytes(data[offset:offset + 4], "little"):
        offsets.append(offset)
        offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
    return offsets + [offset]


def snapshot(directory: Path) -> dict[str, bytes]:
    # (public keys are kept in a folder of the log directory: its files count too)
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def refused(directory: Path, *fragments: str) -> str:
    """Open must raise AuditCorrupt naming every fragment, and leave every file byte for byte as it was."""
    before = snapshot(directory)
    with pytest.raises(AuditCorrupt) as caught:
        AuditLog.open(directory)
    message = caught.value.message
    assert "\n" not in message, message
    for fragment in ("is damaged or was altered", "nothing was changed on disk",
                     f"`aios-kernel audit verify {directory}`", *fragments):
        assert fragment in message, message
    assert snapshot(directory) == before
    assert not list(directory.glob("*.torn-*"))
    return message


# --------------------------------------------------------------------------- point 1: damage inside the segment
def test_a_flipped_byte_in_an_unsigned_record_refuses_to_open(crashed):
    segment = segment_of(crashed)
    offsets = frame_offsets(segment.read_bytes())
    assert len(offsets) == RECORDS + 1
    write_at(segment, offsets[22] + 30, bytes([segment.read_bytes()[offsets[22] + 30] ^ 0x01]))
    message = refused(crashed, f"{segment}, record 22 at byte offset {offsets[22]}", "fails its checksum",
                      f"a valid frame follows it at offset {offsets[23]}")
    # Past the last checkpoint a power cut cannot be ruled out: the operator is told how to decide.
    assert f"truncate it to {offsets[22]} bytes, dropping records 22 on" in message
    result = verify_directory(crashed)  # and verify agrees it is not OK
    assert not result.ok and result.first_bad_sequence == 22


@pytest.mark.parametrize("damage", ["length-claims-past-the-end", "header-zeroed"])
def test_a_torn_looking_header_with_records_after_it_refuses_to_open(crashed, damage):
    """A header that looks like an unfinished write (a length past the end of the file, or zeros) is no torn
    tail while a valid record follows it: the scanner alone would have called both torn."""
    segment = segment_of(crashed)
    data = segment.read_bytes()
    offsets = frame_offsets(data)
    if damage == "length-claims-past-the-end":
        write_at(segment, offsets[21] + 3, b"\x01")  # the length's high byte: 16 MiB, past the end of the file
    else:
        write_at(segment, offsets[21], bytes(8))
    scanner = FrameScanner(segment.read_bytes(), len(MAGIC))
    assert len(list(scanner)) == 21 and scanner.torn  # torn-shaped...
    refused(crashed, f"record 21 at byte offset {offsets[21]}", f"a valid frame follows it at offset {offsets[22]}")


def test_a_flipped_byte_in_the_complete_last_record_refuses_to_open(crashed):
    segment = segment_of(crashed)
    data = segment.read_bytes()
    offsets = frame_offsets(data)
    assert data[offsets[-1] - 1] != 0  # the record ends in a non-zero hash byte (fixed records: always so)
    write_at(segment, offsets[24] + 30, bytes([data[offsets[24] + 30] ^ 0x01]))
    refused(crashed, f"record 24 at byte offset {offsets[24]}", "whole bytes that are wrong, not a write cut short")


def test_a_flipped_byte_under_a_signed_checkpoint_says_so(crashed):
    segment = segment_of(crashed)
    offsets = frame_offsets(segment.read_bytes())
    write_at(segment, offsets[5] + 30, bytes([segment.read_bytes()[offsets[5] + 30] ^ 0x01]))
    message = refused(crashed, f"record 5 at byte offset {offsets[5]}", "a signed checkpoint covers records 0..19")
    assert "power cut" not in message  # records a checkpoint covers were on disk before it was signed


def test_a_real_torn_tail_is_still_cut_kept_and_summed_up(crashed, caplog):
    segment = segment_of(crashed)
    end = frame_offsets(segment.read_bytes())[-1]
    partial = (300).to_bytes(4, "little") + b"\x00" * 4 + b"the first bytes of record 25"
    write_at(segment, end, partial)  # a crash mid-group: a header promising more than was written
    with caplog.at_level(logging.INFO, logger="aios.audit"):
        log = AuditLog.open(crashed)
    try:
        assert log.size == RECORDS and log.dropped_bytes == len(partial)
        assert log.latest_checkpoint().tree_size == RECORDS  # the unsigned records are signed at once
        kept = list(crashed.glob("*.seg.torn-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == partial
        summary = [r.getMessage() for r in caplog.records
                   if r.levelno == logging.INFO and "unclean stop" in r.getMessage()]
        assert summary == [
            f"audit: opened {crashed} after an unclean stop: {RECORDS} records; the last signed checkpoint "
            f"covered {SIGNED}, the {RECORDS - SIGNED} after it are signed now; cut a torn tail of "
            f"{len(partial)} bytes from {segment.name} after record {RECORDS - 1} (kept in {kept[0].name})"]
        assert "never acknowledged in fsync mode" in caplog.text
        assert log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id="after"), 10)[0] == RECORDS
    finally:
        log.close()
    result = verify_directory(crashed)
    assert result.ok and result.records == RECORDS + 1


def test_an_unclean_stop_with_nothing_torn_is_summed_up_too(crashed, caplog):
    with caplog.at_level(logging.INFO, logger="aios.audit"), AuditLog.open(crashed) as log:
        assert log.size == RECORDS and log.dropped_bytes == 0
        assert log.latest_checkpoint().tree_size == RECORDS
    assert (f"the last signed checkpoint covered {SIGNED}, the {RECORDS - SIGNED} after it are signed now"
            in caplog.text)
    assert "torn" not in caplog.text and not list(crashed.glob("*.torn-*"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aios.audit"), AuditLog.open(crashed):
        pass
    assert "unclean stop" not in caplog.text  # closed cleanly last time: nothing to say


def test_export_does_not_stop_quietly_at_a_torn_looking_header_with_records_after_it(crashed):
    segment = segment_of(crashed)
    offsets = frame_offsets(segment.read_bytes())
    write_at(segment, offsets[21] + 3, b"\x01")  # a length past the end of the file: torn-shaped
    with pytest.raises(AuditCorrupt, match="record 21 is damaged .*a valid frame follows it"):
        list(iter_directory(crashed))  # (records 22..24 would have been left out with a warning)


@pytest.mark.parametrize("checkpoints", ["intact", "damaged"])
def test_a_segment_cut_short_while_being_created_is_removed_only_when_the_log_opens(crashed, caplog, checkpoints):
    unfinished = crashed / f"{RECORDS:020d}.seg"
    unfinished.write_bytes(MAGIC[:5] + bytes(3))  # a crash between creating the next segment and its first sync
    if checkpoints == "damaged":
        path = crashed / "checkpoints.log"
        offset = checkpoint_offsets(crashed)[1] + 20
        write_at(path, offset, bytes([path.read_bytes()[offset] ^ 0x01]))
        refused(crashed, "checkpoint #1")  # and the unfinished segment is still there (the snapshot)
        return
    with caplog.at_level(logging.INFO, logger="aios.audit"), AuditLog.open(crashed) as log:
        assert log.size == RECORDS and not unfinished.exists()
        assert log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id="after"), 10)[0] == RECORDS
    assert f"removed {unfinished.name} (8 bytes), cut short while being created" in caplog.text
    assert verify_directory(crashed).ok


def test_segment_reopen_refuses_to_cut_bytes_that_are_not_a_torn_tail(tmp_path):
    path = tmp_path / "00000000000000000000.seg"
    data = MAGIC + frame(b"one") + frame(b"two!") + frame(b"three")
    path.write_bytes(data)
    with pytest.raises(AuditCorrupt, match="refusing to cut it at byte offset 19: .* nothing was changed"):
        SegmentFile.reopen(path, len(MAGIC) + 11, True, 0, 1 << 20)  # told to cut after "one": two valid frames follow
    assert path.read_bytes() == data
    torn = data + frame(b"four")[:-2]
    path.write_bytes(torn)
    SegmentFile.reopen(path, len(data), True, 0, 1 << 20).close()  # an unfinished last frame: cut
    assert path.read_bytes() == data


@pytest.mark.parametrize("tail,damage", [
    (frame(b"bad!")[:-1] + b"?" + frame(b"good"), "a valid frame follows it"),
    (bytes(8) + b"xx" + frame(b"good"), "a valid frame follows it"),
    ((1 << 20).to_bytes(4, "little") + b"junk" + frame(b"good"), "a valid frame follows it"),
    (frame(b"bad!")[:-1] + b"?" + bytes(64), "whole bytes that are wrong"),
    (frame(b"torn")[:-2] + bytes(66), None),  # its end never written
    (bytes(100) + b"\x07stray bytes of the same write", None),
    ((300).to_bytes(4, "little") + b"\x00" * 4 + b"partial", None),
], ids=["wrong-bytes-then-a-valid-frame", "zero-header-then-a-valid-frame", "length-past-the-end-then-a-valid-frame",
        "wrong-bytes-then-zeros", "end-never-written", "stray-bytes-after-zeros", "incomplete-frame"])
def test_damage_tells_a_torn_tail_from_damage_inside_the_data(tail, damage):
    data = MAGIC + frame(b"one") + tail
    scanner = FrameScanner(data, len(MAGIC))
    assert [payload for _, payload in scanner] == [b"one"]
    found = scanner.damage()
    assert (found is None) if damage is None else (damage in found), found


def test_frame_after_skips_zeros_and_finds_a_frame_at_any_offset():
    data = b"\x01" * 5 + bytes(3000) + b"\x02" + frame(b"payload")
    assert frame_after(data, 0) == 5 + 3000 + 1
    assert frame_after(data[:-1], 0) is None


# --------------------------------------------------------------------------- point 2: the checkpoint file
def checkpoint_offsets(directory: Path) -> list[int]:
    data = (directory / "checkpoints.log").read_bytes()
    return frame_offsets(data)


@pytest.mark.parametrize("where", ["checksum", "length"])
def test_a_damaged_early_checkpoint_refuses_to_open(crashed, where):
    path = crashed / "checkpoints.log"
    offsets = checkpoint_offsets(crashed)
    assert len(offsets) == 4  # three checkpoints, then the end
    if where == "checksum":
        write_at(path, offsets[1] + 20, bytes([path.read_bytes()[offsets[1] + 20] ^ 0x01]))
    else:  # a length past the end of the file: looks like an unfinished last checkpoint, but one follows
        write_at(path, offsets[1] + 2, b"\x01")
    refused(crashed, f"{path}, checkpoint #1 at byte offset {offsets[1]}", "a valid frame follows it")
    assert not verify_directory(crashed).ok


@pytest.mark.parametrize("where", ["checksum", "length"])
def test_a_forged_log_behind_a_damaged_checkpoint_is_refused_not_signed(tmp_path, where):
    """The attack: edit a signed record, rechain and re-checksum everything after it (no key needed), then
    damage the checkpoint that covers it so that a kernel cuts the signed checkpoints and signs the forgery."""
    directory = tmp_path / "audit"
    with AuditLog.open(directory, checkpoint_records=10, checkpoint_ms=600_000) as log:
        for i in range(30):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"req-{i}", payload=b"approve"), 10)
    segment = segment_of(directory)
    magic, payloads = read_frames(segment)
    payloads = [p for p in payloads if p]  # (the preallocated zeros read as empty frames)
    previous = parsed(payloads[14]).hash
    for index in range(15, 30):
        record = parsed(payloads[index])
        if index == 15:
            record.payload = b"deny"
        record.prev_hash = previous
        payloads[index] = forge(record)
        previous = parsed(payloads[index]).hash
    write_frames(segment, magic, payloads)
    assert not verify_directory(directory).ok  # caught by the checkpoints at 20 and 30...
    path = directory / "checkpoints.log"
    offsets = checkpoint_offsets(directory)
    assert [c.tree_size for c in read_all(directory)[0]] == [0, 10, 20, 30]
    if where == "checksum":
        write_at(path, offsets[1] + 20, bytes([path.read_bytes()[offsets[1] + 20] ^ 0x01]))
    else:
        write_at(path, offsets[1] + 2, b"\x01")
    result = verify_directory(directory)  # ...and still caught with an early checkpoint damaged
    assert not result.ok and "checkpoints.log is damaged after checkpoint #1" in result.reason, result.reason
    refused(directory, "checkpoint #1", "would discard the signed checkpoints after it")
    assert not verify_directory(directory).ok  # nothing was signed over the forgery


def test_a_torn_last_checkpoint_is_cut_and_kept(crashed, caplog):
    path = crashed / "checkpoints.log"
    intact = path.read_bytes()
    partial = (120).to_bytes(4, "little") + b"\x00\x00\x00\x00" + b"\x08\x19"  # a crash mid-append
    with open(path, "ab") as f:
        f.write(partial)
    with caplog.at_level(logging.INFO, logger="aios.audit"), AuditLog.open(crashed) as log:
        kept = list(crashed.glob("checkpoints.log.torn-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == partial
        assert path.read_bytes()[:len(intact)] == intact  # cut back, then the open signed the unsigned records
        assert log.latest_checkpoint().tree_size == RECORDS
    assert f"torn checkpoint #3 at byte offset {len(intact)}: dropped {len(partial)} bytes" in caplog.text
    assert f"cut a torn checkpoint of {len(partial)} bytes from checkpoints.log (kept in {kept[0].name})" in caplog.text
    assert verify_directory(crashed).ok


# --------------------------------------------------------------------------- the kernel's start
def test_the_kernel_start_refuses_a_damaged_log_in_one_line(crashed_template, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(crashed_template[0], data / "audit")
    segment = segment_of(data / "audit")
    offsets = frame_offsets(segment.read_bytes())
    write_at(segment, offsets[22] + 30, bytes([segment.read_bytes()[offsets[22] + 30] ^ 0x01]))
    models = tmp_path / "models"
    models.mkdir()
    before = snapshot(data / "audit")
    done = subprocess.run([sys.executable, "-m", "kernel", "serve", "--models", str(models), "--port", "0",
                           "--data-dir", str(data), "--audit-mode", crashed_template[1]],
                          capture_output=True, text=True, cwd=ROOT, timeout=90, env={**os.environ, "AIOS_MODELS": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "damaged or was altered" in line]
    assert len(lines) == 1 and f"{segment.name}, record 22 at byte offset {offsets[22]}" in lines[0], done.stderr
    assert snapshot(data / "audit") == before
