"""``aios-kernel audit archive LOG_DIR DEST``: move the oldest records out of a stopped kernel's log.

A log only grows, and a kernel's start reads all of it (~2.3 s per million
records on the development VM: bench/RESULTS.md). Archiving moves whole
segments, records ``[first, b)``, into ``DEST``, a log directory of its own
that ``audit verify`` and ``audit export`` read like any other, and leaves in
the live directory the small signed base that stands for them
(kernel/audit/base.py): the kernel then starts, proves and verifies from ``b``.

Steps, each before the next, so that a stop anywhere loses nothing:

1. take the log's lock (no kernel can start on it meanwhile) and verify the
   whole log strictly with the key the archive signs with (and the earlier
   keys of a rotation, given with ``--from-key``), never with keys merely found
   in the directory: the archive signs over what it verified;
2. pick ``b``: the newest segment boundary at or before ``--before``, or whose
   record is older than ``--older-than`` days (records are in time order: the
   writer stamps them as it writes), and not past the oldest record the kernel's
   store may still read back (kernel/store/audit_needs.py: a task stopped
   mid-attempt, the review mark, a resolution being delivered);
3. sign a checkpoint for tree size ``b`` with the log's key; write ``DEST``:
   the segments, every checkpoint up to ``b`` and that one, the public keys, the
   previous base (an archive of an archived log starts where that one ended) and
   ``archive.json`` saying what it is, signed (marker.py); fsync it all and verify it strictly;
4. write the live directory's new base (atomically);
5. remove the archived segments. A stop between 4 and 5 leaves segments the base
   already covers: the kernel ignores them (with a WARNING) and running the
   command again removes them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoints as cps
from ..progress import Progress
from ..store.audit_needs import oldest_needed
from ..store.sqlite import DATABASE_FILE
from .base import ARCHIVE_MARKER, FILE_NAME as BASE_FILE, ArchiveBase, write_base
from .errors import AuditError
from .keys import PUBLIC_KEY_FILE, PUBLIC_KEYS_DIR, load_or_create
from .marker import marker_json
from .record import parse_stored
from .recovery import lock_directory, recover
from .segments import CHECKPOINT_MAGIC, MAGIC, FrameScanner, frame, frames_start, fsync_dir, read_regular, read_log_file
from .verify import verify_directory

DAY_NS = 86_400 * 1_000_000_000


class ArchiveRefused(AuditError):
    """The archive could not run (exit 2): a live kernel, a log that does not verify, a destination in use."""

    code = "FAILED_PRECONDITION"


@dataclass
class ArchiveFailed(AuditError):
    """The checks passed, then the archive could not be written (exit 1): nothing was removed from the log."""


@dataclass
class ArchiveResult:
    first: int  # the first record archived
    end: int  # records before it are archived now (the live log's new base)
    segments: int
    bytes: int
    removed_leftovers: int  # segments a stopped earlier run left behind, removed now
    held_back: str = ""  # why the cut stopped short of what was asked ("" when it did not)
    one_segment: bool = False  # the log is one segment, the one a kernel writes into: nothing can be archived yet
    signed_base: bool = False  # the base had no archive signature (an earlier release's), and has one now

    def summary(self, directory: Path, dest: Path) -> str:
        held = f"; {self.held_back}" if self.held_back else ""
        if self.signed_base:
            held += f"; signed the archive base of {directory} (--accept-base)"
        if self.end == self.first:
            left = (f"; removed {self.removed_leftovers} segment(s) an earlier run left" if self.removed_leftovers
                    else "")
            if self.one_segment:  # (the same "no segment ends before the cut" read as a riddle: a walk-through)
                return (f"{directory}: nothing to archive: the log is one segment, the one a kernel writes into; "
                        f"a segment can be archived once the log has moved on to the next (every "
                        f"audit_segment_bytes, 64 MiB by default){left}")
            return (f"{directory}: nothing to archive (no segment ends at or before the cut after record "
                    f"{self.first}){held}{left}")
        return (f"archived records {self.first}..{self.end - 1} ({self.end - self.first:,} records, {self.segments} "
                f"segment(s), {self.bytes:,} bytes) from {directory} to {dest}; the live log starts at record "
                f"{self.end} now{held}. Keep {dest} with your records; `aios-kernel audit verify {dest} --strict "
                f"--min-records {self.end}` checks it")


def archive(directory: Path, dest: Path, before: int | None = None, older_than_days: float | None = None,
            key_path: Path | None = None, now_unix_ns: int | None = None, store: Path | None = None,
            no_store: bool = False, from_keys: list[bytes] = (), accept_adopted: bool = False,
            accept_base: bool = False) -> ArchiveResult:
    """Archive the oldest whole segments of the stopped log in ``directory`` to the new directory ``dest``.

    ``store``: the kernel's store (default ``kernel.sqlite3`` beside the log directory), whose needs bound the cut;
    ``no_store``: the log has none. ``from_keys``: public keys of earlier key epochs (a rotation), trusted besides
    the signing key's own. ``accept_adopted``: archive even though a start signed records holding a clean stop
    (what ``verify --strict`` fails on: the checkpoints that covered them were cut, or the kernel was killed between
    its "kernel stopping" record and its final checkpoint), once an operator has looked at them; every other strict
    check holds (records no checkpoint covers, a retired key signing again). ``accept_base``: the log's archive base
    has no archive signature (one an archive of a release before 2026-11-28 wrote, or one forged: base.py), and an
    operator has checked it against its archive: it is signed now, before anything else."""
    directory, dest = Path(directory), Path(dest)
    if (before is None) == (older_than_days is None):
        raise ArchiveRefused("give exactly one of --before SEQ and --older-than DAYS")
    if not (directory / cps.FILE_NAME).exists():
        raise ArchiveRefused(f"no audit log in {directory} (the kernel keeps its log in <data_dir>/audit)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveRefused(f"{dest} exists and is not an empty folder: an archive goes into a new one")
    if dest.resolve().is_relative_to(directory.resolve()):
        raise ArchiveRefused(f"{dest} is inside the log directory {directory}: archive elsewhere")
    try:
        lock = lock_directory(directory)
    except AuditError:
        raise ArchiveRefused(f"a kernel has the audit log {directory} open: stop it first (archiving reads and "
                             "removes segments it may be writing)") from None
    if no_store and store is None and (directory.parent / DATABASE_FILE).is_file():
        raise ArchiveRefused(f"--no-store, but the kernel's store {directory.parent / DATABASE_FILE} is beside the log: "
                             "the cut must keep the records it still reads back (tasks running, reviews, "
                             "resolutions being delivered); leave --no-store out, or name another with --store")
    if store is None and not no_store:
        store = directory.parent / DATABASE_FILE
        if not store.is_file():
            raise ArchiveRefused(f"no kernel store beside the log ({store}): pass --store with the kernel's "
                                 f"{DATABASE_FILE} (the records it still reads back must stay), or --no-store for a "
                                 "log that has none")
    try:
        return _archive_locked(directory, dest, before, older_than_days, key_path, now_unix_ns, store, from_keys,
                               accept_adopted, accept_base)
    finally:
        os.close(lock)


def _archive_locked(directory: Path, dest: Path, before: int | None, older_than_days: float | None,
                    key_path: Path | None, now_unix_ns: int | None, store: Path | None,
                    from_keys: list[bytes], accept_adopted: bool, accept_base: bool) -> ArchiveResult:
    key_path = Path(key_path) if key_path is not None else directory / "signing-key.pem"
    if not key_path.is_file():
        raise ArchiveRefused(f"no signing key at {key_path}: pass --key with the kernel's audit_key")
    key = load_or_create(key_path)
    trusted = [key.public_raw, *from_keys]  # (never keys merely found in the directory: a review audit)
    checked = verify_directory(directory, trusted, strict=True, locked_here=True, accept_adopted=accept_adopted,
                               accept_base=accept_base,
                               progress=Progress("aios-kernel audit archive: verifying the log"))
    if not checked.ok:
        raise ArchiveRefused(f"the log does not verify with the signing key{' and --from-key' if from_keys else ''}, "
                             f"so nothing was archived: {checked.describe()}")
    state = recover(directory)
    latest = cps.read_all(directory)[0][-1]
    if key.key_id != latest.key_id:
        raise ArchiveRefused(f"{key_path} holds key {key.key_id}, but the log's checkpoints are signed by "
                             f"{latest.key_id}: pass --key with the key the kernel signs with")
    signed_base = state.base is not None and state.base.unsigned() is not None
    if signed_base:  # (accept_base: verify failed it otherwise) signed first, so an archive copies the signed one
        write_base(directory, state.base.signed_by(key))
    first = state.tree.base_size
    cut = _cut(directory, state, before, older_than_days, now_unix_ns)
    cut, held_back = _within_store_needs(state, cut, store)
    _remove(list(directory.glob(f"{BASE_FILE}.tmp-*")), directory)  # (an archive killed while replacing the base)
    if cut <= first:
        removed = _remove(state.leftovers, directory)
        return ArchiveResult(first, first, 0, 0, removed, held_back, one_segment=len(state.segments) == 1,
                             signed_base=signed_base)
    archived = [path for start, path in state.segments if start < cut]
    checkpoint = cps.sign(key, cut, state.tree.root(cut))
    base = ArchiveBase(cut, tuple(state.tree.peaks(cut)), state.tree.leaf(cut - 1),
                       tuple(state.tree.inclusion_proof(cut - 1, cut)), checkpoint, str(dest.resolve()),
                       time.time_ns(), ends_log=cut == state.tree.size).signed_by(key)
    try:
        size = _write_archive(directory, dest, archived, checkpoint, state, first, cut, key)
    except OSError as exc:
        raise ArchiveFailed(f"could not write the archive in {dest} ({exc.strerror or exc}); nothing was removed "
                            f"from {directory}: delete the incomplete {dest} and run again") from None
    copy = verify_directory(dest, trusted, strict=True, accept_adopted=accept_adopted)
    if not copy.ok or copy.records != cut:
        raise ArchiveFailed(f"the archive in {dest} does not verify ({copy.describe()}); nothing was removed from "
                            f"{directory}: delete {dest} and run again")
    write_base(directory, base)
    removed = _remove(state.leftovers + archived, directory) - len(archived)
    return ArchiveResult(first, cut, len(archived), size, removed, held_back, signed_base=signed_base)


def _within_store_needs(state, cut: int, store: Path | None) -> tuple[int, str]:
    """The cut moved back to the newest segment boundary at or before the oldest record the store may read back,
    and why ("" when it did not move)."""
    needed = oldest_needed(store) if store is not None else None
    if needed is None or needed[0] >= cut:
        return cut, ""
    sequence, why = needed
    boundary = max((start for start, _ in state.segments if start <= sequence), default=state.tree.base_size)
    return min(boundary, cut), f"held back to record {boundary}: the store still reads from #{sequence} ({why})"


def _cut(directory: Path, state, before: int | None, older_than_days: float | None,
         now_unix_ns: int | None) -> int:
    """The newest segment boundary (or the end of the log) at or before ``before``, or before which every record
    is older than ``older_than_days``; the archive base when none qualifies."""
    size = state.tree.size
    boundaries = [start for start, _ in state.segments[1:]] + [size]
    if before is not None:
        return max((b for b in boundaries if b <= before), default=state.tree.base_size)
    limit = (time.time_ns() if now_unix_ns is None else now_unix_ns) - int(older_than_days * DAY_NS)
    cut = state.tree.base_size
    for boundary, (_, path) in zip(boundaries, state.segments):
        if _newest_time(path) >= limit:
            break
        cut = boundary
    return cut


def _newest_time(path: Path) -> int:
    """The time of a segment's newest record. Not simply its last one's: record times are the wall clock's, and a
    clock set back (an NTP step, a host booted before its clock was set) dated a segment's last records days
    before the ones ahead of them, and --older-than archived records younger than it was given."""
    data = read_log_file(path)
    return max((parse_stored(payload).time_unix_ns
                for _, payload in FrameScanner(data, frames_start(path, data, MAGIC) or len(MAGIC))), default=0)


def _write_archive(directory: Path, dest: Path, segments: list[Path], checkpoint, state, first: int,
                   cut: int, key) -> int:
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)  # (owner only, as a data dir the kernel makes)
    size = 0
    for path in segments:
        _copy(path, dest / path.name)
        size += path.stat().st_size
    previous = directory / BASE_FILE
    if previous.exists():  # the archive starts where the earlier one ended: it keeps that base
        _copy(previous, dest / BASE_FILE)
    covered = [c for c in cps.read_all(directory)[0] if c.tree_size <= cut]
    if not covered or covered[-1].tree_size != cut:
        covered.append(checkpoint)
    _write(dest / cps.FILE_NAME, CHECKPOINT_MAGIC + b"".join(frame(c.SerializeToString()) for c in covered))
    keys = directory / PUBLIC_KEYS_DIR
    if keys.is_dir():
        (dest / PUBLIC_KEYS_DIR).mkdir(mode=0o700)
        for path in keys.glob("*.pem"):
            _copy(path, dest / PUBLIC_KEYS_DIR / path.name)
    if (directory / PUBLIC_KEY_FILE).exists():
        _copy(directory / PUBLIC_KEY_FILE, dest / PUBLIC_KEY_FILE)
    _write(dest / ARCHIVE_MARKER, marker_json(directory, first, cut, checkpoint.root_hash, key).encode("utf-8"))
    for path in dest.rglob("*"):
        fsync_dir(path)  # (opened read-only and fsynced: the same for a file as for a folder)
    fsync_dir(dest)
    fsync_dir(dest.parent)
    return size


def _write(path: Path, data: bytes) -> None:
    """A new file of the archive, owner-only (0600) whatever the umask and DEST's own mode: an empty folder given as
    DEST (a mount point, 0755) left every decision's inputs readable by every local user (a helper's audit)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(data)


def _copy(source: Path, target: Path) -> None:
    _write(target, read_regular(source))


def _remove(paths: list[Path], directory: Path) -> int:
    for path in paths:
        path.unlink()
    if paths:
        fsync_dir(directory)
    return len(paths)
