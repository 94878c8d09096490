"""What a refused start and a failed verify say: the directory, the record or the range, the keys, what to run.

Logs are real ones (``AuditLog`` with the default key in the directory, as a
kernel keeps it); the damage is what a forger without the key can do:
edit a record and re-chain the ones after it, or bring another log's
checkpoint file. The refusals come from a real kernel start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from claims_support import build_small_model
from conftest import start_kernel
from test_audit_verify import build_log, forge, parsed, read_frames, run_cli, segment, write_frames

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditCorrupt, AuditLog
from kernel.audit.checkpoints import read_all

RECORDS = 50  # checkpoints at 0, 10, ..., 50


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return build_small_model(tmp_path_factory.mktemp("models"))


def data_dir_with_log(tmp_path: Path, name: str = "data", records: int = RECORDS) -> Path:
    data_dir = tmp_path / name
    build_log(data_dir / "audit", records=records, checkpoint_every=10)
    return data_dir


def rechain_after_edit(directory: Path, edited: int) -> None:
    """Change record ``edited`` and re-chain every record after it: the chain links, only roots differ."""
    path = segment(directory)
    magic, payloads = read_frames(path)
    previous = parsed(payloads[edited - 1]).hash
    for index in range(edited, len(payloads)):
        record = parsed(payloads[index])
        if index == edited:
            record.decision.action = "deny"
        record.prev_hash = previous
        payloads[index] = forge(record)
        previous = parsed(payloads[index]).hash
    write_frames(path, magic, payloads)


def refused_start(models: Path, data_dir: Path) -> str:
    before = {p: p.read_bytes() for p in sorted((data_dir / "audit").rglob("*")) if p.is_file()}
    with pytest.raises(AuditCorrupt) as caught:
        start_kernel(models, data_dir=str(data_dir))
    assert {p: p.read_bytes() for p in sorted((data_dir / "audit").rglob("*")) if p.is_file()} == before
    message = caught.value.message
    assert "\n" not in message and "nothing was changed on disk" in message
    return message


def test_a_rechained_edit_names_the_range_in_verify_and_in_the_refused_start(models, tmp_path):
    data_dir = data_dir_with_log(tmp_path)
    audit = data_dir / "audit"
    rechain_after_edit(audit, 17)

    done = run_cli("verify", str(audit))
    assert done.returncode == 1
    assert f"{audit}: FAILED in records 10..19: their hashes do not give the root signed in checkpoint #2 " \
           "(tree size 20)" in done.stdout
    assert "FAILED at record" not in done.stdout  # record 10 is intact: no headline points at it

    message = refused_start(models, data_dir)
    assert message.startswith(f"the audit log in {audit} is damaged or was altered: records 10..49 no longer hash "
                              f"to the root of checkpoint #5 (tree size 50, key ")
    assert message.endswith(f"run `aios-kernel audit verify {audit}` to find it (it names the record, or this range "
                            f"when the records after it were re-chained)")


def test_another_logs_checkpoint_file_is_named_by_its_key_not_as_a_root_mismatch(models, tmp_path):
    data_dir = data_dir_with_log(tmp_path)
    audit = data_dir / "audit"
    other = data_dir_with_log(tmp_path, "other", records=30) / "audit"
    own_key, foreign_key = read_all(audit)[0][-1].key_id, read_all(other)[0][-1].key_id
    assert own_key != foreign_key
    shutil.copy(other / "checkpoints.log", audit / "checkpoints.log")

    message = refused_start(models, data_dir)
    assert message.startswith(
        f"the audit log in {audit} does not match its checkpoint file: {audit / 'checkpoints.log'} was signed by key "
        f"{foreign_key}, not by this kernel's key {own_key}, and records 0..29 do not hash to the root of its "
        f"checkpoint #3: it is another log's checkpoint file, or the records were rewritten")
    assert f"`aios-kernel audit verify {audit} --from-key <trusted key>`" in message

    # One that covers more records than this log holds is named the same way, not as missing records.
    # (Another data dir: a start refused in this process keeps the first one's database lock.)
    data_dir = tmp_path / "second"
    shutil.copytree(tmp_path / "data", data_dir, ignore=shutil.ignore_patterns("*.sqlite3*", "*.lock"))
    audit = data_dir / "audit"
    bigger = data_dir_with_log(tmp_path, "bigger", records=RECORDS + 20) / "audit"
    shutil.copy(bigger / "checkpoints.log", audit / "checkpoints.log")
    message = refused_start(models, data_dir)
    assert f"was signed by key {read_all(bigger)[0][-1].key_id}, not by this kernel's key {own_key}, and its " \
           f"checkpoint #7 covers 70 records where the log holds {RECORDS}" in message


def test_a_forged_signature_on_the_last_checkpoint_refuses_the_open(tmp_path):
    """The kernel would otherwise sign on from a checkpoint its own key never signed."""
    directory = tmp_path / "audit"
    build_log(directory, records=RECORDS, checkpoint_every=10)
    path = directory / "checkpoints.log"
    magic, payloads = read_frames(path)
    checkpoint = pb.Checkpoint.FromString(payloads[-1])
    checkpoint.signature = bytes(64)
    payloads[-1] = checkpoint.SerializeToString()
    write_frames(path, magic, payloads)
    with pytest.raises(AuditCorrupt) as caught:
        AuditLog.open(directory)
    assert caught.value.message.startswith(
        f"the audit log in {directory} is damaged or was altered: {path}, checkpoint #5 (tree size {RECORDS}): its "
        f"signature does not verify with key {checkpoint.key_id}")
    assert f"`aios-kernel audit verify {directory}`" in caught.value.message
