"""Signed tree heads: the Merkle root over records [0, tree_size), signed with Ed25519.

A checkpoint signs this text (UTF-8, each line ending in a newline)::

    aios-kernel/audit/v1
    <tree_size in decimal>
    <root hash, standard base64>
    <time_unix_ns in decimal>

so anyone holding the public key can check a ``Checkpoint`` message without
this code. Checkpoints are appended to ``checkpoints.log`` in the log
directory, framed like segments (length, crc32, serialized ``Checkpoint``).

A checkpoint is written only after the records it covers are fsynced, so it
never outlives them in a crash. The file is append-only and fsynced after
each checkpoint: a crash can leave at most the last frame incomplete (or
ending in zeros), which loses one signature (it can be signed again), never a
record. On open such a torn last frame is cut and its bytes kept in
``checkpoints.log.torn-<time>``. Anything else (a complete frame with wrong
bytes, a frame that does not parse, a valid frame after a bad one) is damage
and the open refuses, changing nothing: cutting there would discard signed
checkpoints, and with them the evidence against records rewritten under them
(the kernel would then sign over the rewrite).
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2
from .errors import AuditCorrupt
from .keys import SigningKey, signature_valid
from .segments import (CHECKPOINT_MAGIC, AppendFile, FrameScanner, frame, frames_start, keep_torn_bytes,
                       read_log_file)

log = logging.getLogger("aios.audit")

Checkpoint = kernel_pb2.Checkpoint
ORIGIN = "aios-kernel/audit/v1"
FILE_NAME = "checkpoints.log"


def signed_bytes(tree_size: int, root_hash: bytes, time_unix_ns: int) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    return f"{ORIGIN}\n{tree_size}\n{base64.b64encode(root_hash).decode()}\n{time_unix_ns}\n".encode()


def sign(key: SigningKey, tree_size: int, root_hash: bytes, time_unix_ns: int | None = None) -> Checkpoint:
    now = time.time_ns() if time_unix_ns is None else time_unix_ns  # wall clock: for people
    return Checkpoint(
        tree_size=tree_size, root_hash=root_hash, time_unix_ns=now,
        signature=key.sign(signed_bytes(tree_size, root_hash, now)), key_id=key.key_id,
    )


def signature_ok(checkpoint: Checkpoint, public_raw: bytes) -> bool:
    message = signed_bytes(checkpoint.tree_size, checkpoint.root_hash, checkpoint.time_unix_ns)
    return signature_valid(public_raw, checkpoint.signature, message)


def read_all(directory: Path) -> tuple[list[Checkpoint], int, str | None, bool]:
    """Every intact checkpoint in order, the offset where intact data ends, why reading stopped early,
    and whether that was a torn last frame (``FrameScanner.damage``: one a crash cut short, with no valid
    frame after it; a valid frame after a bad one is damage, whatever the bad one looks like)."""
    path = directory / FILE_NAME
    try:
        data = read_log_file(path)
    except FileNotFoundError:
        return [], 0, None, False
    start = frames_start(path, data, CHECKPOINT_MAGIC)
    if start is None:
        return [], 0, "the file ends inside its header", True
    scanner = FrameScanner(data, start)
    found = []
    for offset, payload in scanner:
        try:
            found.append(Checkpoint.FromString(payload))
        except Exception:  # DecodeError, or upb's own error on malformed bytes
            scanner.end, scanner.problem = offset, f"the checkpoint at offset {offset} does not parse"
            scanner.torn = False
            break
    damage = scanner.damage()
    return found, scanner.end, damage or scanner.problem, scanner.problem is not None and damage is None


def scan(directory: Path) -> tuple[list[Checkpoint], int, str | None]:
    """``read_all`` for opening the log: the checkpoints, where they end and the torn last frame to cut
    (None when there is none); ``AuditCorrupt`` for any other damage (nothing is changed)."""
    found, end, problem, torn = read_all(directory)
    if problem is not None and not torn:
        raise AuditCorrupt(
            f"the audit log in {directory} is damaged or was altered: {directory / FILE_NAME}, checkpoint "
            f"#{len(found)} at byte offset {end}: {problem}. A crash only ever leaves the last checkpoint incomplete, "
            f"and cutting here would discard the signed checkpoints after it, so the log was not opened and nothing "
            f"was changed on disk; run `aios-kernel audit verify {directory}` for details"
        )
    return found, end, problem


class CheckpointFile:
    """The open checkpoint file of a live log (written by the writer thread only)."""

    __slots__ = ("file", "latest", "unsynced")

    def __init__(self, file: AppendFile, latest: Checkpoint | None):
        self.file = file
        self.latest = latest
        self.unsynced = False

    @classmethod
    def open(cls, directory: Path, found: list[Checkpoint], end: int,
             problem: str | None) -> tuple["CheckpointFile", str]:
        """Open for appending, given what ``scan`` found, after cutting a torn last frame (its bytes kept
        aside); also returns what was cut ("" when nothing)."""
        path = directory / FILE_NAME
        if not path.exists() or end == 0:
            if path.exists():  # cut short while being created: it holds nothing
                log.warning("audit: %s: %s; starting it afresh", path, problem)
                path.unlink()
            return cls(AppendFile.create(path, CHECKPOINT_MAGIC), None), ""
        cut = ""
        if problem is not None:
            dropped = path.stat().st_size - end
            log.warning("audit: %s: torn checkpoint #%d at byte offset %d: dropped %d bytes (%s): a write a crash "
                        "cut short (it loses a signature, never a record)", path, len(found), end, dropped, problem)
            kept = keep_torn_bytes(path, end, dropped)
            cut = f"cut a torn checkpoint of {dropped} bytes from {FILE_NAME} (kept in {kept.name})"
        return cls(AppendFile.reopen(path, end), found[-1] if found else None), cut

    def append(self, checkpoint: Checkpoint) -> None:
        self.file.write(frame(checkpoint.SerializeToString()))
        self.latest = checkpoint
        self.unsynced = True

    def sync(self) -> None:
        if self.unsynced:
            self.file.sync()
            self.unsynced = False

    def close(self) -> None:
        self.sync()
        self.file.close()


def check_sequence(checkpoints: list[Checkpoint], directory: Path) -> None:
    """Tree sizes never shrink; anything else is damage."""
    previous = 0
    for checkpoint in checkpoints:
        if checkpoint.tree_size < previous:
            raise AuditCorrupt(
                f"{directory / FILE_NAME}: checkpoint at tree size {checkpoint.tree_size} follows one at {previous}"
            )
        previous = checkpoint.tree_size
