"""An archive base made without the key: records removed from the front of a log, passed off as archived.

A base's checkpoint is a signed tree head like any other, and the log's
own ``checkpoints.log`` holds one for every few records. Someone who can
write the directory but has no key can take one of those at a segment
boundary, fold the records' hashes into peaks, write ``archive-base.json``
and delete the segments before it: every field checks out against the
signature. Only a signature the archive command alone makes (with the key,
over a statement no checkpoint is) tells its base from such a one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from test_audit_verify import build_log, run_cli

from kernel.audit import AuditCorrupt, AuditLog, iter_directory, verify_directory
from kernel.audit.archive import ArchiveRefused, archive
from kernel.audit.base import FILE_NAME as BASE_FILE, ArchiveBase, write_base
from kernel.audit.checkpoints import read_all as read_checkpoints
from kernel.audit.keys import load_public_key
from kernel.audit.merkle import MerkleTree

RECORDS = 300
SEGMENT_BYTES = 4096  # ~27 records a segment: boundaries to cut at, some of them at a checkpoint


@pytest.fixture
def log_dir(tmp_path) -> Path:
    directory = tmp_path / "audit"
    build_log(directory, records=RECORDS, checkpoint_every=7, segment_bytes=SEGMENT_BYTES)
    return directory


def forge_base(directory: Path) -> int:
    """What someone without the key can do: a base out of the log's own checkpoint at a segment boundary, and the
    segments before it deleted. Returns the records removed."""
    hashes = [record.hash for record in iter_directory(directory)]
    starts = sorted(int(path.stem) for path in directory.glob("*.seg"))
    signed = {checkpoint.tree_size: checkpoint for checkpoint in read_checkpoints(directory)[0]}
    cut = max(start for start in starts if start in signed and start > 0)
    tree = MerkleTree()
    tree.append_leaves(b"".join(hashes))
    write_base(directory, ArchiveBase(cut, tuple(tree.peaks(cut)), tree.leaf(cut - 1),
                                      tuple(tree.inclusion_proof(cut - 1, cut)), signed[cut], "/nowhere",
                                      time.time_ns()))
    for path in directory.glob("*.seg"):
        if int(path.stem) < cut:
            path.unlink()
    return cut


def trusted_key(directory: Path, tmp_path: Path) -> Path:
    pem = tmp_path / "trusted.pub"
    pem.write_bytes((directory / "public-key.pem").read_bytes())
    return pem


def test_records_removed_behind_a_base_made_from_a_checkpoint_fail_strict_verify(log_dir, tmp_path, caplog):
    pem = trusted_key(log_dir, tmp_path)
    cut = forge_base(log_dir)

    done = run_cli("verify", str(log_dir), "--from-key", str(pem), "--strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"records 0..{cut - 1}" in done.stdout and "no archive signature" in done.stdout, done.stdout
    lenient = verify_directory(log_dir, load_public_key(pem))
    assert lenient.ok and "no archive signature" in lenient.reason and "--strict fails" in lenient.reason
    with caplog.at_level(logging.WARNING, logger="aios.audit"):
        with AuditLog.open(log_dir) as log:
            assert log.size == RECORDS
    assert "no archive signature" in caplog.text


def test_an_archives_base_is_signed_so_and_an_edited_signature_is_refused(log_dir, tmp_path):
    pem = trusted_key(log_dir, tmp_path)
    archive(log_dir, tmp_path / "a", before=150, no_store=True)
    assert verify_directory(log_dir, load_public_key(pem), strict=True).ok

    path = log_dir / BASE_FILE
    data = json.loads(path.read_text())
    signature = bytearray.fromhex(data["archive_signature"])
    signature[0] ^= 1
    data["archive_signature"] = signature.hex()
    path.write_text(json.dumps(data))
    result = verify_directory(log_dir, load_public_key(pem))
    assert not result.ok and "archive signature does not verify" in result.reason, result.describe()
    with pytest.raises(AuditCorrupt, match="archive signature does not verify"):
        AuditLog.open(log_dir)


def test_a_base_from_before_archive_signatures_is_signed_once_accepted(log_dir, tmp_path):
    pem = trusted_key(log_dir, tmp_path)
    result = archive(log_dir, tmp_path / "a", before=150, no_store=True)
    path = log_dir / BASE_FILE
    data = json.loads(path.read_text())
    del data["archive_signature"]  # as `audit archive` wrote it before bases were signed so
    path.write_text(json.dumps(data))
    strict = verify_directory(log_dir, load_public_key(pem), strict=True)
    assert not strict.ok and "--accept-base" in strict.reason, strict.describe()
    assert verify_directory(tmp_path / "a", load_public_key(pem), strict=True, min_records=result.end).ok

    with pytest.raises(ArchiveRefused, match="no archive signature"):
        archive(log_dir, tmp_path / "b", before=0, no_store=True)
    done = run_cli("archive", str(log_dir), str(tmp_path / "b"), "--before", "0", "--no-store", "--accept-base")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "signed" in done.stdout and not (tmp_path / "b").exists(), done.stdout
    assert verify_directory(log_dir, load_public_key(pem), strict=True).ok
    assert "archive_signature" in json.loads(path.read_text())
