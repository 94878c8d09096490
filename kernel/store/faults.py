"""What the store says when its file or its disk fails: one line that names the data dir, the cause and what to do.

Three kinds, by what an operator (or a caller) can do about them:

- ``StoreCannotOpen`` (FAILED_PRECONDITION): the store cannot be opened at
  start (damaged, not a database, locked by another process, a folder where
  the file should be, a read-only or full disk). The kernel does not start;
  ``aios-kernel serve`` prints the message and exits 2.
- ``StoreFailed`` (UNAVAILABLE): the store fail-stopped while serving (pages
  found damaged, its file deleted or replaced under the kernel). It takes no
  more reads or writes until the kernel is restarted on a sound data dir: a
  write acknowledged into a damaged or unlinked file would be lost.
- ``StoreBusy`` (UNAVAILABLE with a ``retry-after-ms`` hint): a write could
  not be stored now (disk full, an I/O error, another process holding the
  write lock) and nothing of it was kept; the same call may succeed later.

SQLite's own errors are told apart by their primary result code
(``sqlite3.Error.sqlite_errorcode``, Python 3.11+), not by their text.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import sqlite3
from pathlib import Path

from ..errors import FailedPrecondition, Unavailable

# SQLite primary result codes (https://www.sqlite.org/rescode.html).
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED = 3, 5, 6
SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT = 8, 10, 11
SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 13, 14, 26

DAMAGE = frozenset({SQLITE_CORRUPT, SQLITE_NOTADB})  # the file's bytes are wrong: fail-stop
PASSING = frozenset({SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL})  # may pass: retry
RETRY_AFTER_MS = 1000  # the hint on a write refused for a full disk or a lock: space is freed in seconds, not ms
# A write that failed at the file-size limit left its file within one write of it (a page, a WAL frame).
FILE_SIZE_LIMIT_MARGIN = 1 << 16
LOW_SPACE_BYTES = 1 << 20  # below this much free space an I/O error is most likely the disk being full
# A store refusing writes is not taken for recovered while less than this is free, whatever a probe's small write did:
# on a full disk one row still fits in the write-ahead log's old frames (a drill's health flapped every second).
RECOVERED_SPACE_BYTES = 4 << 20

RESTORE = ("restore the data dir from a backup (or move kernel.sqlite3* aside to start with an empty store: its "
           "tasks, reviews and idempotency keys are then lost), then restart")


class StoreCannotOpen(FailedPrecondition):
    """The data dir's store cannot be opened: the kernel does not start (exit 2), the message says why."""


class StoreFailed(Unavailable):
    """The store fail-stopped while serving: no more reads or writes until a restart on a sound data dir."""


class StoreBusy(Unavailable):
    """A write was not stored (nothing of it was kept) for a reason that may pass: retry after the hint."""

    def __init__(self, message: str):
        super().__init__(message, trailers=(("retry-after-ms", str(RETRY_AFTER_MS)),))


def result_code(exc: BaseException) -> int:
    """SQLite's primary result code of ``exc`` (0 for anything that is not a SQLite error with one)."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def is_damage(exc: BaseException) -> bool:
    return result_code(exc) in DAMAGE


def may_pass(exc: BaseException) -> bool:
    return result_code(exc) in PASSING


def _low_on_space(folder: Path, below: int = LOW_SPACE_BYTES) -> bool:
    try:
        return shutil.disk_usage(folder).free < below
    except OSError:
        return False


def _at_file_size_limit(path: Path) -> int | None:
    """The file-size limit the process runs under (RLIMIT_FSIZE: `ulimit -f`, systemd's LimitFSIZE) if the store's
    file or its write-ahead log has reached it: SQLite reports a write past it as a full disk (or an I/O error)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    for name in (path.name, f"{path.name}-wal", f"{path.name}-journal"):
        try:
            if (path.parent / name).stat().st_size + FILE_SIZE_LIMIT_MARGIN >= limit:
                return limit
        except OSError:
            continue
    return None


def short_of_space(path: Path) -> str | None:
    """Why the store ``path`` (kernel.sqlite3), refusing writes, should go on refusing them though a probe's write
    committed, if it should: one small row still fits in the write-ahead log's old frames, on a full disk as at the
    file-size limit (a drill under `ulimit -f` flapped "takes writes again" / "refusing writes" every second)."""
    folder = path.parent
    if _low_on_space(folder, RECOVERED_SPACE_BYTES):
        return f"the disk holding {folder} has less than {RECOVERED_SPACE_BYTES >> 20} MiB free: free space there"
    if (limit := _at_file_size_limit(path)) is not None:
        return (f"{path.name} is at the file-size limit the kernel runs under ({limit} bytes): lift it "
                f"(`ulimit -f` in the kernel's shell, LimitFSIZE in its systemd unit)")
    return None


def sqlite_cause(exc: sqlite3.Error, path: Path) -> str:
    """What is wrong with the store file ``path`` (or its disk), as the second half of "data_dir X: ..."."""
    code, name = result_code(exc), path.name
    if code == SQLITE_NOTADB:
        return f"{name} is not a SQLite database (its header is damaged, or another file is in its place): {RESTORE}"
    if code == SQLITE_CORRUPT:
        return damaged(path, str(exc))
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return (f"{name} is locked by another process ({exc}): stop the process holding a write transaction on it "
                f"(`fuser {path}` names the processes that have it open)")
    if code == SQLITE_CANTOPEN:
        return _cannot_open_cause(exc, path)
    if code == SQLITE_READONLY:
        return f"{name} cannot be written ({exc}): make the file and the data dir writable by the kernel's user"
    if code in (SQLITE_FULL, SQLITE_IOERR) and (limit := _at_file_size_limit(path)) is not None:
        return (f"{name} cannot grow past the file-size limit the kernel runs under ({limit} bytes; {exc}): lift it "
                f"(`ulimit -f` in the kernel's shell, LimitFSIZE in its systemd unit)")
    if code == SQLITE_FULL or (code == SQLITE_IOERR and _low_on_space(path.parent)):
        return f"the disk holding {name} is full ({exc}): free space there"
    if code == SQLITE_IOERR:
        return f"reading or writing {name} failed ({exc}): check the disk (dmesg) and its free space"
    if code == SQLITE_PERM:
        return f"{name} cannot be opened: permission denied ({exc})"
    return f"{name} cannot be used ({type(exc).__name__}: {exc})"


def damaged(path: Path, detail: str) -> str:
    return (f"{path.name} is damaged ({detail}); `sqlite3 {path} .recover` may salvage its rows into a new file: "
            f"{RESTORE}")


def _cannot_open_cause(exc: sqlite3.Error, path: Path) -> str:
    # SQLite says only "unable to open database file": look at what is there for the reason.
    if path.is_dir():
        return f"{path.name} is a folder, not the database file: move it aside (or choose another data_dir)"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{path.name} cannot be created or opened: the data dir is not writable by the kernel's user ({exc})"
    return f"{path.name} cannot be opened ({exc}): check its permissions and the disk"


def os_cause(exc: OSError) -> str:
    """An OSError's reason in words, with what to do for the usual ones (read-only, full, permissions)."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        return f"{reason}: choose a data_dir on a writable file system"
    if exc.errno == errno.ENOSPC:
        return f"{reason}: the disk is full; free space there"
    if exc.errno == errno.EFBIG:
        return f"{reason}: lift the file-size limit the kernel runs under (`ulimit -f`, LimitFSIZE in its systemd unit)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{reason}: make it writable by the kernel's user"
    return reason


def cannot_open(data_dir: Path, path: Path, exc: BaseException) -> StoreCannotOpen:
    """The start's error line for a store that cannot be opened."""
    if isinstance(exc, sqlite3.Error):
        return StoreCannotOpen(f"data_dir {data_dir}: {sqlite_cause(exc, path)}")
    if isinstance(exc, OSError):
        return StoreCannotOpen(f"data_dir {data_dir}: {path.name} cannot be written: {os_cause(exc)}")
    return StoreCannotOpen(f"data_dir {data_dir}: {path.name} cannot be opened: {type(exc).__name__}: {exc}")
