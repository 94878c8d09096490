"""``aios-kernel backup DATA_DIR DEST``: a copy of a data dir, its kernel running or not, that a kernel starts on.

Order is what makes a copy of a running kernel's data dir usable (an upgrade audit: ``cp -a`` copies ``audit/``
before ``kernel.sqlite3``; with a log of any size the store went on meanwhile and had seen records the copied log
lacked, so the copy refused to start with "records were lost"):

1. the store first, with SQLite's online backup (a consistent snapshot, taken while the kernel writes);
2. then the audit log: ``checkpoints.log`` before the segments (so no checkpoint covers records the copy lacks),
   the keys, and the segments in order, each up to its last complete record (a group being written at that moment
   is left out, as a crash would leave it). Every record the store copy saw is in them: it was durable before.

The copy is then checked (``PRAGMA quick_check``; the audit log verified, as ``audit verify`` does) and fsynced.
It starts like a data dir after a crash: records past its last checkpoint are adopted, with the WARNING that says
so (their range is on the start's record), and ``audit verify --strict`` on the copy fails until that start.
The signing key kept in the data dir (the default ``audit/signing-key.pem``) is copied too: keep the copy as safe
as the data dir. Nothing in the source is changed: a stopped kernel's store is copied as files (with a write-ahead
log a kill may have left) and opened in the copy, since even a read-only SQLite connection creates ``-wal`` and
``-shm`` files beside the store (and fails on a read-only mount: a snapshot's).
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .audit.base import read_base
from .audit.recovery import after_base, lock_is_held, writer_is_live
from .audit.segments import MAGIC, SUFFIX, FrameScanner, frames_start, fsync_dir, list_segments, nonzero_end
from .audit.verify import verify_directory
from .progress import Progress
from .store.sqlite import DATABASE_FILE, LOCK_FILE as STORE_LOCK

_fsync = fsync_dir  # (opened read-only and fsynced: the same for a file as for a folder)

SKIPPED = {"LOCK"}  # the writer's lock: the copy's own kernel takes its own


class BackupRefused(Exception):
    """The backup could not run (exit 2): a missing source, a destination in use."""


@dataclass
class BackupResult:
    ok: bool
    summary: str


def backup(source: Path, dest: Path) -> BackupResult:
    """Copy the data dir ``source`` to ``dest`` (which must not exist, or be empty) and check the copy."""
    source, dest = Path(source), Path(dest)
    store = source / DATABASE_FILE
    if not store.is_file():
        raise BackupRefused(f"{source} is no kernel data dir: it has no {DATABASE_FILE}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupRefused(f"{dest} exists and is not an empty folder: a backup goes into a new one")
    if dest.resolve().is_relative_to(source.resolve()):  # (it would be copied into itself by the next backup)
        raise BackupRefused(f"{dest} is inside the data dir {source}: back up elsewhere")
    audit = source / "audit"
    # A kernel holds its store's lock (and, with a log, the log's) while it runs. Not seen from another pid
    # namespace (a sidecar container): the stopped path checks that nothing changed while it copied.
    running = lock_is_held(source / STORE_LOCK) or (audit.is_dir() and writer_is_live(audit))
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)  # (owner only, as a data dir the kernel makes)
    except OSError as exc:
        raise BackupRefused(f"cannot create {dest}: {exc.strerror or exc}") from None
    began = _now()
    if running or not _copy_stopped_store(store, dest / DATABASE_FILE):
        running = True
        (dest / DATABASE_FILE).unlink(missing_ok=True)
        _copy_store(store, dest / DATABASE_FILE)
    store_taken = _now()
    problems = []
    if audit.is_dir():
        trimmed = _copy_audit(audit, dest / "audit")
        verified = verify_directory(dest / "audit", live_copy=running,
                                    progress=Progress("aios-kernel backup: checking the copy"))
        if not verified.ok:
            problems.append(f"the copied audit log fails verification: {verified.describe()}")
        log_taken = _now()
        note = f"; left out a record being written ({trimmed} bytes)" if trimmed else ""
        held = (f"records {verified.first_sequence}..{verified.records - 1}"
                if verified.records > verified.first_sequence else "no records")
        audit_line = f"audit log ({held}, as written by {log_taken}): {verified.describe()}{note}"
    else:
        audit_line = "no audit log (audit_mode off, or a data dir never served)"
    conn = sqlite3.connect(dest / DATABASE_FILE)  # (read-write: the copy is ours, and its last close then leaves
    try:                                           # no -wal and -shm files behind in it)
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    if check != "ok":
        problems.append(f"the copied store fails PRAGMA quick_check: {check}")
    fsync_dir(dest)
    fsync_dir(dest.parent)  # (the new folder's own entry)
    # What the copy holds and as of when: a running kernel's store is a snapshot of one moment and its log, copied
    # after it, goes further (a start on the copy restores reviews and keys from those records); every decision
    # answered before the backup began is in both. (A live copy's summary once read as a crash's.)
    size = (dest / DATABASE_FILE).stat().st_size
    if running:
        kind = f"its kernel running; it holds every decision answered before {began}"
        store_line = f"{DATABASE_FILE} ({size:,} bytes, a snapshot of the running store at {store_taken}"
    else:
        kind = "its kernel stopped"
        store_line = f"{DATABASE_FILE} ({size:,} bytes, as the stopped kernel left it"
    summary = f"backup of {source} in {dest} ({kind}): {store_line}, quick_check {check}); {audit_line}"
    return BackupResult(not problems, summary + "".join(f"\nFAILED: {p}" for p in problems))


def _now() -> str:
    """The time, UTC, to the millisecond: what the summary dates the copy's parts with."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _copy_store(store: Path, copy: Path) -> None:
    """SQLite's online backup of the store: every committed transaction up to one moment, never a torn page."""
    source = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    _fsync(copy)


def _copy_stopped_store(store: Path, copy: Path) -> bool:
    """A stopped kernel's store: its files copied as they are (the write-ahead log too, which holds committed
    transactions a kill left there) into a scratch folder beside ``copy``, and backed up from there: the source
    is never opened (a crash audit: a read-only data dir failed with a traceback, and a writable one was left
    with -wal and -shm files the backup made). False when the files changed while they were copied (a kernel
    this process cannot see runs on them after all): the caller takes the online backup instead."""
    files = [Path(f"{store}{suffix}") for suffix in ("", "-wal")]
    before = [_identity(path) for path in files]
    scratch = copy.parent / ".store-being-copied"
    scratch.mkdir()
    try:
        for path in files:
            if path.is_file():
                shutil.copy2(path, scratch / path.name)
        if [_identity(path) for path in files] != before:
            return False
        _copy_store(scratch / store.name, copy)
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _identity(path: Path) -> tuple | None:
    """What changes when a file is written: its inode, size and modification time (None: no such file)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _copy_audit(audit: Path, copy: Path) -> int:
    """The audit log in the order a live writer allows (module docstring); returns the bytes of a record being
    written that were left out of the last segment (0 when none)."""
    copy.mkdir()
    # Everything but the segments (told by name, not by a listing of them: one created meanwhile must not be
    # copied here, out of order), the checkpoints first.
    others = sorted((path for path in audit.iterdir() if path.suffix != SUFFIX and path.name not in SKIPPED),
                    key=lambda path: path.name != "checkpoints.log")
    for path in others:  # checkpoints, keys (public-keys/, the signing key), torn tails kept aside
        if path.is_dir():
            shutil.copytree(path, copy / path.name)
            for inside in (copy / path.name).iterdir():
                _fsync(inside)
        else:
            shutil.copy2(path, copy / path.name)
    base = read_base(audit)  # (copied above with the other files: an archived log starts at its base)
    expected, last = (base.tree_size if base is not None else 0), None
    segments = after_base(list_segments(audit), base, audit)[0]
    progress = Progress("aios-kernel backup: copying the audit log")
    for number, (first, path) in enumerate(segments):
        progress(f"{number} of {len(segments)} segments copied")
        if first != expected:
            # A segment the writer created while the folder was being listed can be missing from the listing (a
            # directory is read in hash order, not by name), and the next one present: the copy ends before the
            # gap. Those records are all newer than the store copy (a review audit: a backup under rotation
            # otherwise failed its own check as "records were removed").
            break
        target = copy / path.name
        records, tail = _copy_segment(path, target)
        last = (target, tail)
        expected = first + records
    trimmed = 0
    if last is not None and last[1] is not None:  # only the copy's last segment may end in a write cut short
        (target, (start, end)) = last
        with open(target, "r+b") as file:
            file.seek(start)
            file.write(bytes(end - start))
        trimmed = end - start
    for path in copy.iterdir():
        _fsync(path)
    fsync_dir(copy)
    return trimmed


def _copy_segment(path: Path, target: Path, tries: int = 3) -> tuple[int, tuple[int, int] | None]:
    """Copy one segment; returns the records in the copy and, when it ends in a record the writer was writing
    meanwhile, that record's byte range in the copy (to zero, if it is the copy's last segment). A write caught
    half-way with a later page on disk before an earlier one looks like damage (a valid frame after a bad one):
    copied again, up to ``tries`` times, since that write ends within milliseconds while damage stays (and is then
    left for the verification to name)."""
    for attempt in range(tries):
        shutil.copy2(path, target)
        data = target.read_bytes()
        start = frames_start(target, data, MAGIC)
        if start is None:  # being created: nothing in it yet
            return 0, None
        scanner = FrameScanner(data, start, records=True)
        records = sum(1 for _ in scanner)
        if scanner.problem is None:
            return records, None
        if scanner.damage() is None:
            return records, (scanner.end, nonzero_end(data, scanner.end))
    return records, None

