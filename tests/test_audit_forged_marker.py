"""``archive.json`` made without the key: a live log cut back, passed off as an archive.

``audit archive`` writes ``archive.json`` into its DEST to say the folder is an
archive, which ends where it was cut rather than at a clean stop. ``audit
verify`` then leaves out the note it gives a log that does not end with a
"kernel stopping" record ("the kernel that wrote it crashed, or records were
removed back to a checkpoint"). Someone who can write the live log's
directory but has no key could cut the log back to one of its checkpoints and
write such a file (the end and the root are in ``checkpoints.log``): the one
note that told the cut was gone (a helper's audit). The archive signs the
file now, so one nobody signed does not stand in for that note.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from claims_support import build_small_model, claim_request, copy_pipelines
from test_audit_verify import read_frames, write_frames, run_cli

from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit.base import ARCHIVE_MARKER
from kernel.audit.checkpoints import FILE_NAME as CHECKPOINTS, read_all
from kernel.audit.keys import SigningKey
from kernel.audit.marker import marker_json
from kernel.audit.segments import CHECKPOINT_MAGIC, frame
from kernel.testing.processes import ServeProcess

CUT_NOTE = "the log does not end with a 'kernel stopping' record"


@pytest.fixture(scope="module")
def kernel_log(tmp_path_factory) -> Path:
    """A real kernel's log: 30 decisions, each made durable (audit_mode fsync), a checkpoint every 5 records, small
    segments; stopped cleanly."""
    root = tmp_path_factory.mktemp("marker")
    models = build_small_model(root / "models")
    env = dict(os.environ, AIOS_AUDIT_SEGMENT_BYTES="8192", AIOS_AUDIT_CHECKPOINT_RECORDS="5")
    server = ServeProcess(models, "--pipelines", str(copy_pipelines(root / "pipelines")), "--log-level", "WARNING",
                          data_dir=root / "data", env=env)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(30, seed=3)):
                stub.Decide(claim_request(case, request_id=f"r{i}"), timeout=10)
    finally:
        code, err = server.stop()
    assert code == 0, err
    return root / "data" / "audit"


def cut_back(directory: Path) -> tuple[int, bytes]:
    """What someone without the key can do: cut the log back to a checkpoint in the middle of the kernel's run
    (the segments after it removed, the last one cut at its record, the checkpoints after it dropped). Returns that
    checkpoint's size and root."""
    checkpoints = read_all(directory)[0]
    target = [c for c in checkpoints if 10 < c.tree_size < 25][0]
    for path in directory.glob("*.seg"):
        if int(path.stem) >= target.tree_size:
            path.unlink()
    last = max(directory.glob("*.seg"), key=lambda path: int(path.stem))
    magic, payloads = read_frames(last)
    write_frames(last, magic, [p for p in payloads if any(p)][:target.tree_size - int(last.stem)])
    kept = [c for c in checkpoints if c.tree_size <= target.tree_size]
    (directory / CHECKPOINTS).write_bytes(CHECKPOINT_MAGIC + b"".join(frame(c.SerializeToString()) for c in kept))
    return target.tree_size, target.root_hash


def trusted(directory: Path, tmp_path: Path) -> Path:
    pem = tmp_path / "trusted.pub"
    pem.write_bytes((directory / "public-key.pem").read_bytes())
    return pem


def test_an_unsigned_archive_marker_does_not_hide_a_log_cut_back(kernel_log, tmp_path):
    directory = tmp_path / "audit"
    shutil.copytree(kernel_log, directory)
    pem = trusted(directory, tmp_path)
    size, root = cut_back(directory)
    before = run_cli("verify", str(directory), "--from-key", str(pem), "--strict")
    assert before.returncode == 0 and CUT_NOTE in before.stdout, before.stdout + before.stderr

    (directory / ARCHIVE_MARKER).write_text(json.dumps({"first_record": 0, "end_record": size,
                                                        "checkpoint_root": root.hex()}))
    done = run_cli("verify", str(directory), "--from-key", str(pem), "--strict")
    assert done.returncode == 0, done.stdout + done.stderr  # (a crash leaves the same: a note, as before)
    assert CUT_NOTE in done.stdout, done.stdout
    assert f"{ARCHIVE_MARKER} carries no archive signature" in done.stdout, done.stdout


def test_a_marker_signed_by_a_key_not_trusted_does_not_hide_a_log_cut_back(kernel_log, tmp_path):
    """Someone's own key signs a marker as the archive would: verify takes only the trusted keys' word for it."""
    directory = tmp_path / "audit"
    shutil.copytree(kernel_log, directory)
    pem = trusted(directory, tmp_path)
    size, root = cut_back(directory)
    theirs = SigningKey(Ed25519PrivateKey.generate())
    (directory / ARCHIVE_MARKER).write_text(marker_json(directory, 0, size, root, theirs))
    done = run_cli("verify", str(directory), "--from-key", str(pem), "--strict")
    assert done.returncode == 0, done.stdout + done.stderr
    assert CUT_NOTE in done.stdout, done.stdout
    assert f"{ARCHIVE_MARKER} is signed by key {theirs.key_id}, which is not among the trusted keys" in done.stdout


def test_an_archives_marker_is_signed_and_an_edited_one_fails(kernel_log, tmp_path):
    directory = tmp_path / "audit"
    shutil.copytree(kernel_log, directory)
    pem = trusted(directory, tmp_path)
    dest = tmp_path / "archive"
    done = run_cli("archive", str(directory), str(dest), "--before", "20", "--no-store")
    assert done.returncode == 0, done.stdout + done.stderr
    checked = run_cli("verify", str(dest), "--from-key", str(pem), "--strict")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "an archive (archive.json)" in checked.stdout and CUT_NOTE not in checked.stdout, checked.stdout

    marker = json.loads((dest / ARCHIVE_MARKER).read_text())
    signature = bytearray.fromhex(marker["archive_signature"])
    signature[0] ^= 1
    (dest / ARCHIVE_MARKER).write_text(json.dumps(dict(marker, archive_signature=signature.hex())))
    edited = run_cli("verify", str(dest), "--from-key", str(pem))
    assert edited.returncode == 1, edited.stdout + edited.stderr
    assert f"{ARCHIVE_MARKER}: its archive signature does not verify" in edited.stdout, edited.stdout


def test_records_added_to_an_archive_are_named_as_added(kernel_log, tmp_path):
    """An archive holding more records than its marker names had records added (the message said 'removed')."""
    directory = tmp_path / "audit"
    shutil.copytree(kernel_log, directory)
    checkpoints = read_all(directory)[0]
    end = checkpoints[-1].tree_size
    (directory / ARCHIVE_MARKER).write_text(json.dumps({"first_record": 0, "end_record": end - 3,
                                                        "checkpoint_root": checkpoints[-1].root_hash.hex()}))
    done = run_cli("verify", str(directory))
    assert done.returncode == 1 and "records were added after it" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("text", ["[]", '"x"', '{"end_record": 1e400, "checkpoint_root": "00"}',
                                  '{"end_record": 3, "checkpoint_root": "zz"}', "\xff{"])
def test_an_unreadable_archive_marker_fails_in_one_line(kernel_log, tmp_path, text):
    directory = tmp_path / "audit"
    shutil.copytree(kernel_log, directory)
    (directory / ARCHIVE_MARKER).write_bytes(text.encode("latin-1"))
    done = run_cli("verify", str(directory))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAILED: {ARCHIVE_MARKER} is not readable" in done.stdout and "Traceback" not in done.stderr, \
        done.stdout + done.stderr
