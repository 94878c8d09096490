"""Tamper evidence: change the files of a real log and check `audit verify` names the first bad record.

The segment files are edited with a small frame reader/writer written here
from the format description (magic, then length | crc32 | payload frames), so
the tests do not lean on the code they check. CLI tests run
``python -m kernel audit ...`` as a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog, verify_directory
from kernel.audit.keys import load_public_key

ROOT = Path(__file__).resolve().parent.parent
MAGIC_BYTES = 8
RECORDS = 50


def decision(i: int) -> pb.AuditRecord:
    record = pb.AuditRecord(kind=pb.DECISION if i % 5 else pb.POLICY_CHANGE, tenant=f"t{i % 2}", pipeline="claims",
                            request_id=f"req-{i}", principal="svc")
    record.decision.action = "approve"
    record.inputs["amount"].number_value = i * 1.5
    return record


def build_log(directory: Path, records: int = RECORDS, checkpoint_every: int = 10, segment_bytes: int = 64 << 20) -> None:
    """One record per group, so checkpoints land exactly every ``checkpoint_every`` records."""
    with AuditLog.open(directory, checkpoint_records=checkpoint_every, checkpoint_ms=60_000,
                       segment_bytes=segment_bytes) as log:
        for i in range(records):
            log.append_and_wait(decision(i), 10)


def segment(directory: Path, index: int = 0) -> Path:
    return sorted(directory.glob("*.seg"))[index]


def read_frames(path: Path) -> tuple[bytes, list[bytes]]:
    data = path.read_bytes()
    offset, payloads = MAGIC_BYTES, []
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "little")
        payloads.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    return data[:MAGIC_BYTES], payloads


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


def write_frames(path: Path, magic: bytes, payloads: list[bytes]) -> None:
    path.write_bytes(magic + b"".join(frame(p) for p in payloads))


def edit_records(directory: Path, edit) -> None:
    """Rewrite the first segment with ``edit(payloads)`` applied to its list of record payloads."""
    path = segment(directory)
    magic, payloads = read_frames(path)
    edit(payloads)
    write_frames(path, magic, payloads)


def frame_offset(path: Path, index: int) -> int:
    data = path.read_bytes()
    offset = MAGIC_BYTES
    for _ in range(index):
        offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
    return offset


def forge(record: pb.AuditRecord) -> bytes:
    """The stored bytes of ``record`` with a correct hash: what a forger without the key can make."""
    record.hash = b""
    canonical = record.SerializeToString(deterministic=True)
    digest = hashlib.sha256(b"\x00" + canonical).digest()
    return canonical + b"\x22\x20" + digest


def parsed(payload: bytes) -> pb.AuditRecord:
    return pb.AuditRecord.FromString(payload)


def expect_failure(directory: Path, sequence: int | None, fragment: str) -> None:
    result = verify_directory(directory)
    assert not result.ok, result
    assert result.first_bad_sequence == sequence, result
    assert fragment in result.reason, result.reason


@pytest.fixture
def log_dir(tmp_path) -> Path:
    build_log(tmp_path)
    return tmp_path


def test_an_intact_log_verifies(log_dir):
    result = verify_directory(log_dir)
    assert result.ok, result.reason
    assert (result.records, result.checkpoints, result.signed_size) == (RECORDS, 6, RECORDS)  # 0, 10, ..., 50
    assert result.describe().startswith(f"OK: {RECORDS} records and 6 signed checkpoints verified")


def test_flipped_byte_fails_the_frame_checksum(log_dir):
    path = segment(log_dir)
    data = bytearray(path.read_bytes())
    data[frame_offset(path, 17) + 30] ^= 0x40
    path.write_bytes(bytes(data))
    expect_failure(log_dir, 17, "record 17 in")


def test_flipped_byte_with_fixed_checksum_fails_the_hash(log_dir):
    path = segment(log_dir)
    magic, payloads = read_frames(path)
    changed = bytearray(payloads[17])
    changed[12] ^= 0x40
    payloads[17] = bytes(changed)
    write_frames(path, magic, payloads)
    expect_failure(log_dir, 17, "do not match its hash")


def test_edited_and_rehashed_record_breaks_the_link_after_it(log_dir):
    path = segment(log_dir)
    magic, payloads = read_frames(path)
    record = parsed(payloads[17])
    record.decision.action = "deny"
    payloads[17] = forge(record)
    write_frames(path, magic, payloads)
    expect_failure(log_dir, 17, "record 18's prev_hash is not the hash of record 17")


def test_fully_rechained_forgery_is_caught_by_the_signed_checkpoints(log_dir):
    path = segment(log_dir)
    magic, payloads = read_frames(path)
    previous = parsed(payloads[16]).hash
    for index in range(17, RECORDS):  # edit 17, then re-chain everything after it
        record = parsed(payloads[index])
        if index == 17:
            record.decision.action = "deny"
        record.prev_hash = previous
        payloads[index] = forge(record)
        previous = parsed(payloads[index]).hash
    write_frames(path, magic, payloads)
    # The chain is consistent again; only the signed root for 20 records no longer matches, so verify can
    # name the range between the checkpoints (10 and 20), not the record: the headline says so.
    expect_failure(log_dir, 10, "do not give the root signed in checkpoint #2 (tree size 20)")
    result = verify_directory(log_dir)
    assert result.last_bad_sequence == 19
    assert result.describe().startswith("FAILED in records 10..19: their hashes do not give the root")


def test_deleted_record(log_dir):
    edit_records(log_dir, lambda payloads: payloads.pop(17))
    expect_failure(log_dir, 17, "record 17 is missing: record 18 is in its place")


def test_swapped_records(log_dir):
    def edit(payloads):
        payloads[17], payloads[18] = payloads[18], payloads[17]

    edit_records(log_dir, edit)
    expect_failure(log_dir, 17, "record 17 is missing: record 18 is in its place")


def test_swapped_distant_records(log_dir):
    def edit(payloads):
        payloads[12], payloads[40] = payloads[40], payloads[12]

    edit_records(log_dir, edit)
    expect_failure(log_dir, 12, "record 12 is missing: record 40 is in its place")


def test_inserted_copy_of_an_older_record(log_dir):
    edit_records(log_dir, lambda payloads: payloads.insert(20, payloads[5]))
    expect_failure(log_dir, 20, "the record at position 20 carries sequence 5")


def test_inserted_forged_record(log_dir):
    path = segment(log_dir)
    magic, payloads = read_frames(path)
    fake = decision(999)
    fake.sequence = 17
    fake.prev_hash = parsed(payloads[16]).hash
    payloads.insert(17, forge(fake))  # a well-formed record 17, chained to 16; the real 17 follows it
    write_frames(path, magic, payloads)
    expect_failure(log_dir, 17, "the record at position 18 carries sequence 17")


def test_truncated_mid_record(log_dir):
    path = segment(log_dir)
    start = frame_offset(path, 30)
    with open(path, "r+b") as f:
        f.truncate(start + 40)
    expect_failure(log_dir, 30, "record 30 in 00000000000000000000.seg: the file ends inside it")


def test_truncated_at_a_record_boundary(log_dir):
    path = segment(log_dir)
    with open(path, "r+b") as f:
        f.truncate(frame_offset(path, 40))
    expect_failure(log_dir, 40, "a checkpoint was signed for 50 records but the log ends after 40")


def test_a_removed_middle_segment(tmp_path):
    build_log(tmp_path, records=120, checkpoint_every=50, segment_bytes=4096)
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) >= 3
    first_removed = int(segments[1].stem)
    segments[1].unlink()
    expect_failure(tmp_path, first_removed, f"starts at record {int(segments[2].stem)} where record {first_removed}")


def test_damage_in_an_earlier_segment(tmp_path):
    build_log(tmp_path, records=120, checkpoint_every=50, segment_bytes=4096)
    path = segment(tmp_path, 1)
    first = int(path.stem)
    data = bytearray(path.read_bytes())
    data[frame_offset(path, 3) + 20] ^= 0x01
    path.write_bytes(bytes(data))
    expect_failure(tmp_path, first + 3, f"record {first + 3} in {path.name}: the frame at offset")


def test_a_forged_checkpoint_signature(log_dir):
    path = log_dir / "checkpoints.log"
    magic, payloads = read_frames(path)
    checkpoint = pb.Checkpoint.FromString(payloads[2])
    checkpoint.signature = bytes(64)
    payloads[2] = checkpoint.SerializeToString()
    write_frames(path, magic, payloads)
    expect_failure(log_dir, None, "checkpoint #2 (tree size 20): the signature does not verify")


def test_checkpoints_from_another_key_fail_against_the_trusted_key(log_dir):
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    result = verify_directory(log_dir, public_key=other)
    assert not result.ok and "not by the trusted key" in result.reason
    assert verify_directory(log_dir, public_key=load_public_key(log_dir / "public-key.pem")).ok


def test_a_torn_checkpoint_file_tail_is_not_a_failure(log_dir):
    path = log_dir / "checkpoints.log"
    with open(path, "ab") as f:
        f.write(b"\x50\x00\x00\x00\x00\x00")  # a crash mid-append of a checkpoint
    assert verify_directory(log_dir).ok


# --------------------------------------------------------------------------- the command line
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernel", "audit", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_verify_ok_and_failed(log_dir, tmp_path_factory):
    pem = tmp_path_factory.mktemp("trusted") / "audit.pub"
    pem.write_bytes((log_dir / "public-key.pem").read_bytes())
    done = run_cli("verify", str(log_dir), "--from-key", str(pem))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"OK: {RECORDS} records and 6 signed checkpoints verified" in done.stdout

    edit_records(log_dir, lambda payloads: payloads.pop(33))
    done = run_cli("verify", str(log_dir), "--from-key", str(pem))
    assert done.returncode == 1
    assert "FAILED at record 33: record 33 is missing" in done.stdout


def test_cli_verify_usage_errors(tmp_path):
    done = run_cli("verify", str(tmp_path / "nope"))
    assert done.returncode == 2 and "is not a directory" in done.stderr
    build_log(tmp_path / "log", records=3)
    (tmp_path / "bad.pub").write_text("not a key")
    done = run_cli("verify", str(tmp_path / "log"), "--from-key", str(tmp_path / "bad.pub"))
    assert done.returncode == 2 and "expected an Ed25519 public key" in done.stderr


def test_cli_from_key_given_the_key_itself_says_it_names_a_file(tmp_path):
    """(Operator walk-through) `--from-key <hex>` said "cannot read public key <hex>: No such file or directory",
    as if a file had gone missing; the key pasted is now named as such."""
    build_log(tmp_path / "log", records=3)
    raw = load_public_key(tmp_path / "log" / "public-key.pem")
    for text in (raw.hex(), base64.b64encode(raw).decode()):
        done = run_cli("verify", str(tmp_path / "log"), "--from-key", text)
        assert done.returncode == 2 and "is a public key, not a file" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    done = run_cli("verify", str(tmp_path / "log"), "--from-key", str(tmp_path / "missing.pem"))
    assert done.returncode == 2 and "cannot read public key" in done.stderr and "No such file" in done.stderr


def test_cli_export_json_lines(log_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "audit.jsonl"
    done = run_cli("export", str(log_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["sequence"] for line in lines] == list(range(RECORDS))
    first = lines[0]
    assert first["kind"] == "POLICY_CHANGE" and first["request_id"] == "req-0"
    assert first["prev_hash"] == "00" * 32 and len(first["hash"]) == 64
    assert lines[1]["prev_hash"] == first["hash"]
    assert first["inputs"]["amount"] == {"number_value": 0.0}

    done = run_cli("export", str(log_dir), "--from", "20", "--kind", "decision", "--tenant", "t1")
    assert done.returncode == 0, done.stderr
    picked = [json.loads(line)["sequence"] for line in done.stdout.splitlines()]
    assert picked == [i for i in range(20, RECORDS) if i % 2 == 1 and i % 5]

    done = run_cli("export", str(log_dir), "--kind", "nonsense")
    assert done.returncode == 2 and "unknown kind" in done.stderr


def test_an_incomplete_last_record_of_a_live_log_is_not_a_failure(log_dir):
    import fcntl
    import os

    path = segment(log_dir)
    with open(path, "ab") as f:  # a group being written right now: its frame is not complete yet
        f.write((300).to_bytes(4, "little") + b"\x00" * 4 + b"half a record")
    fd = os.open(log_dir / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the kernel's writer holds it while the log is open
        result = verify_directory(log_dir)
        assert result.ok and result.records == RECORDS
        assert f"record {RECORDS} was still being written" in result.describe()
    finally:
        os.close(fd)
    expect_failure(log_dir, RECORDS, "the file ends inside it")  # nobody writes: it was cut


def test_a_log_with_no_stopping_record_at_all_may_come_from_an_older_kernel(tmp_path):
    """(Upgrade audit) kernels before the 'kernel stopping' record stopped cleanly without one: a log that holds
    none says so beside the crash it may also mean."""
    import json

    with AuditLog.open(tmp_path) as log:
        log.append_and_wait(pb.AuditRecord(kind=pb.CONFIG_CHANGE, principal="kernel", payload=json.dumps(
            {"event": "kernel started"}).encode()), 10)
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id="r"), 10)
    result = verify_directory(tmp_path, strict=True)
    assert result.ok, result.reason
    assert "the log does not end with a 'kernel stopping' record" in result.describe()
    assert "it may also come from a kernel older than that record" in result.describe()


def test_a_signed_checkpoint_smaller_than_the_one_before_fails_as_a_shrink(tmp_path):
    """(Test-suite audit: deleting this check left the suite green; verify failed on a later check, naming the
    wrong reason) a correctly signed checkpoint for fewer records than the one before it: checkpoints never shrink."""
    from kernel.audit import checkpoints as cps
    from kernel.audit.keys import load_or_create

    with AuditLog.open(tmp_path, checkpoint_records=2) as log:
        for i in range(4):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 10)
        smaller = cps.sign(load_or_create(tmp_path / "signing-key.pem", lambda: []), 1, log.root(1))
    with open(tmp_path / "checkpoints.log", "ab") as file:
        file.write(frame(smaller.SerializeToString()))
    result = verify_directory(tmp_path)
    assert not result.ok
    assert result.reason.endswith("follows one at 4: checkpoints never shrink"), result.reason
