"""A log directory someone else hands over (a backup, an archive, an edited data dir): files crafted to hold up
``audit verify``, ``export`` or a kernel's start are refused within seconds, naming the file.

Found by a helper's audit (2026-11-28), each with real files:

- a named pipe where a segment, ``checkpoints.log`` or a kept public key is read: ``audit verify`` and a kernel's
  start waited for ever in ``open`` (a start held SIGTERM too: "stopping without serving" never came); a link
  to ``/dev/zero`` as a segment ended ``audit verify`` in a MemoryError traceback. They are refused as files
  that cannot be read (``segments.read_regular``); a kept key that is no file is skipped, as an unreadable
  one always was.
- bad bytes at the end of the last segment (or of ``checkpoints.log``) shaped so that a frame length fits at
  every few offsets: the search for a valid frame after a torn one (``segments.frame_after``) checksummed up to
  the rest of the file at each, and 2 MiB of them held a kernel's start for three minutes (hours for more). The
  search now gives up within seconds and the bytes count as damage: the start is refused, as for any damage
  that is no torn tail, and nothing is cut.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import grpc
import pytest
from test_audit_verify import build_log, run_cli, segment

from claims_support import claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import AuditCorrupt
from kernel.audit.segments import MAGIC, FrameScanner

# A frame length of 1 MiB - 6 every 64 bytes, with a record's hash-field tag where such a frame would end: each
# offset passes every cheap test and costs a checksum over 1 MiB. 4 MiB of it held the search for minutes.
_BLOCK = bytearray(64)
_BLOCK[0:4] = struct.pack("<I", (1 << 20) - 6)
_BLOCK[32:34] = b"\x22\x20"
SLOW_TAIL = bytes(_BLOCK) * ((4 << 20) // 64)
# The same idea for the checkpoint file, whose frames carry no hash field: a 1 MiB length every 4 bytes.
SLOW_CHECKPOINT_TAIL = bytes([0, 0, 0x10, 0]) * ((4 << 20) // 4)
# Far below what the unbounded search took on these bytes (minutes), far above what the bounded one takes.
PROMPTLY_S = 45


def records_end(path: Path) -> int:
    """The offset just past a segment's last record (its zero tail, if any, follows)."""
    data = path.read_bytes()
    offset = len(MAGIC)
    while offset + 8 <= len(data) and (length := int.from_bytes(data[offset:offset + 4], "little")):
        offset += 8 + length
    return offset


def write_slow_tail(path: Path) -> None:
    """A frame that claims more bytes than remain (a torn write's look), then SLOW_TAIL."""
    end = records_end(path)
    with open(path, "r+b") as file:
        file.seek(end)
        file.write(struct.pack("<II", (1 << 30) - 1, 0) + SLOW_TAIL)


@pytest.fixture
def log_dir(tmp_path) -> Path:
    build_log(tmp_path / "audit", records=30)
    return tmp_path / "audit"


# --------------------------------------------------------------------------- files that are no files
def _pipe_for_a_new_segment(directory: Path) -> str:
    os.mkfifo(directory / "00000000000000000030.seg")
    return "named pipe"


def _pipe_for_the_checkpoints(directory: Path) -> str:
    (directory / "checkpoints.log").unlink()
    os.mkfifo(directory / "checkpoints.log")
    return "named pipe"


def _zero_device_as_a_segment(directory: Path) -> str:
    os.symlink("/dev/zero", directory / "00000000000000000030.seg")
    return "device"


@pytest.mark.parametrize("craft", [_pipe_for_a_new_segment, _pipe_for_the_checkpoints, _zero_device_as_a_segment])
def test_verify_fails_at_once_on_a_file_that_is_no_regular_file(log_dir, craft):
    what = craft(log_dir)
    done = run_cli("verify", str(log_dir), "--strict")  # (a hang fails here: run_cli's timeout)
    assert done.returncode == 1, done
    assert f"{what}, not a regular file" in done.stdout and "Traceback" not in done.stderr, done


def test_export_refuses_a_segment_that_is_a_named_pipe(log_dir):
    _pipe_for_a_new_segment(log_dir)
    done = run_cli("export", str(log_dir))
    assert done.returncode == 2 and "named pipe, not a regular file" in done.stderr, done
    assert "Traceback" not in done.stderr


def test_a_kept_public_key_that_is_a_named_pipe_is_skipped_with_a_note(log_dir):
    (log_dir / "public-key.pem").unlink()
    os.mkfifo(log_dir / "public-key.pem")
    done = run_cli("verify", str(log_dir))
    assert done.returncode == 0, done  # (public-keys/ still holds the key)
    assert "skipped: cannot read public key" in done.stdout and "named pipe" in done.stdout, done


# --------------------------------------------------------------------------- a tail crafted to slow the search
def test_export_of_a_segment_with_a_crafted_tail_ends_promptly_as_damage(log_dir):
    write_slow_tail(segment(log_dir))
    started = time.monotonic()
    done = run_cli("export", str(log_dir))
    assert done.returncode == 1, done
    assert "more than a search for a valid frame after it can cover" in done.stderr, done
    assert time.monotonic() - started < PROMPTLY_S
    assert done.stdout.count("\n") == 30  # every record before the bad bytes


def test_verify_of_a_checkpoint_file_with_a_crafted_tail_ends_promptly_as_damage(log_dir):
    with open(log_dir / "checkpoints.log", "ab") as file:
        file.write(SLOW_CHECKPOINT_TAIL)
    started = time.monotonic()
    done = run_cli("verify", str(log_dir))
    assert done.returncode == 1, done
    assert "checkpoints.log is damaged" in done.stdout and "more than a search" in done.stdout, done
    assert time.monotonic() - started < PROMPTLY_S


def test_a_torn_tail_of_megabytes_of_real_record_bytes_is_still_searched_whole(log_dir):
    """The search's limits are far from what a crash leaves: 4 MiB of record bytes after a torn frame, none a
    whole frame (a byte in every 97 changed), is still searched to its end and found to be a torn tail."""
    data = segment(log_dir).read_bytes()
    records = bytearray(data[len(MAGIC):records_end(segment(log_dir))] * 1000)[:4 << 20]
    for offset in range(0, len(records), 97):
        records[offset] ^= 0x55
    scanner = FrameScanner(MAGIC + struct.pack("<II", 1 << 29, 0) + bytes(records), len(MAGIC), records=True)
    assert list(scanner) == [] and scanner.torn
    assert scanner.damage() is None


def test_export_of_a_frame_that_is_no_record_fails_in_words(log_dir):
    """A frame whose checksum holds around bytes that are no AuditRecord (someone's own frame, appended): export
    ended in a protobuf DecodeError traceback."""
    path = segment(log_dir)
    end = records_end(path)
    junk = b"\xff" * 5 + bytes(40)
    with open(path, "r+b") as file:
        file.seek(end)
        file.write(struct.pack("<II", len(junk), zlib.crc32(junk)) + junk)
    done = run_cli("export", str(log_dir))
    assert done.returncode == 1, done
    assert "record 30 is not a valid AuditRecord" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 30


def _decided_and_stopped(claims_models, tmp_path) -> tuple[str, Path]:
    """(pipelines folder, data dir) of a claims kernel that made two decisions and stopped cleanly."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    server = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(2, seed=3)):
                stub.Decide(claim_request(case, request_id=f"c{i}"), timeout=10)
    finally:
        server.stop(grace=1)
    return pipelines, data_dir


@pytest.mark.timeout(120)  # (the hang this guards against: a start waiting in open() for a pipe's writer)
@pytest.mark.parametrize("craft", ["pipe", "slow tail"])
def test_a_kernel_start_on_a_crafted_log_is_refused_promptly_and_changes_nothing(claims_models, tmp_path, craft):
    from conftest import start_kernel

    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    audit = data_dir / "audit"
    if craft == "pipe":
        _pipe_for_the_checkpoints(audit)
    else:
        write_slow_tail(segment(audit))
    before = {path.name: (path.stat().st_size if path.is_file() else None) for path in audit.iterdir()}
    started = time.monotonic()
    with pytest.raises((AuditCorrupt, OSError)) as refused:
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    assert time.monotonic() - started < PROMPTLY_S
    said = str(refused.value)
    assert ("named pipe, not a regular file" if craft == "pipe" else "more than a search for a valid frame") in said
    assert {path.name: (path.stat().st_size if path.is_file() else None) for path in audit.iterdir()} == before
