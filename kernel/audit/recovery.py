"""Opening a log directory: rebuild the in-memory state from the files, repairing a torn tail.

Every segment is scanned once (frame checksums, the hash at the end of each
stored record); their hashes become the Merkle tree's leaves. Only the last
segment may end in a torn frame: it is cut back to the last intact record and
the bytes dropped are logged. Damage anywhere else, a missing segment, or a
log that no longer matches its last signed checkpoint stops the open with
``AuditCorrupt``: the kernel must not append to a log it cannot vouch for
(``aios-kernel audit verify`` names the first bad record).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import Checkpoint, check_sequence
from .errors import AuditCorrupt
from .merkle import MerkleTree
from .record import GENESIS_PREV_HASH, split_stored
from .segments import MAGIC, FrameScanner, frames_start, list_segments

log = logging.getLogger("aios.audit")

INDEX_EVERY = 256  # records between entries of the sparse (sequence -> file offset) index
INDEX_MASK = INDEX_EVERY - 1


@dataclass
class LogState:
    """What the writer and the readers share about the files, rebuilt on open."""

    tree: MerkleTree = field(default_factory=MerkleTree)
    segments: list[tuple[int, Path]] = field(default_factory=list)  # (first sequence, path), in order
    index: list[tuple[int, int, int]] = field(default_factory=list)  # (sequence, segment number, offset)
    last_hash: bytes = GENESIS_PREV_HASH
    tail_size: int = 0  # intact bytes of the last segment
    dropped_bytes: int = 0  # torn tail cut on this open


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
        scanner = FrameScanner(memoryview(data), start)
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
            state.dropped_bytes = len(data) - scanner.end
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
