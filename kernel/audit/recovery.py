"""Opening a log directory: rebuild the in-memory state from the files, repairing a torn tail.

Every segment is scanned once (frame checksums, the hash at the end of each
stored record); their hashes become the Merkle tree's leaves. A segment's
zero tail (preallocated space after its last record) is unused space, neither
dropped nor torn. Only the last segment may end in a torn frame (or in
non-zero bytes inside its zero tail): it is cut back to the last intact
record and the bytes dropped are logged. Damage anywhere else, a missing segment, or a
log that no longer matches its last signed checkpoint stops the open with
``AuditCorrupt``: the kernel must not append to a log it cannot vouch for
(``aios-kernel audit verify`` names the first bad record).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import FILE_NAME as CHECKPOINT_FILE, Checkpoint, check_sequence
from .errors import AuditCorrupt, AuditError
from .merkle import MerkleTree
from .record import GENESIS_PREV_HASH, split_stored
from .segments import MAGIC, FrameScanner, frames_start, list_segments, nonzero_end

log = logging.getLogger("aios.audit")

INDEX_EVERY = 256  # records between entries of the sparse (sequence -> file offset) index
INDEX_MASK = INDEX_EVERY - 1
LOCK_FILE = "LOCK"


@dataclass
class LogState:
    """What the writer and the readers share about the files, rebuilt on open."""

    tree: MerkleTree = field(default_factory=MerkleTree)
    segments: list[tuple[int, Path]] = field(default_factory=list)  # (first sequence, path), in order
    index: list[tuple[int, int, int]] = field(default_factory=list)  # (sequence, segment number, offset)
    last_hash: bytes = GENESIS_PREV_HASH
    tail_size: int = 0  # intact bytes of the last segment (its logical end; zeros may follow)
    dropped_bytes: int = 0  # torn tail cut on this open: from tail_size to its last non-zero byte
    tail_torn: bool = False  # the last segment's bytes after tail_size are a torn tail (to keep, then cut)


def recover(directory: Path) -> LogState:
    state = LogState()
    leaves = bytearray()
    sequence = 0
    segments = list_segments(directory)
    for number, (first, path) in enumerate(segments):
        last = number == len(segments) - 1
        if first != sequence:
            raise AuditCorrupt(
                f"{path.name} starts at record {first} but the segments before it end at {sequence}: "
                f"a segment was removed, renamed or added"
            )
        data = path.read_bytes()
        start = frames_start(path, data, MAGIC)
        if start is None:
            if not last:
                raise AuditCorrupt(f"{path.name}: shorter than its header, yet not the last segment")
            # A crash while the segment was being created: it holds no record; start it afresh.
            state.dropped_bytes = len(data)
            log.warning("audit: %s was cut short while being created: removed it (%d bytes)", path.name, len(data))
            path.unlink()
            break
        scanner = FrameScanner(data, start)
        for offset, payload in scanner:
            try:
                _, digest = split_stored(payload)
            except ValueError:
                raise AuditCorrupt(f"{path.name}: record {sequence} at offset {offset} has no hash field") from None
            if not sequence & INDEX_MASK:
                state.index.append((sequence, number, offset))
            leaves += digest
            sequence += 1
        if scanner.problem is not None:
            if not last:
                raise AuditCorrupt(f"{path.name}: {scanner.problem} (record {sequence}), yet it is not the last segment")
            state.dropped_bytes = nonzero_end(data, scanner.end) - scanner.end
            state.tail_torn = True
            log.warning(
                "audit: torn tail in %s: dropped %d bytes after record %d (%s); "
                "records past it were never acknowledged", path.name, state.dropped_bytes, sequence - 1, scanner.problem,
            )
        state.segments.append((first, path))
        state.tail_size = scanner.end
    state.tree.append_leaves(leaves)
    if sequence:
        state.last_hash = state.tree.leaf(sequence - 1)
    return state


def check_against(state: LogState, checkpoints: list[Checkpoint], directory: Path) -> None:
    """The records on disk must still produce the root of the last signed checkpoint."""
    check_sequence(checkpoints, directory)
    if not checkpoints:
        if state.tree.size:  # a log signs tree size 0 before its first record: the checkpoints were removed
            raise AuditCorrupt(
                f"the audit log {directory} holds {state.tree.size} records but no signed checkpoint "
                f"({CHECKPOINT_FILE} was removed or emptied); signing over them now would vouch for records "
                "nothing proves untouched: restore the file, or move the log aside to start a new one"
            )
        return
    latest = checkpoints[-1]
    size = state.tree.size
    if latest.tree_size > size:
        raise AuditCorrupt(
            f"the last signed checkpoint covers {latest.tree_size} records but only {size} are intact on disk: "
            f"record {size} onward is damaged or missing (run `aios-kernel audit verify`)"
        )
    if state.tree.root(latest.tree_size) != latest.root_hash:
        raise AuditCorrupt(
            f"records before {latest.tree_size} no longer hash to the root of the checkpoint signed for them"
        )


def lock_directory(directory: Path) -> int:
    """Hold an exclusive lock on ``directory/LOCK`` while the log is open: one writer per directory.

    The lock goes with the process (a killed kernel frees it); close the returned fd to release it.
    """
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(f"the audit log {directory} is already open (another kernel process, or this one)") from None
    return fd


def writer_is_live(directory: Path) -> bool:
    """Whether some process holds the directory's writer lock now (read from /proc/locks, taking no lock).

    Taking even a shared lock to find out could make a kernel starting at that moment fail to open its log.
    """
    try:
        info = os.stat(directory / LOCK_FILE)
        with open("/proc/locks", encoding="ascii") as locks:
            held = locks.read().splitlines()
    except OSError:
        return False
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device
               for fields in (line.split() for line in held))


def keep_torn_tail(path: Path, intact: int, length: int) -> None:
    """Copy the ``length`` bytes a torn-tail repair is about to cut to ``<segment>.torn-<time>``, for inspection
    (the zeros after them are unused space: not kept)."""
    with open(path, "rb") as source:
        source.seek(intact)
        tail = source.read(length)
    kept = path.with_name(f"{path.name}.torn-{time.time_ns()}")
    kept.write_bytes(tail)
    log.warning("audit: the %d bytes cut from %s are kept in %s", len(tail), path.name, kept.name)
