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
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from ..errors import FailedPrecondition
from .group_commit import GroupCommit
from .schema import MIGRATIONS, migrate

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock
    fcntl = None

DATABASE_FILE = "kernel.sqlite3"
LOCK_FILE = "kernel.lock"
BUSY_TIMEOUT_MS = 10_000  # another process (a read-only tool) holding a write lock
GROUP_MAX = 256  # writes per group commit
GROUP_MS = 5.0  # ms of work after which a group stops taking newcomers and commits


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
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
        self._group = GroupCommit(self._begin_group, self._end_group, group_max, group_ms)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DATABASE_FILE
        self._lock_file = self._take_lock() if exclusive else None
        self._write_lock = threading.Lock()
        self._synchronous = ""
        self._closed = False
        self._writer = None
        try:
            self._writer = _connect(self.path, read_only=False)
            self._writer.execute("PRAGMA journal_mode = WAL")
            self._set_synchronous("FULL")
            self._writer.execute("PRAGMA foreign_keys = ON")
            with self._write_lock:
                self.schema_version = migrate(self._writer, MIGRATIONS, str(self.path))
        except BaseException:
            if self._writer is not None:
                self._writer.close()
            self._release_lock()
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

    # -- the data-directory lock ----------------------------------------------------------
    def _take_lock(self):
        if fcntl is None:
            return None
        handle = open(self.data_dir / LOCK_FILE, "a+")
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
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

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
        return self._group.run(work, durable, after_commit)

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT); rolled back if the block raises.

        With ``durable`` the commit is fsynced before the block returns. The
        block runs on the caller's thread, so it cannot be queued for another
        thread to run: it waits for its turn and leads a group, whose commit
        also covers the ``transact`` writes queued meanwhile.
        """
        self._check_open()
        write, conn = self._group.begin_block(durable)
        try:
            yield conn
        except BaseException as exc:
            self._group.end_block(write, conn, exc)
            raise
        self._group.end_block(write, conn, None)
        write.outcome()  # the commit's own failure, if any

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
                yield self._writer
            return
        self._reader_slots.acquire()
        try:
            conn = self._take_reader()
            try:
                yield conn
            finally:
                self._return_reader(conn)
        finally:
            self._reader_slots.release()

    def _take_reader(self) -> sqlite3.Connection:
        with self._pool_lock:
            self._check_open()
            if self._idle_readers:
                return self._idle_readers.pop()
        conn = _connect(self.path, read_only=True)  # outside the lock: opening reads the schema
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
