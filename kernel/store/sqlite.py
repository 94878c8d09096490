"""The local backend's database: one SQLite file per data directory.

Tasks, reviews and idempotency keys share ``<data_dir>/kernel.sqlite3``:

- WAL journal, so readers never wait for a writer's fsync.
- Writes go through one connection behind a lock (SQLite allows one writer
  at a time anyway; waiting on our lock instead of retrying on SQLITE_BUSY
  keeps waits short), and are **group-committed** (``group_commit.py``):
  writers that arrive while a commit waits for its fsync are run together,
  each in its own savepoint, and committed in one transaction with one
  fsync; each gets its own result or its own exception. ``transact(work)``
  is the way in; ``write()`` (a block of statements run by its caller)
  still works: it waits for its turn and leads a group, its block first. Durable writes (the default) commit with
  ``synchronous=FULL``: the change is on disk when the call returns. Task and
  review state changes use them; records that can be recomputed (idempotency
  answers) may pass ``durable=False`` and skip the fsync.
- Reads use a small pool of read-only connections, handed out in arrival
  order, so listing reviews does not queue behind a commit's fsync (see
  "Local store" in bench/RESULTS.md). Writes read what they change inside their
  own transaction, on the writer connection, never through the pool.
- The schema is versioned by ``PRAGMA user_version`` and migrated forward on
  open (``schema.MIGRATIONS``); a file newer than this code is refused.
- ``open_database`` takes an exclusive lock on ``<data_dir>/kernel.lock`` so
  two kernel processes never run the same durable tasks; the lock dies with
  the process (kill -9 included).
- A store that cannot be opened (damaged, not a database, locked by another
  process, unwritable, on a full disk) raises ``StoreCannotOpen`` with one
  line naming the data dir and the cause (``faults.py``); the kernel's own
  open (``exclusive``) also runs ``PRAGMA quick_check`` and takes and drops
  the write lock once, so damage and a lock held elsewhere refuse the start
  instead of failing its first write. While open, damage SQLite reports
  (SQLITE_CORRUPT, SQLITE_NOTADB) and the file being deleted or replaced
  under the kernel (checked before each durable commit, and at least every
  ``IDENTITY_CHECK_S`` before others) **fail-stop** the store: every later
  read and write raises ``StoreFailed`` and ``failure_listeners`` are told
  once. A full disk, an I/O error or a lock held elsewhere fails only the
  writes it hit, with ``StoreBusy`` (UNAVAILABLE, retry hint), and puts the
  store in the *refusing* state until a probe's write commits: new writes are
  refused at once meanwhile, without waiting the busy timeout (``refusals.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from ..errors import FailedPrecondition, Internal, KernelError
from . import faults
from .faults import StoreBusy, StoreCannotOpen, StoreFailed
from .group_commit import GroupCommit
from .refusals import WriteRefusals
from .schema import MIGRATIONS, migrate

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock
    fcntl = None

DATABASE_FILE = "kernel.sqlite3"
LOCK_FILE = "kernel.lock"
BUSY_TIMEOUT_MS = 10_000  # another process (a read-only tool) holding a write lock
# ... and how long a write waits for it once the kernel serves: the first write to find the lock held sets off the
# refusing state (refusals.py), and until then it holds every write queued behind it, and the decisions that wait
# for theirs: a drill's Decide load got no answer for the whole 10 s. Another process's write holds the lock for
# milliseconds; one holding it longer costs callers an UNAVAILABLE with a retry hint, not a stall.
WRITE_BUSY_TIMEOUT_MS = 1_000
GROUP_MAX = 256  # writes per group commit
GROUP_MS = 5.0  # ms of work after which a group stops taking newcomers and commits
# How stale the "is kernel.sqlite3 still the file we write?" look may be before a non-durable commit (a durable
# one always looks: an os.stat, ~3 us, next to its fsync).
IDENTITY_CHECK_S = 1.0

log = logging.getLogger("aios.store")

# How a store fault's error line goes on after "data_dir X: ", by what was being done.
_WRITE_LOST = "this write was not stored (nothing of it was kept)"
_READ_FAILED = "this read failed"


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        # Made owner-only before SQLite makes it 0644 (its -wal and -shm take the database's mode): escalated
        # cases' free text is in it, and a data dir made beforehand may be open to every local user.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:  # there already (kept as it is), or not to be made: SQLite's open says why, as before
            pass
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


class _FairSlots:
    """A counting semaphore that serves waiters in arrival order (threading.Semaphore does not).

    A released slot is handed straight to the oldest waiter, so a thread that
    reads in a tight loop cannot starve one that reads now and then.
    """

    __slots__ = ("_free", "_lock", "_waiters")

    def __init__(self, slots: int):
        self._free = slots
        self._lock = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        waiter.acquire()  # released by release(), which hands us its slot

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1


class Database:
    """A data directory's SQLite database; use ``open_database``."""

    def __init__(self, data_dir: str | os.PathLike, *, exclusive: bool = True, read_connections: int = 2,
                 group_max: int = GROUP_MAX, group_ms: float = GROUP_MS):
        self._group = GroupCommit(self._begin_group, self._end_group, group_max, group_ms,
                                  before_commit=self._before_commit, lost=self._lost_error,
                                  committed=self._committed)
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DATABASE_FILE
        # Called once, with the StoreFailed, when the store fail-stops (the server can turn health NOT_SERVING).
        self.failure_listeners: list = []
        self._failure: StoreFailed | None = None
        self._failure_lock = threading.Lock()
        self.busy_refusals = 0  # reads and writes refused with StoreBusy (a lock held too long, a full disk): metrics
        # While writes are refused for a reason that may pass, new ones are refused at once and a thread probes
        # (refusals.py); ``refusal_listeners`` hear the cause when it starts and None when it is over.
        self._refusals = WriteRefusals(self._probe_write)
        self.refusal_listeners = self._refusals.listeners
        self._lock_file = None
        self._write_lock = threading.Lock()
        self._synchronous = ""
        self._closed = False
        self._writer = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of kernel.sqlite3 as opened
        self.wal_path = self.path.with_name(self.path.name + "-wal")
        # ... and of its write-ahead log, once SQLite made it: it keeps it for as long as a connection is open, so
        # another file there (or none) means someone removed it, and every commit since went to a deleted file.
        self._wal_identity: tuple[int, int] | None = None
        self._next_identity_check = 0.0
        try:
            self._open(exclusive)
        except BaseException as exc:
            if self._writer is not None:
                self._writer.close()
            self._release_lock()
            if isinstance(exc, (sqlite3.Error, OSError)):  # the operator's to fix: one line, no traceback
                raise faults.cannot_open(self.data_dir, self.path, exc) from exc
            raise
        # Idle read connections, last returned first. A connection in use is
        # never closed under its reader (sqlite3 may crash the process when a
        # connection is closed while another thread runs a statement on it):
        # close() closes the idle ones and a reader returning one after that
        # closes it itself. ``_pool_lock`` is not the write lock, so taking a
        # reader never waits for a commit's fsync.
        self._idle_readers: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._reader_slots = _FairSlots(max(0, read_connections))
        self._read_pool = read_connections > 0

    def _open(self, exclusive: bool) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreCannotOpen(f"data_dir {self.data_dir} cannot be created: {faults.os_cause(exc)}") from None
        if exclusive:
            self._lock_file = self._take_lock()
        self._writer = _connect(self.path, read_only=False)
        self._writer.execute("PRAGMA journal_mode = WAL")
        if exclusive:  # the kernel's own open; a tool reading beside a running kernel skips the scan
            self._quick_check()
        self._set_synchronous("FULL")
        self._writer.execute("PRAGMA foreign_keys = ON")
        with self._write_lock:
            self.schema_version = migrate(self._writer, MIGRATIONS, str(self.path))
        if exclusive:  # the kernel's own open (a tool writing beside a running kernel keeps waiting its turn)
            self._probe_write_lock()  # (with the whole BUSY_TIMEOUT_MS: a start may wait for a tool to finish)
            self._writer.execute(f"PRAGMA busy_timeout = {min(BUSY_TIMEOUT_MS, WRITE_BUSY_TIMEOUT_MS)}")
        self._identity = self._file_identity()
        self._wal_problem()  # (notes the write-ahead log's identity)

    def _quick_check(self) -> None:
        """Refuse a damaged file at start (one line, exit 2) rather than serve from it until a write lands on
        a bad page and fails with "database disk image is malformed". quick_check reads every page but skips
        the index-vs-table cross-checks of integrity_check: see the README for what it costs."""
        problem = self._writer.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":  # e.g. "*** in database main ***\nPage 2: btreeInitPage() returns error code 11"
            problem = " ".join(problem.replace("*** in database main ***", "").split())
            raise StoreCannotOpen(f"data_dir {self.data_dir}: "
                                  f"{faults.damaged(self.path, f'PRAGMA quick_check: {problem}')}")

    def _probe_write_lock(self) -> None:
        """Take the write lock once (waiting up to BUSY_TIMEOUT_MS) and write a row, rolled back: a lock another
        process holds, or a file the kernel's user cannot write, refuses the start here in one line, instead of
        failing the start's first write with a traceback and then its stop's. (SQLite opens a file it may not
        write read-only without a word, and takes the lock all the same: an upgrade audit restored the store as
        root under a kernel running as another user.)"""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._writer.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('write probe', 0)")
        finally:
            self._writer.execute("ROLLBACK")

    # -- the data-directory lock ----------------------------------------------------------
    def _take_lock(self):
        if fcntl is None:
            return None
        lock_path = self.data_dir / LOCK_FILE
        try:
            handle = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")
        except OSError as exc:  # a read-only data dir, a full disk, no permission
            raise faults.cannot_open(self.data_dir, lock_path, exc) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FailedPrecondition(
                f"data_dir {self.data_dir} is in use by another kernel process (pid {holder}); "
                "stop it or choose another data_dir"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError as exc:  # the disk is full: the pid does not fit
            try:
                handle.close()  # (flushes again, fails again, and closes the descriptor all the same)
            except OSError:
                pass
            raise faults.cannot_open(self.data_dir, lock_path, exc) from None
        return handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    # -- fail-stop ------------------------------------------------------------------------
    # The file is watched by path (os.stat), not through a descriptor of our own: closing any descriptor of
    # the database file drops every POSIX lock the process holds on it, SQLite's included ("How To Corrupt
    # An SQLite Database File", 2.2). While SQLite keeps the file open its inode cannot be reused, so a
    # different (st_dev, st_ino) at the path always means another file.
    def _file_identity(self) -> tuple[int, int]:
        status = os.stat(self.path)
        return status.st_dev, status.st_ino

    def _identity_problem(self) -> str | None:
        """Why kernel.sqlite3 at its path is no longer the file being written, if it is not."""
        try:
            identity = self._file_identity()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return (f"{self.path.name} was deleted under the running kernel (writes would go to the deleted "
                        "file and be lost at the next start)")
            return None  # cannot look (permissions changed?): the commit itself will tell
        if identity != self._identity:
            return (f"{self.path.name} was replaced under the running kernel (another file is at {self.path} "
                    "now; writes would go to the old one)")
        return self._wal_problem()

    def _wal_problem(self) -> str | None:
        """Why kernel.sqlite3-wal is no longer the write-ahead log SQLite writes, if it is not. (An incident drill:
        the WAL deleted under a running kernel went unnoticed; every commit after it went to the deleted file,
        and a crash then lost them all, tasks included, with health SERVING the whole time.)"""
        try:
            status = os.stat(self.wal_path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and self._wal_identity is not None:
                return (f"{self.wal_path.name} was deleted under the running kernel (the store's commits since its "
                        "last checkpoint are only in the deleted file: a stop or crash would lose them)")
            return None
        identity = status.st_dev, status.st_ino
        if self._wal_identity is None:
            self._wal_identity = identity  # (SQLite makes it at the first transaction after the open)
        elif identity != self._wal_identity:
            return (f"{self.wal_path.name} was replaced under the running kernel (another file is at "
                    f"{self.wal_path} now; the store's commits since its last checkpoint are in the old one)")
        return None

    def _before_commit(self, durable: bool) -> None:
        """Before a group's COMMIT: is the file still the one at the path? Always for a durable group (its
        writes are acknowledged as on disk), at most every IDENTITY_CHECK_S for the others."""
        now = time.monotonic()
        if not durable and now < self._next_identity_check:
            return
        self._next_identity_check = now + IDENTITY_CHECK_S
        problem = self._identity_problem()
        if problem is not None:
            raise self._fail_stop(problem)

    def _fail_stop(self, cause: str) -> StoreFailed:
        """Stop taking reads and writes (a write acknowledged into a damaged or deleted file would be lost);
        the first time, log it and tell ``failure_listeners``. Returns the error for the caller to raise."""
        with self._failure_lock:
            first = self._failure is None
            if first:
                # The WAL gone: the kernel still holds the deleted file, and its close checkpoints it into
                # kernel.sqlite3 (a drill: every answered decision's key was there after a SIGTERM), a kill does not.
                remedy = ("stop the kernel with SIGTERM, not SIGKILL (its close copies those commits into "
                          f"{self.path.name} from the file it still holds), then start it again"
                          if cause.startswith(self.wal_path.name) else "restore the data dir and restart the kernel")
                self._failure = StoreFailed(
                    f"data_dir {self.data_dir}: {cause}; the store takes no more reads or writes: {remedy}")
        if first:
            log.error("%s", self._failure.message)
            for listener in self.failure_listeners:
                try:
                    listener(self._failure)
                except Exception:
                    log.exception("store: a failure listener failed")
        return StoreFailed(self._failure.message)  # one per caller: threads raising one instance share its traceback

    @property
    def failure(self) -> StoreFailed | None:
        """Why the store fail-stopped, or None while it serves."""
        return self._failure

    def _fault(self, exc: BaseException, doing: str) -> KernelError | None:
        """What a caller gets for a store fault ``exc`` (fail-stopping on damage); None when ``exc`` is none
        (a constraint, a bug): that one is raised as it is."""
        if isinstance(exc, StoreFailed):
            return StoreFailed(exc.message)
        if faults.is_damage(exc):
            return self._fail_stop(faults.sqlite_cause(exc, self.path))
        if faults.may_pass(exc):
            with self._failure_lock:
                self.busy_refusals += 1
            cause = faults.sqlite_cause(exc, self.path)
            if doing == _WRITE_LOST:
                self._refusals.refused(cause)
            return StoreBusy(f"data_dir {self.data_dir}: {doing}: {cause}; retry after {faults.RETRY_AFTER_MS} ms")
        return None

    # -- refusing writes while a fault that may pass lasts (refusals.py) ----------------------
    @property
    def refusing_writes(self) -> str | None:
        """Why writes are refused now (a lock held elsewhere, a full disk), or None while the store takes them."""
        return self._refusals.cause

    @property
    def write_probes(self) -> int:
        """Probes tried while the store refused writes (since open)."""
        return self._refusals.probes

    def check_writable(self, doing: str = _WRITE_LOST) -> None:
        """Raise StoreBusy at once while the store refuses writes: ``doing`` says what was refused ("this write
        was not stored ..."; a caller refusing new work before it starts says what that work was)."""
        cause = self._refusals.cause
        if cause is not None:
            with self._failure_lock:
                self.busy_refusals += 1
            raise StoreBusy(f"data_dir {self.data_dir}: {doing}: the store refuses writes for now ({cause}); "
                            f"retry after {faults.RETRY_AFTER_MS} ms")

    def _committed(self) -> None:
        self._refusals.passed()  # (one attribute test while the store takes writes)

    def write_again_now(self) -> None:
        """While writes are refused, probe once now rather than at the next probe (a second away): for a stop,
        whose writes (tasks' outcomes, the review mark) were refused at once for a lock released since the last
        probe. Waits one busy timeout at most; the state stays if the probe is refused."""
        if self._refusals.cause is None:
            return
        try:
            self._probe_write()
        except Exception as exc:  # still refused: the stop's writes are refused at once, and say so
            log.info("store: still refusing writes at the stop: %s", exc)

    def _probe_write(self) -> None:
        """The refusing state's probe: one small real write, committed and fsynced (a rolled-back one never
        reaches the disk, so it would not see a full one)."""
        self._check_open()
        short = faults.short_of_space(self.path)
        if short is not None:
            raise StoreBusy(f"data_dir {self.data_dir}: {short}")
        try:
            self._group.run(lambda conn: conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('write probe', ?)", (time.monotonic_ns(),)))
        except sqlite3.Error as exc:
            self._raise_fault(exc, _WRITE_LOST)
            raise

    def _lost_error(self, exc: BaseException) -> KernelError:
        """What each write of a group whose transaction was lost to ``exc`` gets (group_commit's ``_lost``)."""
        fault = self._fault(exc, _WRITE_LOST)
        if fault is not None:
            return fault
        return Internal(f"the store could not commit this write (nothing of it was kept): {type(exc).__name__}: {exc}")

    def _raise_fault(self, exc: sqlite3.Error, doing: str) -> None:
        """Raise the store error for ``exc`` if it is a store fault; returns (so the caller re-raises) if not."""
        fault = self._fault(exc, doing)
        if fault is not None:
            raise fault from exc

    # -- transactions ---------------------------------------------------------------------
    def _set_synchronous(self, level: str) -> None:
        if self._synchronous != level:  # a pragma per commit only when the level changes
            self._writer.execute(f"PRAGMA synchronous = {level}")
            self._synchronous = level

    def transact(self, work: Callable[[sqlite3.Connection], object], durable: bool = True,
                 after_commit: Callable[[object], None] | None = None):
        """Run ``work(conn)`` in a write transaction; returns what it returns, once committed.

        The transaction may be shared with other writers (group commit), each
        in its own savepoint: if ``work`` raises, its own changes are rolled
        back and its exception is raised here, and the others still commit.
        With ``durable`` the commit is fsynced before this returns.
        ``after_commit(result)``, if given, runs after the commit (on the
        committing thread, in commit order, before this returns): publish
        changes to in-process watchers there. ``work`` must only use the
        connection it is given and must not start another write.
        """
        self._check_open()
        self.check_writable()
        try:
            return self._group.run(work, durable, after_commit)
        except sqlite3.Error as exc:  # (a try costs nothing in 3.11 until it catches)
            self._raise_fault(exc, _WRITE_LOST)
            raise

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT); rolled back if the block raises.

        With ``durable`` the commit is fsynced before the block returns. The
        block runs on the caller's thread, so it cannot be queued for another
        thread to run: it waits for its turn and leads a group, whose commit
        also covers the ``transact`` writes queued meanwhile.
        """
        self._check_open()
        self.check_writable()
        try:
            write, conn = self._group.begin_block(durable)
        except sqlite3.Error as exc:  # BEGIN IMMEDIATE: a lock held elsewhere, an I/O error
            self._raise_fault(exc, _WRITE_LOST)
            raise
        try:
            yield conn
        except BaseException as exc:
            self._group.end_block(write, conn, exc)
            if isinstance(exc, sqlite3.Error):
                self._raise_fault(exc, _WRITE_LOST)
            raise
        self._group.end_block(write, conn, None)
        write.outcome()  # the commit's own failure, if any (already a store error: group_commit's ``lost``)

    def _begin_group(self, durable: bool) -> sqlite3.Connection:
        self._write_lock.acquire()
        try:
            self._check_open()
            self._set_synchronous("FULL" if durable else "NORMAL")
            self._writer.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._write_lock.release()
            raise
        return self._writer

    def _end_group(self) -> None:
        self._write_lock.release()

    # -- group-commit counters (since open) ------------------------------------------------
    @property
    def commits(self) -> int:
        """Write transactions committed (each group of writes is one; durable ones are one fsync each)."""
        return self._group.commits

    @property
    def writes(self) -> int:
        """Writes committed (``transact`` calls and ``write`` blocks that did not raise)."""
        return self._group.writes

    @property
    def queued_writes(self) -> int:
        """Writes waiting for the commit in progress to finish (they form the next group)."""
        return self._group.queued

    def stats(self) -> dict[str, int]:
        group = self._group
        return {"commits": group.commits, "durable_commits": group.durable_commits, "writes": group.writes,
                "largest_group": group.largest_group, "queued_writes": group.queued}

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads that see every committed write (one statement = one snapshot)."""
        if not self._read_pool:
            with self._write_lock:
                self._check_open()
                try:
                    yield self._writer
                except sqlite3.Error as exc:
                    self._raise_fault(exc, _READ_FAILED)
                    raise
            return
        self._reader_slots.acquire()
        try:
            conn = self._take_reader()
            try:
                yield conn
            except sqlite3.Error as exc:
                self._raise_fault(exc, _READ_FAILED)
                raise
            finally:
                self._return_reader(conn)
        finally:
            self._reader_slots.release()

    def _take_reader(self) -> sqlite3.Connection:
        with self._pool_lock:
            self._check_open()
            if self._idle_readers:
                return self._idle_readers.pop()
        try:
            conn = _connect(self.path, read_only=True)  # outside the lock: opening reads the schema
        except sqlite3.Error as exc:  # "unable to open database file": deleted under the kernel?
            problem = self._identity_problem()
            if problem is not None:
                raise self._fail_stop(problem) from exc
            self._raise_fault(exc, _READ_FAILED)
            raise
        with self._pool_lock:
            if not self._closed:
                return conn
        conn.close()
        self._check_open()  # raises: closed while this one was being opened
        raise AssertionError("unreachable")

    def _return_reader(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if not self._closed:
                self._idle_readers.append(conn)
                return
        conn.close()  # the database was closed while this read ran

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the database {self.path} is closed")
        if self._failure is not None:
            raise StoreFailed(self._failure.message)

    # -- record sets (the interfaces a NATS backend implements too) -------------------------
    @cached_property
    def tasks(self):
        from .sqlite_tasks import SqliteTaskRecords

        return SqliteTaskRecords(self)

    @cached_property
    def reviews(self):
        from .sqlite_reviews import SqliteReviewRecords

        return SqliteReviewRecords(self)

    def close(self) -> None:
        self._refusals.close()  # (before the write lock: a probe in progress holds it)
        with self._write_lock:
            if self._closed:
                return
            with self._pool_lock:
                self._closed = True
                idle, self._idle_readers = self._idle_readers, []
            for conn in idle:
                conn.close()
            self._writer.close()
        self._release_lock()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_database(data_dir: str | os.PathLike, *, exclusive: bool = True, read_connections: int = 2,
                  group_max: int = GROUP_MAX, group_ms: float = GROUP_MS) -> Database:
    """Open (creating and migrating as needed) the database of ``data_dir``.

    ``exclusive=False`` skips the data-directory lock, for tools that only
    read while a kernel runs. ``group_max``/``group_ms`` bound a group commit
    (writes, and ms of work before it stops taking newcomers); ``group_max=1``
    commits (and fsyncs) every write on its own.
    """
    return Database(data_dir, exclusive=exclusive, read_connections=read_connections, group_max=group_max,
                    group_ms=group_ms)
