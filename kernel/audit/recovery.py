"""Opening a log directory: rebuild the in-memory state from the files, repairing a torn tail.

Every segment is scanned once (frame checksums, the hash at the end of each
stored record); their hashes become the Merkle tree's leaves. A segment's
zero tail (preallocated space after its last record) is unused space, neither
dropped nor torn. Only the last segment may end in a torn tail: it is cut back
to the last intact record, the bytes cut are kept in ``<segment>.torn-<time>``
and the cut is logged. Damage anywhere else, a missing segment, or a log that
no longer matches its last signed checkpoint stops the open with
``AuditCorrupt`` and changes nothing on disk: the kernel must not append to a
log it cannot vouch for (``aios-kernel audit verify`` names the first bad record,
or the range between two checkpoints when the records were re-chained after an
edit). The refusal names the directory, the records or range, and, where the
checkpoint file was signed by another key than this kernel's, both key ids.

Records after the last signed checkpoint (the unsigned tail) are adopted:
the writer signs them at once, with a WARNING naming the range and the last
one's hash (``AuditLog.recovery`` keeps the same for the start record). Only
a crash leaves such a tail, since a clean stop signs every record; on a log
that stopped cleanly it was appended by someone without the key, which is why
the warning points at ``audit export --from`` and ``audit verify --strict``
fails on a stopped log that has one.

What a crash can leave, and so what is cut. The writer only ever adds bytes
past its last frame, over zeros (preallocated, fsynced) or past the end of the
file, and never rewrites a frame; a write that does not reach the disk leaves
the old contents, zeros. So a crash leaves the data as written up to some
point, then bytes of the writes in flight, each either as written or still zero.

- ``fsync`` mode: a group is written with one ``pwrite`` and fdatasynced
  before any of its records is acknowledged and before the next group is
  written. A power cut can only damage the last group, and nobody was told
  about its records; everything before it is on disk as written. A kill -9
  loses nothing the process wrote; it can cut the write in progress short.
- ``async`` mode: records are acknowledged once written to the page cache and
  the segment is fsynced before each checkpoint, so a power cut can damage
  any record written since the last checkpoint, some of them acknowledged: the
  loss the mode accepts (see ``writer``). A kill -9 loses nothing.

The rule (``FrameScanner.damage``): the bytes from the first bad frame of the
last segment to its last non-zero byte are cut as a torn tail only when they
look like an unfinished write (the data ends inside the frame; the frame's
last byte and everything after it are zero; or a zero header with stray bytes
after it) *and* no valid frame starts anywhere after the bad one. Otherwise
(a complete frame whose bytes are wrong, or a valid frame after a bad one)
the open refuses.

Why no acknowledged record is cut silently. In fsync mode an acknowledged
record was fdatasynced and no crash touches it again: wrong bytes in it come
from a storage fault or an edit. Those are refused wherever a valid record
follows them, and in the last record too unless they look exactly like a
write cut short (the data ends inside it, or it ends in zeros: a record whose
hash happens to end in a zero byte, 1 in 256). What a crash leaves is cut
only at the end: in fsync mode records nobody was told about, in async mode
possibly acknowledged ones, within the loss that mode accepts. Every cut is
logged (a WARNING naming the records, and the INFO summary of the open), and
the bytes cut are kept, so even a misjudged one loses nothing. The price of
refusing: a power cut in the middle of an unsynced write that spans several
pages (one large group in fsync mode; anything since the last checkpoint in
async mode) can leave a valid frame after a torn one, which the bytes alone
cannot tell from damage; the open refuses and the message says how an
operator who knows it was a power cut can cut the tail by hand.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import accel
from .base import ArchiveBase, check_base, read_base
from .checkpoints import FILE_NAME as CHECKPOINT_FILE, Checkpoint, check_sequence, signature_ok
from ..errors import FailedPrecondition
from .errors import AuditCorrupt, AuditError
from .keys import SigningKey, published_keys
from .merkle import MerkleTree
from .record import GENESIS_PREV_HASH, split_stored
from .segments import MAGIC, FrameScanner, frames_start, keep_torn_bytes, list_segments, nonzero_end, read_log_file
from .tail import check_unsigned_tail

log = logging.getLogger("aios.audit")

_scan = accel.load("audit_scan", "kernel._ext.auditscan", "kernel.audit.scan")
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
    torn_problem: str = ""  # what the scanner found there
    damage: tuple[Path, int, int, str] | None = None  # (segment, offset, record, why): bad bytes that are no torn tail
    unfinished: Path | None = None  # a last segment cut short while being created (no record): to remove
    base: ArchiveBase | None = None  # records before base.tree_size were archived (kernel/audit/base.py)
    leftovers: list[Path] = field(default_factory=list)  # segments wholly before the base, not yet removed


def after_base(segments: list[tuple[int, Path]], base: ArchiveBase | None,
               directory: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """The segments of records from the archive base on, and those wholly before it (already in the archive:
    an archive stopped between writing the base and removing them leaves them; ignored, and reported)."""
    if base is None:
        return segments, []
    cut = base.tree_size
    leftovers = []
    for number, (first, path) in enumerate(segments):
        if first >= cut:
            return segments[number:], leftovers
        following = segments[number + 1][0] if number + 1 < len(segments) else None
        if following is None or following > cut:
            raise AuditCorrupt(f"the audit log in {directory} is damaged or was altered: {path.name} starts at record "
                               f"{first}, before the archive base ({base.describe()}), and records after it are not "
                               f"in a segment of their own from {cut} on")
        leftovers.append(path)
    return [], leftovers


def recover(directory: Path) -> LogState:
    """Scan the segments, changing nothing. Damage in the last segment is left in ``state.damage`` for
    ``check_against`` to refuse, with what the checkpoints signed; damage in any other segment raises
    ``AuditCorrupt`` here. The caller cuts a torn tail (``tail_torn``) and removes an ``unfinished``
    segment once every check passed."""
    base = read_base(directory)
    state = LogState() if base is None else LogState(tree=MerkleTree(base.tree_size, base.peaks),
                                                     last_hash=base.last_hash, base=base)
    leaves = bytearray()
    sequence = state.tree.size
    segments, state.leftovers = after_base(list_segments(directory), base, directory)
    for number, (first, path) in enumerate(segments):
        last = number == len(segments) - 1
        if first != sequence:
            raise AuditCorrupt(
                f"{path.name} starts at record {first} but the segments before it end at {sequence}: "
                + ("records are missing (a segment was removed or renamed)" if first > sequence else
                   "it overlaps the segment before it (a segment was copied or renamed)")
            )
        data = read_log_file(path)
        start = frames_start(path, data, MAGIC)
        if start is None:
            if not last:
                raise AuditCorrupt(f"{path.name}: shorter than its header, yet not the last segment")
            # A crash while the segment was being created: it holds no record; removed (once the checks pass)
            # to start it afresh.
            state.dropped_bytes = len(data)
            state.unfinished = path
            break
        # The sound frames in one pass (compiled when built: kernel/audit/scan.py); the scanner then says what
        # stopped it (usually the zero tail), and checks anything after that one frame by frame, as always.
        end, sequence = _scan.scan_sound(data, start, sequence, INDEX_MASK, number, leaves, state.index)
        scanner = FrameScanner(data, end, records=True)
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
                raise AuditCorrupt(damaged(directory, path, scanner.end, sequence, (
                    f"{scanner.problem}, yet it is not the last segment (a segment is fsynced before the next one "
                    f"is created, so no crash leaves this)")))
            problem = scanner.damage()
            if problem is not None:  # refused by check_against, which knows what the checkpoints signed
                state.damage = (path, scanner.end, sequence, problem)
            else:
                state.dropped_bytes = nonzero_end(data, scanner.end) - scanner.end
                state.tail_torn = True
                state.torn_problem = scanner.problem
        state.segments.append((first, path))
        state.tail_size = scanner.end
    state.tree.append_leaves(leaves)
    if sequence > state.tree.base_size:
        state.last_hash = state.tree.leaf(sequence - 1)
    return state


def damaged(directory: Path, path: Path, offset: int, sequence: int, problem: str) -> str:
    """The one-line refusal for damage inside the records (the kernel's start prints it as its reason)."""
    return (f"the audit log in {directory} is damaged or was altered: {path}, record {sequence} at byte offset "
            f"{offset}: {problem}. This is no torn tail a crash leaves, so the log was not opened and nothing "
            f"was changed on disk; run `aios-kernel audit verify {directory}` to see the first bad record")


def _refuse_damage(state: LogState, checkpoints: list[Checkpoint], directory: Path) -> None:
    path, offset, sequence, problem = state.damage
    signed = checkpoints[-1].tree_size if checkpoints else 0
    message = damaged(directory, path, offset, sequence, problem)
    if sequence < signed:
        message += f" (a signed checkpoint covers records 0..{signed - 1}: they were on disk before it was signed)"
    else:  # past the last checkpoint: a power cut cannot be ruled out (see the module docstring)
        message += (f". A power cut in async mode (or during one large write in fsync mode) can leave this too, "
                    f"which only an operator can judge: if that is what happened, keep a copy of {path.name} and "
                    f"truncate it to {offset} bytes, dropping records {sequence} on")
    raise AuditCorrupt(message)


def check_against(state: LogState, checkpoints: list[Checkpoint], directory: Path,
                  key: SigningKey | None = None) -> None:
    """The records on disk must be intact (no damage but a torn tail) and still produce the root of the last
    signed checkpoint, whose signature must verify where a key for it is at hand (``key``, the key this
    kernel signs with, or one kept in ``public-keys/``)."""
    check_sequence(checkpoints, directory)
    if state.base is not None:
        _check_base(state.base, checkpoints, directory, key)
    if state.damage is not None:
        _refuse_damage(state, checkpoints, directory)
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
    fits = latest.tree_size <= size and state.tree.root(latest.tree_size) == latest.root_hash
    own_key_id = key.key_id if key is not None else ""
    if not fits and own_key_id and latest.key_id != own_key_id:  # say what is known: the file was signed elsewhere
        _refuse_foreign_checkpoints(state, checkpoints, directory, own_key_id)
    if latest.tree_size > size:
        raise AuditCorrupt(
            f"the audit log in {directory} is damaged or was altered: the last signed checkpoint covers "
            f"{latest.tree_size} records but only {size} are intact on disk, so records {size}..{latest.tree_size - 1} "
            f"are damaged or missing. {_NOT_OPENED}; run `aios-kernel audit verify {directory}` for details"
        )
    if not fits:
        _refuse_root_mismatch(state, checkpoints, directory)
    _check_signature(checkpoints, directory, key)
    _refuse_retired_key(checkpoints, directory, key)
    signed = latest.tree_size
    if signed < size:  # about to be adopted and signed: they must continue the log (tail.py)
        if signed > state.tree.base_size:
            previous = state.tree.leaf(signed - 1)
        else:
            previous = state.base.last_hash if state.base is not None else GENESIS_PREV_HASH
        check_unsigned_tail(state.segments, signed, size, previous, directory)


_NOT_OPENED = "The log was not opened and nothing was changed on disk"


def _check_base(base: ArchiveBase, checkpoints: list[Checkpoint], directory: Path, key: SigningKey | None) -> None:
    """The archive base is sound and signed, and the checkpoint file still covers it: a file cut back below the
    base (which the archive never leaves) would have the writer sign the records after it as a crash's tail."""
    kept = published_keys(directory)
    check_base(base, directory, lambda key_id: key.public_raw if key is not None and key.key_id == key_id
               else kept.get(key_id))
    if key is not None and base.checkpoint.key_id != key.key_id:  # (a rotation since, or a base dropped in)
        log.warning("audit: the archive base of %s was signed by key %s, not by this kernel's %s; only a key kept in "
                    "the directory vouches for it here: check the log with `aios-kernel audit verify %s --from-key "
                    "<trusted keys>`", directory, base.checkpoint.key_id, key.key_id, directory)
    unsigned = base.unsigned()
    if unsigned is not None:  # (an archive of a release before 2026-11-28, or records deleted: verify --strict fails)
        log.warning("audit: %s: %s", directory, unsigned)
    signed = checkpoints[-1].tree_size if checkpoints else 0
    if signed < base.tree_size:
        raise AuditCorrupt(
            f"the audit log in {directory} is damaged or was altered: {directory / CHECKPOINT_FILE} covers "
            f"{signed} records, fewer than the {base.tree_size} its archive base says were archived (the archive "
            f"leaves the checkpoints as they were): checkpoints were removed. {_NOT_OPENED}")


def _last_matching(state: LogState, checkpoints: list[Checkpoint]) -> int:
    """The tree size of the newest checkpoint before the last whose root the records still give: the change
    lies after it (roots of earlier sizes do not depend on later records)."""
    for checkpoint in reversed(checkpoints[:-1]):
        if checkpoint.tree_size < state.tree.base_size:
            return state.tree.base_size  # (roots before the base are the archive's to check)
        if checkpoint.tree_size <= state.tree.size and state.tree.root(checkpoint.tree_size) == checkpoint.root_hash:
            return checkpoint.tree_size
    return 0


def _refuse_foreign_checkpoints(state: LogState, checkpoints: list[Checkpoint], directory: Path,
                                own_key_id: str) -> None:
    latest = checkpoints[-1]
    size = state.tree.size
    if latest.tree_size > size:
        mismatch = (f"its checkpoint #{len(checkpoints) - 1} covers {latest.tree_size} records where the log "
                    f"holds {size}")
    else:
        first = _last_matching(state, checkpoints)
        mismatch = (f"records {first}..{latest.tree_size - 1} do not hash to the root of its checkpoint "
                    f"#{len(checkpoints) - 1}")
    raise AuditCorrupt(
        f"the audit log in {directory} does not match its checkpoint file: {directory / CHECKPOINT_FILE} was signed "
        f"by key {latest.key_id or '?'}, not by this kernel's key {own_key_id}, and {mismatch}: it is another log's "
        f"checkpoint file, or the records were rewritten. {_NOT_OPENED}; put this log's own {CHECKPOINT_FILE} back, "
        f"and run `aios-kernel audit verify {directory} --from-key <trusted key>` to see which"
    )


def _refuse_root_mismatch(state: LogState, checkpoints: list[Checkpoint], directory: Path) -> None:
    latest = checkpoints[-1]
    first, last = _last_matching(state, checkpoints), latest.tree_size - 1
    number = len(checkpoints) - 1
    raise AuditCorrupt(
        f"the audit log in {directory} is damaged or was altered: records {first}..{last} no longer hash to the "
        f"root of checkpoint #{number} (tree size {latest.tree_size}, key {latest.key_id or '?'}) signed for them: "
        f"one of them was changed, removed, inserted or reordered. {_NOT_OPENED}; run `aios-kernel audit verify "
        f"{directory}` to find it (it names the record, or this range when the records after it were re-chained)"
    )


def _check_signature(checkpoints: list[Checkpoint], directory: Path, key: SigningKey | None) -> None:
    """The last checkpoint's signature, with this kernel's key or a kept public key: a checkpoint whose
    signature fails was not signed by the key it names, and signing over it would vouch for it."""
    latest = checkpoints[-1]
    if key is not None and latest.key_id == key.key_id:
        public = key.public_raw
    else:
        public = published_keys(directory).get(latest.key_id)
    if public is None or signature_ok(latest, public):
        return  # (no key for it at hand: a rotation from a key this directory never kept; writer warns)
    raise AuditCorrupt(
        f"the audit log in {directory} is damaged or was altered: {directory / CHECKPOINT_FILE}, checkpoint "
        f"#{len(checkpoints) - 1} (tree size {latest.tree_size}): its signature does not verify with key "
        f"{latest.key_id}. {_NOT_OPENED}; run `aios-kernel audit verify {directory}` for details"
    )


def _refuse_retired_key(checkpoints: list[Checkpoint], directory: Path, key: SigningKey | None) -> None:
    """A key another key replaced must not sign again. `audit verify --strict` fails on a retired key signing again
    (it cannot tell a rotation back from a copy of the old key in other hands), and `audit archive` needs a strict
    pass: one start with an old key (its signing-key.pem restored after a rotation, an audit_key set back) left
    the log failing both for good (an operator walk-through). Refused before anything on disk changes; a new key
    costs nothing."""
    if key is None or checkpoints[-1].key_id == key.key_id:
        return
    signed = [number for number, checkpoint in enumerate(checkpoints) if checkpoint.key_id == key.key_id]
    if not signed:
        return  # a key new to this log: a rotation
    raise FailedPrecondition(
        f"the audit signing key {key.path} (key {key.key_id}) signed checkpoints of {directory} up to #{signed[-1]} "
        f"and was then replaced (key {checkpoints[-1].key_id} signs now): a retired key signing again makes `audit "
        f"verify --strict` and `audit archive` fail on this log for good. Sign with the current key, or make a new one (openssl genpkey "
        f"-algorithm ed25519 -out audit-key.pem) and name it with audit_key (docs/operations.md, \"Rotating the key\")"
    )


def lock_directory(directory: Path) -> int:
    """Hold an exclusive lock on ``directory/LOCK`` while the log is open: one writer per directory.

    The lock goes with the process (a killed kernel frees it); close the returned fd to release it.
    """
    try:  # (not through a link: another log's LOCK, held by its kernel, read as this one's: lock_is_held)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if not (directory / LOCK_FILE).is_symlink():
            raise
        raise AuditError(f"the audit log's {directory / LOCK_FILE} is a symbolic link (to "
                         f"{os.readlink(directory / LOCK_FILE)}), not the file the kernel made there: someone replaced "
                         f"it; remove it (a kernel makes it anew)") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        # (A second kernel on the data dir meets the store's lock first: here it is mostly `audit archive`.)
        raise AuditError(f"the audit log {directory} is already open: a process holds its LOCK (an `aios-kernel audit "
                         f"archive` running on it, another kernel process, or this one; `fuser "
                         f"{directory / LOCK_FILE}` names it)") from None
    return fd


def writer_is_live(directory: Path) -> bool:
    """Whether some process holds the directory's writer lock now (read from /proc/locks, taking no lock).

    Taking even a shared lock to find out could make a kernel starting at that moment fail to open its log.
    """
    return lock_is_held(directory / LOCK_FILE)


def lock_is_held(path: Path) -> bool:
    """Whether some process holds a flock on ``path`` now, as /proc/locks shows it (taking no lock). Only processes
    of this pid namespace are listed there: another container's kernel is not seen. A symbolic link holds no lock:
    one to another log's LOCK, held by its kernel, passed this log's crash tail as a live kernel's under verify
    --strict (a helper's audit), and a kernel opens its LOCK never through one."""
    try:
        info = os.lstat(path)
        with open("/proc/locks", encoding="ascii") as locks:
            held = locks.read().splitlines()
    except OSError:
        return False
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device
               for fields in (line.split() for line in held))


def keep_torn_tail(state: LogState) -> Path:
    """Log the torn tail of the last segment about to be cut, and keep its bytes aside (the zeros after them
    are unused space: not kept); returns where they are kept."""
    path = state.segments[-1][1]
    records = state.tree.size
    log.warning(
        "audit: torn tail in %s: dropped %d bytes after record %d (%s): a write a crash cut short, never "
        "acknowledged in fsync mode (in async mode, records written since the last checkpoint may be among "
        "them: a power cut loses those)", path.name, state.dropped_bytes, records - 1, state.torn_problem,
    )
    return keep_torn_bytes(path, state.tail_size, state.dropped_bytes)
