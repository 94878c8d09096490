"""The kernel's environment running out (descriptors, memory, threads, disk) as a caller hears it: UNAVAILABLE.

An exception that is not a ``KernelError`` escaping a handler is a bug: INTERNAL with a request id and a traceback in
the log. An ``OSError`` saying the process has no descriptor left (EMFILE, past ``ulimit -n``), the system none
(ENFILE), no memory (ENOMEM, or Python's ``MemoryError``), no thread (``RuntimeError`` "can't start new thread") or no
room on a disk (ENOSPC, EDQUOT, EFBIG, EROFS, EIO) is no bug: the server's environment failed, and another try later
(or on another replica) may pass. A drill under
``ulimit -n 128`` with idle connections holding every descriptor: ResolveReview answered INTERNAL, quoting the audit
segment's path, with a traceback per call. ``environment_fault`` turns such an error into ``EnvironmentFault``
(UNAVAILABLE; a ``retry-after-ms`` hint where freeing the resource is a matter of seconds) whose message names the
fault in the OS's words and no file (a caller must not learn the server's layout), and logs one line per episode
(``log_budget.LogBudget``: at most one a minute for each errno) that names what ran out and what to do.

The audit writer and the SQLite store say their own disk faults (kernel/audit/writer.py, kernel/store/faults.py);
this is for every other place: a segment opened to read, a temporary file, a model's files.
"""

from __future__ import annotations

import errno
import logging
import os

from .errors import KernelError, Unavailable
from .observability.log_budget import LogBudget, not_logged

log = logging.getLogger("aios.os")

RETRY_AFTER_MS = 1000  # descriptors and memory come back as connections and calls end; disk space as it is freed

# errno -> (what ran out, for the caller and the log; what an operator does; whether a retry soon may pass)
_FAULTS: dict[int, tuple[str, str, bool]] = {
    errno.EMFILE: ("the kernel's process ran out of file descriptors",
                   "raise its open-file limit (ulimit -n, LimitNOFILE= in its systemd unit, docker --ulimit nofile=) "
                   "or close idle client connections", True),
    errno.ENFILE: ("the system ran out of file descriptors",
                   "raise the system's limit (sysctl fs.file-max) or stop what holds them", True),
    errno.ENOMEM: ("the kernel's process ran out of memory",
                   "free memory on the host or give the kernel more (its cgroup's memory.max, fewer models loaded)",
                   True),
    errno.ENOSPC: ("a disk the kernel writes is full", "free space on the data dir's disk (and /tmp's)", True),
    errno.EDQUOT: ("the kernel's user is over its disk quota", "raise the quota or free space", True),
    errno.EFBIG: ("a file reached the file-size limit the kernel runs under",
                  "lift it (ulimit -f, LimitFSIZE= in its systemd unit)", False),
    errno.EROFS: ("a file system the kernel writes is read-only",
                  "remount it read-write (it went read-only: check dmesg for why)", False),
    errno.EIO: ("a disk the kernel reads or writes failed (I/O error)", "check the disk (dmesg) and its free space",
                False),
    # (Not an OSError's EAGAIN, which is no fault of the environment: Python's RuntimeError "can't start new
    # thread", pthread_create's EAGAIN at the limit on threads; a stream's call starts one.)
    errno.EAGAIN: ("the kernel's process could not start a thread",
                   "raise its limit on threads (ulimit -u, TasksMax= in its systemd unit, the container's pids limit) "
                   "or free memory", True),
}
_MEMORY = errno.ENOMEM  # a MemoryError is told as ENOMEM
_THREADS = errno.EAGAIN  # and a thread that could not be started as EAGAIN
_NO_THREAD = "can't start new thread"  # (CPython's words, _thread.start_new_thread)

_budgets = {code: LogBudget(lines=1, every_s=60.0) for code in _FAULTS}


class EnvironmentFault(Unavailable):
    """The server's environment failed a call (``environment_fault``). Not "not decided": where the call was
    a Decide, its record may be on the log already, so only a request with an idempotency key is sent again."""

    def __init__(self, message: str, errno_: int, retry_ms: int | None):
        super().__init__(message, trailers=(("retry-after-ms", str(retry_ms)),) if retry_ms is not None else ())
        self.errno = errno_


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, MemoryError):
        return _MEMORY
    if isinstance(exc, OSError) and exc.errno in _FAULTS and exc.errno != _THREADS:
        return exc.errno
    if type(exc) is RuntimeError and str(exc) == _NO_THREAD:
        return _THREADS
    return None


def environment_fault(exc: BaseException, where: str) -> EnvironmentFault | None:
    """``exc`` as the caller hears it when it says the environment ran out (see above), else None. ``where`` (an RPC,
    "a task's step") names the place in the log line, said once per episode."""
    if isinstance(exc, KernelError):
        return exc if isinstance(exc, EnvironmentFault) else None
    code = _errno_of(exc)
    if code is None:
        return None
    what, to_do, passes = _FAULTS[code]
    words = f"{errno.errorcode[code]}: {_strerror(exc, code)}"
    skipped = _budgets[code].take()
    if skipped is not None:
        log.error("%s (%s) in %s: calls that meet it are answered UNAVAILABLE while it lasts (this line at most "
                  "once a minute); %s%s", what, words, where, to_do, not_logged(skipped))
    retry_ms = RETRY_AFTER_MS if passes else None
    hint = f"; retry after {retry_ms} ms" if retry_ms is not None else ""
    return EnvironmentFault(f"{what} ({words}){hint}", code, retry_ms)


def _strerror(exc: BaseException, code: int) -> str:
    # An OSError's own words without its file names (str(exc) quotes them); a MemoryError has none.
    strerror = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
    return strerror if isinstance(strerror, str) and strerror else os.strerror(code)


def answerable(exc: BaseException, where: str) -> BaseException:
    """``exc``, or the ``EnvironmentFault`` it stands for: what the points that answer a caller (a status, a
    stream's error answer, a task's failure reason) look at before they treat it as a bug."""
    return environment_fault(exc, where) or exc
