"""``aios-kernel backup DATA_DIR DEST``: a copy of a data dir, its kernel running or not, that a kernel starts on.

Order is what makes a copy of a running kernel's data dir usable (an upgrade audit: ``cp -a`` copies ``audit/``
before ``kernel.sqlite3``; with a log of any size the store went on meanwhile and had seen records the copied log
lacked, so the copy refused to start with "records were lost"):

1. the store first, with SQLite's online backup (a consistent snapshot, taken while the kernel writes);
2. then the audit log: ``checkpoints.log`` before the segments (so no checkpoint covers records the copy lacks),
   the keys, and the segments in order, each up to its last complete record (a group being written at that moment
   is left out, as a crash would leave it). Every record the store copy saw is in them: it was durable before.

The copy is made in ``DEST/.backup-being-written``, checked (``PRAGMA quick_check``; the audit log verified, as
``audit verify`` does), fsynced and moved into place: a failed backup leaves nothing in DEST.
It starts like a data dir after a crash: records past its last checkpoint are adopted, with the WARNING that says
so (their range is on the start's record), and ``audit verify --strict`` on the copy fails until that start.
The signing key kept in the data dir (the default ``audit/signing-key.pem``) is copied too: keep the copy as safe
as the data dir. Nothing in the source is changed: a stopped kernel's store is copied as files (with a write-ahead
log a kill may have left) and opened in the copy, since even a read-only SQLite connection creates ``-wal`` and
``-shm`` files beside the store (and fails on a read-only mount: a snapshot's).
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .audit.base import read_base
from .audit.recovery import after_base, lock_is_held, writer_is_live
from .audit.segments import (MAGIC, SUFFIX, FrameScanner, check_log_file, frames_start, fsync_dir, list_segments,
                             nonzero_end)
from .audit.verify import verify_directory
from .progress import Progress
from .store.sqlite import DATABASE_FILE, LOCK_FILE as STORE_LOCK
from .store.schema import latest_version
from .store.sqlite_reviews import RECORDED_BEFORE

_fsync = fsync_dir  # (opened read-only and fsynced: the same for a file as for a folder)

SKIPPED = {"LOCK"}  # the writer's lock: the copy's own kernel takes its own
STAGING = ".backup-being-written"  # inside DEST: the copy until it is whole (a kernel refuses to start beside one)


class _CheckFailed(Exception):
    """A restore's copy failed its check: removed, as a failure half-way is."""

    def __init__(self, result: "BackupResult"):
        super().__init__(result.summary)
        self.result = result


class BackupRefused(Exception):
    """The backup could not run (exit 2): a missing source, a destination in use."""


@dataclass
class BackupResult:
    ok: bool
    summary: str


def restore(copy: Path, data_dir: Path) -> BackupResult:
    """Put the backup ``copy`` back as the data dir ``data_dir`` (which must not exist, or be empty), as a backup of
    the copy is made (in the same order, checked, moved into place once whole), but a copy that fails its check is
    refused and removed, not left there for a kernel to start on; a running kernel's data dir is refused by name."""
    copy, data_dir = Path(copy), Path(data_dir)
    if (copy / STAGING).is_dir():
        raise BackupRefused(f"{copy} is an unfinished backup (it holds {STAGING}: the backup was stopped): "
                            "restore another one")
    if lock_is_held(data_dir / STORE_LOCK) or ((data_dir / "audit").is_dir() and writer_is_live(data_dir / "audit")):
        raise BackupRefused(f"a kernel is running on {data_dir}: stop it first, and move its data dir aside (keep "
                            "it: it holds what happened since the backup)")
    version = _schema_version(copy / DATABASE_FILE)
    if version > latest_version():  # (a rollback: put in place, it would only be refused at the kernel's start)
        from . import __version__

        raise BackupRefused(f"{copy / DATABASE_FILE} has schema version {version}, newer than this kernel's "
                            f"{latest_version()} (aios-kernel {__version__}): restore it with a kernel at least as new "
                            f"as the one that wrote it, or restore the backup taken before the upgrade; nothing was "
                            f"changed")
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupRefused(f"{data_dir} exists and is not empty: move it aside first (keep it: it holds what "
                            "happened since the backup), then restore into the empty or new folder")
    return backup(copy, data_dir, keep_failed=False, verb="restore")


def _schema_version(store: Path) -> int:
    """The store's ``PRAGMA user_version`` read from its header (bytes 60-63), without opening it: SQLite would
    add -wal and -shm files to the backup. 0 when the file is missing, short or no database."""
    try:
        with open(store, "rb") as file:
            header = file.read(64)
    except OSError:
        return 0
    if len(header) < 64 or not header.startswith(b"SQLite format 3\0"):
        return 0
    return int.from_bytes(header[60:64], "big")


def backup(source: Path, dest: Path, keep_failed: bool = True, verb: str = "backup") -> BackupResult:
    """Copy the data dir ``source`` to ``dest`` (which must not exist, or be empty) and check the copy.
    ``keep_failed``: a copy that fails its check stays in ``dest`` (a backup's: all there is of a damaged source),
    or is removed (a restore's) and its result returned with ok False."""
    source, dest = Path(source), Path(dest)
    store = source / DATABASE_FILE
    if not store.is_file():
        raise BackupRefused(f"{source} is no kernel data dir: it has no {DATABASE_FILE}")
    if (dest / STAGING).is_dir():
        raise BackupRefused(f"{dest} holds an unfinished backup ({STAGING}: one that was stopped): remove {dest} "
                            f"and back up again")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupRefused(f"{dest} exists and is not an empty folder: a backup goes into a new one")
    if dest.resolve().is_relative_to(source.resolve()):  # (it would be copied into itself by the next backup)
        raise BackupRefused(f"{dest} is inside the data dir {source}: back up elsewhere")
    audit = source / "audit"
    # A kernel holds its store's lock (and, with a log, the log's) while it runs. Not seen from another pid
    # namespace (a sidecar container): the stopped path checks that nothing changed while it copied.
    running = lock_is_held(source / STORE_LOCK) or (audit.is_dir() and writer_is_live(audit))
    made = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)  # (owner only, as a data dir the kernel makes)
        work = dest / STAGING
        work.mkdir(mode=0o700)
    except OSError as exc:
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        raise BackupRefused(f"cannot create {dest}: {exc.strerror or exc}") from None
    # The copy is made in a folder of its own inside DEST and moved into place once whole: a backup that fails
    # (a full disk) or is killed never leaves a kernel.sqlite3 in DEST that looks like a data dir (a full destination
    # left an empty kernel.sqlite3 there, which a kernel starts on as a new, empty store).
    try:
        result = _backup_into(source, store, audit, running, work, dest, verb)
        if not result.ok and not keep_failed:
            raise _CheckFailed(result)
        for name in ("audit", DATABASE_FILE):  # the store last: it is what makes DEST a data dir
            if (work / name).exists():
                # Owner only, whatever DEST's own mode: an empty folder given as DEST (a mount point, 0755) left the
                # store's free text and the log readable by every local user (the kernel's own data dir is 0700).
                (work / name).chmod(0o700 if name == "audit" else 0o600)
                (work / name).rename(dest / name)
        work.rmdir()
        fsync_dir(dest)
        fsync_dir(dest.parent)  # (the new folder's own entry)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dest / "audit", ignore_errors=True)  # (moved before a failure: taken out again)
        (dest / DATABASE_FILE).unlink(missing_ok=True)
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, _CheckFailed):
            return BackupResult(False, f"{exc.result.summary}\nnothing was {verb}d: {dest} is left as it was")
        if _out_of_space(exc):  # (the source is only read: a full disk is the destination's)
            raise BackupRefused(f"{dest} has no space left for the copy ({_cause(exc)}); nothing was left there: "
                                f"free space or back up elsewhere (a copy takes about the data dir's size)") from None
        raise
    return result


def _backup_into(source: Path, store: Path, audit: Path, running: bool, work: Path, dest: Path,
                 verb: str) -> BackupResult:
    """The copy of ``source`` into ``work``, checked; its summary names ``dest``, where it is moved once whole."""
    began = _now()
    if running or not _copy_stopped_store(store, work / DATABASE_FILE):
        running = True
        (work / DATABASE_FILE).unlink(missing_ok=True)
        _copy_store(store, work / DATABASE_FILE)
    store_taken = _now()
    problems = []
    if audit.is_dir():
        trimmed = _copy_audit(audit, work / "audit")
        # (A restore's source is a backup: most often of a running kernel, whose log ends past its last checkpoint
        # with no clean stop, not a crash's; a restore once said "a crash leaves this" of every such backup.)
        verified = verify_directory(work / "audit", live_copy=running or verb == "restore",
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
    conn = sqlite3.connect(work / DATABASE_FILE)  # (read-write: the copy is ours, and its last close then leaves
    try:                                           # no -wal and -shm files behind in it)
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        expects = _records_the_store_saw(conn) if check == "ok" else 0
    finally:
        conn.close()
    if check != "ok":
        problems.append(f"the copied store fails PRAGMA quick_check: {check}")
    # The store and the log must agree: a copy whose store cites records its log lacks (a backup cut short after its
    # last checkpoint, which verifies as a crash's log) is refused by the kernel at start (decisions.py
    # _lost_records, fsync mode): said here, not at the first start after a restore.
    held = verified.records if audit.is_dir() else 0
    if audit.is_dir() and verified.ok and expects > held:
        problems.append(f"the copied store saw audit records up to #{expects - 1} but the copied log ends at "
                        f"#{held - 1}: a kernel refuses to start on this copy (records #{held}-#{expects - 1} lost)")
    fsync_dir(work)
    # What the copy holds and as of when: a running kernel's store is a snapshot of one moment and its log, copied
    # after it, goes further (a start on the copy restores reviews and keys from those records); every decision
    # answered before the backup began is in both. (A live copy's summary once read as a crash's.)
    size = (work / DATABASE_FILE).stat().st_size
    if verb == "restore":
        kind = "checked before it was put in place"
        store_line = f"{DATABASE_FILE} ({size:,} bytes"
    elif running:
        kind = f"its kernel running; it holds every decision answered before {began}"
        store_line = f"{DATABASE_FILE} ({size:,} bytes, a snapshot of the running store at {store_taken}"
    else:
        kind = "its kernel stopped"
        store_line = f"{DATABASE_FILE} ({size:,} bytes, as the stopped kernel left it"
    summary = f"{verb} of {source} in {dest} ({kind}): {store_line}, quick_check {check}); {audit_line}"
    return BackupResult(not problems, summary + "".join(f"\nFAILED: {p}" for p in problems))


def _records_the_store_saw(conn: sqlite3.Connection) -> int:
    """How many audit records the store expects the log to hold, as a start reckons it: the review mark, and one
    past the highest record a stored answer cites (a store before schema version 5 has no such column)."""
    try:
        mark = conn.execute("SELECT value FROM meta WHERE key = ?", (RECORDED_BEFORE,)).fetchone()
    except sqlite3.OperationalError:  # (no meta table: a store of schema version 1)
        mark = None
    try:
        cited = conn.execute("SELECT max(audit_sequence) FROM idempotency WHERE audit_sequence >= 0").fetchone()[0]
    except sqlite3.OperationalError:  # (no audit_sequence column: an older store, filled at its first start)
        cited = None
    return max(int(mark[0]) if mark else 0, -1 if cited is None else cited + 1)


def _out_of_space(exc: BaseException) -> bool:
    """A full disk or quota, as an OSError or as SQLite's "database or disk is full" (writing the store's copy)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _cause(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


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
    transactions a kill left there) into a scratch folder beside ``copy``, and made whole there: the source
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
        # The copied files are the copy: opened here (read-write, they are ours), the write-ahead log is folded into
        # the store and removed at the last close, and the store moved into place. (Backed up once more from here,
        # the destination needed twice the store's size: a full tmpfs refused a 660 KB store at 1.3 MB.)
        conn = sqlite3.connect(scratch / store.name)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        (scratch / store.name).rename(copy)
        _fsync(copy)
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
    check_log_file(path)  # (a segment made larger after it was written: refused before it is copied, then read)
    for attempt in range(tries):
        shutil.copy2(path, target)
        data = target.read_bytes()
        start = frames_start(path, data, MAGIC)  # (named by the source's path: the copy is removed on a refusal)
        if start is None:  # being created: nothing in it yet
            return 0, None
        scanner = FrameScanner(data, start, records=True)
        records = sum(1 for _ in scanner)
        if scanner.problem is None:
            return records, None
        if scanner.damage() is None:
            return records, (scanner.end, nonzero_end(data, scanner.end))
    return records, None

