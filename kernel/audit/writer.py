"""``AuditLog``: the chained, checkpointed, group-committed audit log of one kernel.

Callers append records and wait on tickets; one writer thread does the rest
(or, with ``append_many(..., write_here=True)``, a caller that is about to wait
writes its group itself while no other group is being written)::

    caller:  append(record) -> Ticket      (sequence taken under a lock, record queued)
    writer:  take a group from the queue   (up to group_max records or group_ms of work)
             chain + serialize + hash each record, frame it, one pwrite() per group
             over the segment's preallocated zeros (zero-filling the next chunk when
             less than half a chunk is left: see segments.SegmentFile)
             fsync (mode "fsync") -> publish the durable size -> release the group's waiters
             every checkpoint_records records or checkpoint_ms: sign a checkpoint
    caller:  ticket.wait() -> (sequence, hash)

Modes: ``fsync`` (the default) acknowledges a record only once it is on disk.
``async`` acknowledges once the record is written to the operating system:
a crash of the kernel process loses nothing, but a power failure or an OS
crash can lose the records acknowledged since the last checkpoint (the
segment is fsynced before every checkpoint, so at most ``checkpoint_records``
records or ``checkpoint_ms`` of them).

After any write or fsync error the log stops taking records (fail-stop): every
waiting and later caller gets ``AuditError``; reopening repairs the tail. So it
does when its files are removed or replaced under it (``rm -rf data/audit``):
writes to a deleted file succeed, and would acknowledge records that vanish
when the kernel stops. The writer checks that its directory, segment and
checkpoint file are still the ones at their paths (``_check_files``) at most
once every ``FILES_CHECK_NS`` before a group (one integer compare per group
otherwise), at every checkpoint and at close, and once an interval while idle.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2
from ..errors import NOT_DECIDED, InvalidArgument, ResourceExhausted
from ..observability.histogram import DurationHistogram
from ..threads import name_native_thread
from . import checkpoints as cps
from . import merkle
from .errors import AuditArchived, AuditError, AuditFilesGone, AuditTimeout
from .keys import PUBLIC_KEYS_DIR, load_or_create, publish_public_key
from .reader import RecordFilter, iter_log, iter_log_batches, read_leaf_hashes
from .recovery import INDEX_MASK, check_against, keep_torn_tail, lock_directory, recover
from .record import HASH_TRAILER, RecordWithTail
from .segments import MAGIC, PREALLOCATE_BYTES, SegmentFile, crc32, fsync_dir, pack_header, segment_name
from .watermark import Watermark

log = logging.getLogger("aios.audit")

MODES = ("fsync", "async")
FIRST_SEQUENCE_TRAILER = "aios-first-sequence"  # on a refusal for archived records: where this log begins
DEFAULT_KEY_FILE = "signing-key.pem"  # inside the log directory unless key_path says otherwise
# At most this often the writer stats its files (five calls, 12-20 µs on the development VM, where one
# stat takes ~3 µs: ~0.01 % of a core at this rate): a group that starts later than this after the last
# check checks first, and an idle writer wakes to check. Records acknowledged between a deletion and the
# next check (at most this long) are lost with the deleted files; checking every group would cost more than
# preallocation saves per fsync.
FILES_CHECK_NS = 250_000_000

_AuditRecord = kernel_pb2.AuditRecord
_monotonic_ns = time.monotonic_ns
_time_ns = time.time_ns


class Ticket:
    """A record taken by the log; ``wait`` returns once it is durable."""

    __slots__ = ("_log", "sequence")

    def __init__(self, audit_log: "AuditLog", sequence: int):
        self._log = audit_log
        self.sequence = sequence

    def wait(self, timeout_s: float | None = None) -> tuple[int, bytes]:
        """(sequence, hash) once durable (fsync mode) or written (async mode).

        Raises ``AuditTimeout`` after ``timeout_s`` seconds, ``AuditError`` if the writer failed.
        """
        return self._log._wait(self.sequence, timeout_s)


class AuditLog:
    """An open log directory: append, wait, read back, prove, checkpoint.

    Use ``AuditLog.open(...)``; close it (or use ``with``) to flush, sign a final
    checkpoint and stop the writer thread.
    """

    def __init__(self, directory: Path, mode: str, key, checkpoint_records: int, checkpoint_ms: float,
                 segment_bytes: int, group_max: int, group_ms: float, max_pending: int, preallocate_bytes: int,
                 sign_adopted: bool = True):
        self.directory = directory
        self.mode = mode
        self._key = key
        self._checkpoint_records = checkpoint_records
        self._checkpoint_ns = int(checkpoint_ms * 1e6)
        self._segment_bytes = segment_bytes
        self._preallocate_bytes = preallocate_bytes
        self._group_max = group_max
        self._group_ns = int(group_ms * 1e6)
        self._max_pending = max_pending
        # Called once, with the error, when the log fail-stops (the server turns health NOT_SERVING).
        self.failure_listeners: list = []

        # What this open found and repaired (see ``recovery``).
        self._recovery: dict = {"adopted": None, "adopted_last_hash": "", "cuts": [], "previous_key_id": ""}
        self._lock_fd = lock_directory(directory)
        # The folder, held open while the log is: a rotation makes its new segment's name durable by fsyncing it,
        # and opening it then took a descriptor beyond the one the full segment freed; with every other one taken
        # by client connections (a flood of idle ones) that was EMFILE, and the log fail-stopped until a restart.
        try:
            self._dir_fd = os.open(directory, os.O_RDONLY)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._next_check_ns = 0  # monotonic time of the next _check_files before a group (0: the first group)
        try:
            # The directory as opened: one removed and made anew under the same name is not the log's any more.
            found = os.stat(directory)
            self._directory_id = (found.st_ino, found.st_dev)
            cuts = self._open_files(directory, key)
            size = self._tree.size
            self._written = size  # next sequence the writer assigns
            self._watermark = Watermark(size)  # records durable (written, in async mode): what readers see
            self._next = size  # next sequence append() hands out
            self._queue: deque = deque()
            self._append_lock = threading.Lock()
            self._commit_lock = threading.Lock()  # held while a group (or a checkpoint) is written
            self._work = threading.Event()
            self._sleeping = False  # the writer waits on _work: an append must set it
            self._closing = False
            self._failure: AuditError | None = None
            self._groups = 0  # groups committed by this process (one write and, in fsync mode, one fsync each)
            self._checkpoints_signed = 0
            self._slowest_sync_ns = 0  # the longest group fsync so far: disk stalls show here
            self.sync_times = DurationHistogram()  # every group fsync (the metrics endpoint's histogram)
            self._last_checkpoint_ns = _monotonic_ns()
            latest = self._checkpoints.latest
            signed = latest.tree_size if latest is not None else 0
            # A signed head from the start, so there always is one; and records a crash left unsigned are
            # signed now (check_against vouched for the signed ones), not a checkpoint interval later.
            # Unless the caller will record the adoption first (sign_adopted=False, then ``adoption_recorded``):
            # a start refused before its record would otherwise have signed the tail with nothing saying so,
            # and `audit verify --strict`, which fails on such a tail, would pass (upgrade audit).
            self._signing_held = signed != size and not sign_adopted
            if signed != size:
                self._warn_adopted(signed, size)
            # A log that ends signed (a clean stop) is signed again now, its size under a new time: an "opened"
            # checkpoint. Records after a clean stop that no such checkpoint precedes were added while no kernel
            # holding the key had the log open, and `audit verify --strict` fails on them even once a start adopted
            # and signed them (a helper's audit: a decision appended to a stopped kernel's log, then a restart,
            # passed --strict --from-key with only a note calling the stop unclean).
            if latest is None or (signed != size and sign_adopted) or signed == size:
                self._write_checkpoint(self._last_checkpoint_ns)
            if signed != size or cuts:  # the last process stopped without closing the log: say what was found
                log.info("audit: opened %s after an unclean stop: %d records; the last signed checkpoint covered %d, "
                         "the %d after it are signed now%s", directory, size, signed, size - signed,
                         "".join(f"; {cut}" for cut in cuts))
        except BaseException:
            for closable in (getattr(self, "_checkpoints", None), getattr(self, "_segment", None)):
                if closable is not None:
                    closable.close()
            os.close(self._dir_fd)
            os.close(self._lock_fd)
            raise
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _warn_adopted(self, signed: int, size: int) -> None:
        """Records past the last checkpoint are about to be signed: say which, and what put them there.

        A kernel that stops cleanly signs every record it wrote, so only a crash leaves such a tail, or
        someone who can write the directory but has no key (``audit verify --strict`` fails on it).
        """
        self._recovery["adopted"] = [signed, size - 1]
        self._recovery["adopted_last_hash"] = self._last_hash.hex()
        log.warning(
            "audit: adopting records %d..%d of %s (the last one's hash %s): no signed checkpoint covered them. "
            "A crash of the kernel that wrote them leaves such a tail, a clean stop never does; if it stopped "
            "cleanly they were added by someone without the key: check them with `aios-kernel audit export %s "
            "--from %d`. They are signed now", signed, size - 1, self.directory, self._last_hash.hex()[:16],
            self.directory, signed)

    def _warn_key_change(self, found: list, key) -> None:
        """A rotation: the checkpoints so far were signed by another key (kept under public-keys/)."""
        previous = found[-1].key_id
        self._recovery["previous_key_id"] = previous
        kept = (self.directory / PUBLIC_KEYS_DIR / f"{previous}.pem").exists()
        log.warning(
            "audit: checkpoints up to tree size %d of %s were signed by key %s; signing with %s from now on. %s",
            found[-1].tree_size, self.directory, previous, key.key_id,
            f"Its public key is kept in {PUBLIC_KEYS_DIR}/{previous}.pem; an auditor verifies with both keys "
            f"(--from-key OLD --from-key NEW)" if kept else
            f"Its public key is not in {PUBLIC_KEYS_DIR}/: keep a copy of it, or the checkpoints it signed "
            "cannot be verified")

    def _open_files(self, directory: Path, key) -> list[str]:
        """Recover the files' state, check it against the last checkpoint, open the files for appending.

        Nothing on disk changes until every check passed; then torn tails are cut (their bytes kept).
        Returns what was cut, for the summary ``__init__`` logs.
        """
        state = recover(directory)
        self._tree = state.tree
        self._segments = state.segments  # appended by the writer; read by readers
        self._index = state.index
        self._last_hash = state.last_hash
        self.base = state.base  # records before base.tree_size were archived (None: nothing was)
        self.dropped_bytes = state.dropped_bytes  # torn tail cut by this open
        found, end, problem = cps.scan(directory)
        check_against(state, found, directory, key)
        cuts = []
        self._checkpoints, cut = cps.CheckpointFile.open(directory, found, end, problem)
        if cut:
            cuts.append(cut)
        publish_public_key(directory, key)  # (first: it keeps the previous key, which the warning names)
        if found and found[-1].key_id != key.key_id:
            self._warn_key_change(found, key)
        if state.unfinished is not None:
            log.warning("audit: %s was cut short while being created: removed it (%d bytes)", state.unfinished.name,
                        state.dropped_bytes)
            state.unfinished.unlink()
        if state.tail_torn:
            kept = keep_torn_tail(state)
            cuts.append(f"cut a torn tail of {state.dropped_bytes} bytes from {state.segments[-1][1].name} "
                        f"after record {state.tree.size - 1} (kept in {kept.name})")
        elif state.unfinished is not None:
            cuts.append(f"removed {state.unfinished.name} ({state.dropped_bytes} bytes), cut short while being created")
        self._recovery["cuts"] = list(cuts)
        if state.segments:
            self._segment = SegmentFile.reopen(state.segments[-1][1], state.tail_size, state.tail_torn,
                                               self._preallocate_bytes, self._segment_bytes)
        else:  # a new log, or one whose every segment was archived
            self._segment = self._new_segment(self._tree.size)
        if state.leftovers:
            log.warning("audit: %d segment(s) of %s hold only archived records (%s) and were not read: an archive "
                        "stopped before removing them; `aios-kernel audit archive %s NEW_FOLDER --before 0` (with the "
                        "kernel stopped) removes them", len(state.leftovers), directory, state.base.describe(),
                        directory)
        # From here on the tree keeps only the newest leaves in memory and reads older ones back from the segments
        # (all leaves are durable records: a group's leaves join the tree after its write).
        self._tree.keep_recent(lambda start, count: read_leaf_hashes(self, start, count), merkle.KEEP_LEAVES)
        return cuts

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | Path, mode: str = "fsync", key_path: str | Path | None = None,
             checkpoint_records: int = 1000, checkpoint_ms: float = 1000, segment_bytes: int = 64 << 20,
             group_max: int = 4096, group_ms: float = 1.0, max_pending: int = 1 << 20,
             preallocate_bytes: int = PREALLOCATE_BYTES, sign_adopted: bool = True) -> "AuditLog":
        """Open (or create) the log in ``directory``, repairing a torn tail, and start its writer.

        ``key_path``: the Ed25519 signing key (created if absent; default ``directory/signing-key.pem``).
        ``group_max``/``group_ms``: a group is fsynced once it holds ``group_max`` records or its
        records took ``group_ms`` to prepare, whichever comes first (and at once when the queue is
        empty: waiting for company never delays a lone record). ``max_pending``: records appended
        but not yet durable beyond which ``append`` answers RESOURCE_EXHAUSTED.
        ``preallocate_bytes``: zeros written (and synced) ahead of the records at a time, so a
        group's fdatasync needs no file-size change (see ``segments``); 0 appends instead.
        ``sign_adopted``: sign records no checkpoint covered (a crash's tail, ``recovery["adopted"]``) at once;
        False = sign nothing until ``adoption_recorded()`` (the kernel calls it once its start record, which
        names the adopted range, is durable): a start refused before that leaves the tail unsigned, as found.
        """
        if mode not in MODES:
            raise InvalidArgument(f"audit mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, value, low in (("checkpoint_records", checkpoint_records, 1), ("segment_bytes", segment_bytes, 4096),
                                 ("group_max", group_max, 1), ("max_pending", max_pending, 1),
                                 ("preallocate_bytes", preallocate_bytes, 0)):
            if value < low:
                raise InvalidArgument(f"audit {name} must be >= {low}, got {value}")
        for name, value in (("checkpoint_ms", checkpoint_ms), ("group_ms", group_ms)):
            if value < 0:
                raise InvalidArgument(f"audit {name} must be >= 0, got {value}")
        directory = Path(directory)
        # Owner only, whatever the data dir's mode (one made before the kernel is often 0755: the start warns), as
        # `aios-kernel backup` makes a copy's: every decision's inputs are in here.
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The key ids that signed so far: a default key missing under them is lost, not to be made anew.
        key = load_or_create(key_path if key_path is not None else directory / DEFAULT_KEY_FILE,
                             lambda: [checkpoint.key_id for checkpoint in cps.read_all(directory)[0]])
        return cls(directory, mode, key, checkpoint_records, checkpoint_ms, segment_bytes, group_max, group_ms,
                   max_pending, preallocate_bytes, sign_adopted)

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ appending
    @property
    def size(self) -> int:
        """Records durable so far (written, in async mode); sequences 0..size-1."""
        return self._watermark.value

    def append(self, record: _AuditRecord) -> Ticket:
        """Queue ``record`` (everything set but sequence, prev_hash and hash) and return at once.

        The log owns the record from here: the writer sets ``sequence``, ``prev_hash``,
        ``hash`` and, when it is 0, ``time_unix_ns``. Do not change it before ``wait`` returns.
        """
        return self.append_many((record,))[0]

    def append_many(self, records, write_here: bool = False) -> list[Ticket]:
        """``append`` for several records at once: they reach the writer together (one group, one fsync).

        ``write_here``: a caller that is going to wait for the records anyway
        writes (and fsyncs) them on its own thread when no other group is
        being written, instead of waking the writer thread and being woken by
        it: two thread switches less per group. Otherwise, as without it.
        A record may come as a ``RecordWithTail`` (its last fields already encoded).
        """
        for record in records:
            if type(record) is not _AuditRecord and not (type(record) is RecordWithTail
                                                         and type(record.record) is _AuditRecord):
                raise InvalidArgument(f"audit records are AuditRecord messages, not {type(record).__name__}")
            if not record.kind:
                raise InvalidArgument("record.kind must be set (DECISION, REVIEW_RESOLUTION, ...)")
        with self._append_lock:
            if self._failure is not None:
                raise AuditError(f"the audit log failed and takes no more records: {self._failure.message}")
            if self._closing:
                raise AuditError("the audit log is closed")
            first = self._next
            if first + len(records) - 1 - self._watermark.value >= self._max_pending:
                behind = first - self._watermark.value
                retry_ms = max(10, min(1000, behind // 10))  # (the writer clears ~10 records a millisecond here)
                # Nothing of this call was recorded: it may be sent again (a review of the clients' retry rule:
                # without a hint they no longer send a RESOURCE_EXHAUSTED again, and this one had none).
                raise ResourceExhausted(
                    f"the audit writer is behind: {behind} records wait to be written; retry after {retry_ms} ms",
                    trailers=(("retry-after-ms", str(retry_ms)), *NOT_DECIDED),
                )
            self._next = first + len(records)
            self._queue.extend(records)
        if not (write_here and self._write_here()) and self._sleeping:
            self._work.set()
        return [Ticket(self, first + i) for i in range(len(records))]

    def _write_here(self) -> bool:
        """Commit the queue on this thread if nobody else is committing; False if it could not."""
        if not self._commit_lock.acquire(blocking=False):
            return False
        try:
            before = self._checkpoints.latest.tree_size == self._written
            while self._queue and self._failure is None and not self._watermark.stopped:
                self._commit_group()
            self._maybe_checkpoint()
        except BaseException as exc:
            self._fail(exc)
            self._work.set()  # the writer thread sees the failure and stops
            # These records' callers hear what later ones hear: that it was the audit log, and that it stopped.
            raise AuditError(f"the audit log failed and takes no more records: {self._failure.message}") from exc
        finally:
            self._commit_lock.release()
        if before and self._checkpoints.latest.tree_size != self._written:
            self._work.set()  # the first records past the signed head: the writer arms its checkpoint timer
        return True

    def append_and_wait(self, record: _AuditRecord, timeout_s: float | None = None) -> tuple[int, bytes]:
        return self.append(record).wait(timeout_s)

    def _wait(self, sequence: int, timeout_s: float | None) -> tuple[int, bytes]:
        if sequence < self._watermark.value or self._watermark.wait_for(sequence, timeout_s):
            return sequence, self._tree.leaf(sequence)
        if self._failure is not None:
            raise AuditError(f"audit record {sequence} was not written: {self._failure.message}")
        if self._watermark.stopped:
            raise AuditError(f"audit record {sequence} was not written: the log closed")
        timeout = AuditTimeout(f"audit record {sequence} was not durable within {timeout_s} s")
        timeout.sequence = sequence  # (taken all the same: it is written once the disk lets it, or the log fails)
        raise timeout

    def wait_durable(self, sequence: int, timeout_s: float | None = None) -> tuple[int, bytes]:
        """``Ticket.wait`` for record ``sequence``, taken earlier (an ``AuditTimeout``'s)."""
        return self._wait(sequence, timeout_s)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        name_native_thread()
        try:
            self._loop()
            if self._failure is None:
                with self._commit_lock:
                    self._finish()
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._watermark.stop()
            os.close(self._dir_fd)
            os.close(self._lock_fd)  # another process may open the directory now

    def _fail(self, exc: BaseException) -> None:
        """Fail-stop: nobody may be told a record is durable now."""
        if isinstance(exc, AuditFilesGone):  # found by a check, not a bug or an I/O error: its message says it all
            log.error("audit: %s", exc.message)
        elif isinstance(exc, OSError) and exc.errno in _DISK_REFUSALS:
            # The disk's answer (full, a file-size limit, an I/O error): an operator's fault to fix, not a bug, so
            # one line saying what and what to do, without the writer's traceback (an incident drill's ulimit -f).
            # Any other errno (EBADF, EINVAL) points at a bug: its traceback below.
            kept = ("the records answered before are on disk" if self.mode == "fsync" else
                    "the records answered before were written to the OS; those since the last checkpoint are not "
                    "fsynced")
            log.error("audit: writing %s failed: %s; the log takes no more records: decisions answer UNAVAILABLE and "
                      "health is NOT_SERVING. %s, then restart the kernel (%s; `aios-kernel audit verify %s` checks "
                      "the log)", self.directory, _os_error(exc), _what_to_do(exc), kept, self.directory)
        else:
            log.exception("audit: writing failed; the log takes no more records")
        with self._append_lock:
            first = self._failure is None
            if first:
                # What callers are told (the log line above has the paths): an OSError's words without its file
                # name, so a refused Decide does not show the data dir's layout to whoever sent it.
                reason = (exc.summary if isinstance(exc, AuditFilesGone) else
                          _os_error(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
                self._failure = AuditError(reason)
        self._close_files(quietly=True)
        self._watermark.stop()
        for listener in self.failure_listeners if first else ():
            try:
                listener(self._failure)
            except Exception:
                log.exception("audit: a failure listener failed")

    def _loop(self) -> None:
        queue = self._queue
        commit_lock = self._commit_lock
        while self._failure is None:
            if not queue:
                self._sleeping = True
                if not queue and not self._closing:
                    self._work.wait(self._idle_timeout())
                self._sleeping = False
                self._work.clear()
                if not queue:
                    if self._closing:
                        return
                    with commit_lock:
                        if self._failure is None:
                            self._maybe_checkpoint()
                            self._maybe_check_files()  # (an idle kernel turns NOT_SERVING too, not its next caller)
                    continue
            with commit_lock:  # (a caller may be writing its own group: see append_many's write_here)
                if queue and self._failure is None:
                    self._commit_group()
                if self._failure is None:
                    self._maybe_checkpoint()

    def _idle_timeout(self) -> float:
        """Seconds until the next file check, or the next checkpoint when that comes first."""
        now = _monotonic_ns()
        due = self._next_check_ns - now
        if self._checkpoints.latest.tree_size != self._written and not self._signing_held:  # records wait for one
            due = min(due, self._last_checkpoint_ns + self._checkpoint_ns - now)
        return max(due, 0) / 1e9

    def _maybe_check_files(self) -> None:
        now = _monotonic_ns()
        if now >= self._next_check_ns:
            self._check_files(now)

    def _check_files(self, now_ns: int) -> None:
        """Raise ``AuditFilesGone`` (the caller fail-stops) if the directory, the segment being written or the
        checkpoint file is no longer the one at its path: removed, renamed away or replaced."""
        self._next_check_ns = now_ns + FILES_CHECK_NS
        problem = self._directory_gone() or self._segment.gone() or self._checkpoints.file.gone()
        if problem is None:
            return
        directory = self.directory
        raise AuditFilesGone(
            f"the audit log {directory} was removed or replaced while this kernel was writing it: {problem}. "
            f"Records written on would be lost when the kernel stops, so the log takes no more records: decisions "
            f"answer UNAVAILABLE and health is NOT_SERVING. Put the log back at {directory} (move it back, or "
            f"restore it from a backup; `aios-kernel audit verify {directory}` checks it), then restart the kernel. "
            f"If it was deleted, the records acknowledged in the second before this check were only in the "
            f"deleted files",
            "its files were removed or replaced under the running kernel (the kernel's log names them)")

    def _directory_gone(self) -> str | None:
        try:
            there = os.stat(self.directory)
        except OSError as exc:
            return f"the directory is no longer there ({exc.strerror})"
        if (there.st_ino, there.st_dev) != self._directory_id:
            return "the directory was replaced by another one"
        return None

    def _commit_group(self) -> None:
        now = _monotonic_ns()
        if now >= self._next_check_ns:  # before anything is written: a check that fails acknowledges nothing
            self._check_files(now)
        deadline = now + self._group_ns
        segment_bytes = self._segment_bytes
        index = self._index
        segment = self._segment
        first_segments, first_size = len(self._segments), segment.size
        try:
            self._write_group(deadline, segment_bytes, index, segment)
        except BaseException:  # (an I/O error, or a bug after a rotation: the log fail-stops either way)
            # The group's callers are told it failed (fail-stop, _fail): its records must not stay in the files for
            # the next start to adopt (a crash audit: a refused decision came back signed, with a review opened).
            self._erase_group(segment, first_segments, first_size)
            raise

    def _erase_group(self, segment: SegmentFile, segments: int, size: int) -> None:
        """Undo a failed group's writes, best effort: segments it created go, the one it began in is cut back to
        ``size`` (a rotation is the likeliest place for a full disk to strike: a new segment's zeros)."""
        created = self._segments[segments:]
        for _first, path in created:
            if self._segment.path == path:
                self._segment.close()
            try:
                path.unlink()
            except OSError:
                pass
        del self._segments[segments:]
        if created:
            try:
                os.fsync(self._dir_fd)  # (the removals durable: a power cut must not bring a segment back)
            except OSError:
                pass
        if segment.fd >= 0:
            segment.erase_from(size)
            return
        try:  # (closed by the rotation, after a sync: cut through its path)
            os.truncate(segment.path, size)
            fsync_dir(segment.path)
        except OSError as exc:
            log.error("audit: %s: could not cut the failed group's records back off (%s); the next start may "
                      "adopt them", segment.path.name, exc.strerror or exc)

    def _write_group(self, deadline: int, segment_bytes: int, index, segment: SegmentFile) -> None:
        queue = self._queue
        popleft = queue.popleft
        group_max = self._group_max
        buffer = bytearray()
        leaves = bytearray()
        sequence = self._written
        previous = self._last_hash
        count = 0
        while queue and count < group_max:
            record = popleft()
            if type(record) is RecordWithTail:
                tail, record = record.tail, record.record
            else:
                tail = b""
            record.sequence = sequence
            record.prev_hash = previous
            record.hash = b""
            if not record.time_unix_ns:
                record.time_unix_ns = _time_ns()
            canonical = record.SerializeToString(deterministic=True)
            if tail:
                canonical += tail
            digest = sha256(b"\x00" + canonical).digest()
            record.hash = digest
            payload = canonical + HASH_TRAILER + digest
            if segment.size + len(buffer) + len(payload) + 8 > segment_bytes and segment.size + len(buffer) > len(MAGIC):
                segment.write(buffer)
                buffer = bytearray()
                segment = self._rotate(segment, sequence)
            if not sequence & INDEX_MASK:
                index.append((sequence, len(self._segments) - 1, segment.size + len(buffer)))
            buffer += pack_header(len(payload), crc32(payload))
            buffer += payload
            leaves += digest
            previous = digest
            sequence += 1
            count += 1
            if not count & 63 and _monotonic_ns() >= deadline:
                break
        segment.write(buffer)
        if self.mode == "fsync":
            started = _monotonic_ns()
            segment.sync()
            took = _monotonic_ns() - started
            self._slowest_sync_ns = max(self._slowest_sync_ns, took)
            self.sync_times.observe(took)
        self._tree.append_leaves(leaves)
        self._last_hash = previous
        self._written = sequence
        self._groups += 1
        self._watermark.publish(sequence)
        # (The Merkle tree's subtree cache fills when a root or proof is asked for — each checkpoint,
        # or an auditor — not after every group: per group it cost ~3.6 µs per decision.)

    def _new_segment(self, first_sequence: int) -> SegmentFile:
        segment = SegmentFile.create(self.directory / segment_name(first_sequence), MAGIC, self._preallocate_bytes,
                                     self._segment_bytes, dir_fd=self._dir_fd)
        self._segments.append((first_sequence, segment.path))
        return segment

    def _rotate(self, full: SegmentFile, first_sequence: int) -> SegmentFile:
        full.sync()  # whatever the mode: only the last segment may ever have a torn tail
        full.close()
        self._segment = self._new_segment(first_sequence)
        return self._segment

    def adoption_recorded(self) -> None:
        """The records a crash left unsigned may be signed now: a durable record names them (see ``open``)."""
        self._signing_held = False
        self._work.set()  # the writer signs at its next look (the checkpoint interval has long passed)

    def _maybe_checkpoint(self) -> None:
        pending = self._written - self._checkpoints.latest.tree_size
        if pending <= 0 or self._signing_held:
            return
        now = _monotonic_ns()
        if pending >= self._checkpoint_records or now - self._last_checkpoint_ns >= self._checkpoint_ns:
            self._write_checkpoint(now)

    def _write_checkpoint(self, now_ns: int) -> None:
        self._check_files(now_ns)  # never sign into a file nobody will read again (~15 µs, once per 1000 records)
        if self.mode != "fsync":
            self._segment.sync()  # a checkpoint must never cover a record that could still be lost
        size = self._written
        checkpoint = cps.sign(self._key, size, self._tree.root(size))
        self._checkpoints.append(checkpoint)
        self._checkpoints.sync()
        self._last_checkpoint_ns = now_ns
        self._checkpoints_signed += 1

    def _finish(self) -> None:
        self._check_files(_monotonic_ns())  # a log removed while idle is said at the stop, not only at the next start
        if self._checkpoints.latest.tree_size != self._written and not self._signing_held:
            self._write_checkpoint(_monotonic_ns())
        self._segment.sync()
        self._close_files(quietly=False)

    def _close_files(self, quietly: bool) -> None:
        for closable in (self._segment, self._checkpoints):
            try:
                closable.close()
            except OSError:
                if not quietly:
                    raise

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is queued, sign a final checkpoint, stop the writer. Idempotent."""
        with self._append_lock:
            self._closing = True
        self._work.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AuditTimeout(f"the audit writer did not finish within {timeout_s} s")

    def stats(self) -> dict[str, int]:
        """Counters since this process opened the log (for metrics and benchmarks).

        ``groups``: groups committed (one write and, in fsync mode, one fsync each); ``pending``:
        appended but not yet durable; ``slowest_sync_ns``: the longest group fsync.
        """
        size = self._watermark.value
        return {"size": size, "groups": self._groups, "checkpoints": self._checkpoints_signed,
                "pending": self._next - size, "slowest_sync_ns": self._slowest_sync_ns}

    @property
    def closed(self) -> bool:
        return self._watermark.stopped

    @property
    def failure(self) -> AuditError | None:
        return self._failure

    # ------------------------------------------------------------------ reading and proving
    def read(self, from_sequence: int = 0, tenant: str | None = None, pipeline: str | None = None,
             kind: int | None = None, since_unix_ns: int | None = None, until_unix_ns: int | None = None,
             follow: bool = False, stop: threading.Event | Callable[[], bool] | None = None) -> Iterator[_AuditRecord]:
        """Records from ``from_sequence`` on that match every given filter, in sequence order.

        Only durable records are returned. With ``follow`` the iterator waits for new records
        until ``stop`` is set (an Event, or a callable returning True) or the log closes.
        """
        wanted = RecordFilter.of(tenant, pipeline, kind, since_unix_ns, until_unix_ns)
        self._refuse_archived(from_sequence, "from_sequence")
        return iter_log(self, from_sequence, wanted, follow, stop)

    def read_batches(self, from_sequence: int = 0, tenant: str | None = None, pipeline: str | None = None,
                     kind: int | None = None, since_unix_ns: int | None = None, until_unix_ns: int | None = None,
                     follow: bool = False, stop: threading.Event | Callable[[], bool] | None = None,
                     max_records: int = 256) -> Iterator[bytes]:
        """``read``'s records as serialized ``AuditRecordBatch`` messages of at most ``max_records`` each."""
        wanted = RecordFilter.of(tenant, pipeline, kind, since_unix_ns, until_unix_ns)
        self._refuse_archived(from_sequence, "from_sequence")
        return iter_log_batches(self, from_sequence, wanted, follow, stop, max_records)

    def _refuse_archived(self, sequence: int, what: str) -> None:
        """``AuditArchived`` when ``sequence`` is before this log's archive base (its records are gone from here)."""
        if self.base is not None and sequence < self.base.tree_size:
            first = self.base.tree_size
            raise AuditArchived(
                f"{what}: records 0..{first - 1} were archived from this log on "
                f"{time.strftime('%Y-%m-%d', time.gmtime(self.base.archived_unix_ns / 1e9))}; it serves records "
                f"from {first} on (the archive holds the rest, and verifies and exports on its own)",
                trailers=((FIRST_SEQUENCE_TRAILER, str(first)),))  # (a follower resumes from it without parsing)

    @property
    def first_sequence(self) -> int:
        """The first record this log holds: 0, or its archive base (records before it were archived)."""
        return self.base.tree_size if self.base is not None else 0

    @property
    def key_id(self) -> str:
        return self._key.key_id

    @property
    def recovery(self) -> dict:
        """What opening the log found, for the record a kernel writes at start (a copy, JSON-ready):
        ``adopted``: [first, last] sequence of records no checkpoint covered, signed at this open (None when
        there were none; only a crash or tampering leaves them), ``adopted_last_hash``: the last one's hash
        (hex), ``cuts``: torn tails cut (what was cut and where its bytes are kept), ``previous_key_id``: the
        key that signed the checkpoints before, when another key signs from now on ("" otherwise)."""
        return {**self._recovery, "cuts": list(self._recovery["cuts"])}

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key that signs checkpoints."""
        return self._key.public_raw

    def latest_checkpoint(self) -> cps.Checkpoint:
        """The newest signed checkpoint (one is signed when a log is created, so there always is one)."""
        return self._checkpoints.latest

    def leaf(self, sequence: int) -> bytes:
        """The hash of a durable record."""
        if not 0 <= sequence < self._watermark.value:
            raise IndexError(f"record {sequence} is not in the log (size {self._watermark.value})")
        self._refuse_archived(sequence, "sequence")
        return self._tree.leaf(sequence)

    def root(self, size: int) -> bytes:
        self._check_size(size)
        self._refuse_archived(size, "tree_size")
        return self._tree.root(size)

    def inclusion_proof(self, sequence: int, size: int) -> list[bytes]:
        self._check_size(size)
        self._refuse_archived(sequence, "sequence")
        return self._tree.inclusion_proof(sequence, size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        self._check_size(new_size)
        self._refuse_archived(old_size, "old_size")
        return self._tree.consistency_proof(old_size, new_size)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._watermark.value:
            raise ValueError(f"tree size {size} is beyond the {self._watermark.value} durable records")

    # Used by the reader: wait for record ``sequence`` to become readable.
    def _await_record(self, sequence: int, timeout_s: float) -> bool:
        return self._watermark.wait_for(sequence, timeout_s)


# What a disk answers for a write it will not take: the operator's to fix (one line), not a bug (a traceback).
_DISK_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.EIO})


def _os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    return f"{exc.strerror or exc} ({name})" if name else f"{type(exc).__name__}: {exc}"


def _what_to_do(exc: OSError) -> str:
    """What an operator does about a write the disk refused."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return "Free space on the data dir's disk (or raise its quota)"
    if exc.errno == errno.EFBIG:
        return ("Lift the file-size limit the kernel runs under (`ulimit -f`, LimitFSIZE in its systemd unit), or "
                "lower audit_segment_bytes below it")
    if exc.errno == errno.EROFS:
        return "Remount the data dir's file system read-write (it went read-only: check dmesg for why)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "Make the data dir writable by the kernel's user"
    return "Check the disk (dmesg) and its free space"
