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
never outlives them in a crash. The checkpoint file itself is fsynced at most
once per checkpoint interval and on close: a crash may lose the newest
checkpoints (they can be signed again), never a record.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2
from .errors import AuditCorrupt
from .keys import SigningKey, signature_valid
from .segments import CHECKPOINT_MAGIC, AppendFile, FrameScanner, frame, frames_start

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
    and whether that was a torn (incomplete) last frame."""
    path = directory / FILE_NAME
    try:
        data = path.read_bytes()
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
            break
    return found, scanner.end, scanner.problem, scanner.torn


class CheckpointFile:
    """The open checkpoint file of a live log (written by the writer thread only)."""

    __slots__ = ("file", "latest", "unsynced")

    def __init__(self, file: AppendFile, latest: Checkpoint | None):
        self.file = file
        self.latest = latest
        self.unsynced = False

    @classmethod
    def open(cls, directory: Path) -> tuple["CheckpointFile", list[Checkpoint]]:
        """Open for appending after cutting a torn tail; also returns the checkpoints found."""
        path = directory / FILE_NAME
        found, end, problem, _ = read_all(directory)
        if not path.exists() or end == 0:
            if path.exists():  # cut short while being created: it holds nothing
                log.warning("audit: %s: %s; starting it afresh", path, problem)
                path.unlink()
            return cls(AppendFile.create(path, CHECKPOINT_MAGIC), None), []
        size = path.stat().st_size
        if problem is not None:
            log.warning("audit: %s: dropped %d bytes after the last intact checkpoint (%s)", path, size - end, problem)
        return cls(AppendFile.reopen(path, end), found[-1] if found else None), found

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
