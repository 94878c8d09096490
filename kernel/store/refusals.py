"""While the store refuses writes for a reason that may pass: refuse the next ones at once, probe, recover alone.

A write refused with ``StoreBusy`` (another process holding the write lock
for the whole busy timeout, a full disk, an I/O error) puts the store in the
*refusing* state. Until it passes:

- every new write is refused at once with ``StoreBusy`` (UNAVAILABLE,
  ``retry-after-ms``), without trying: under a lock held elsewhere each try
  waited the 10 s busy timeout, one after the other, and a drill's Decide
  load (8 callers with keys) got no answer at all for the whole 25 s the lock
  was held, with health SERVING;
- one thread of its own tries a small real write every ``PROBE_S``; the first
  that commits (or any other write that commits) ends the state;
- ``listeners`` hear ``cause`` when it starts and ``None`` when it ends (the
  latter on the probing thread, outside any transaction, so a listener may
  write: the server flips health, the decision side stores what it kept in
  memory meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..threads import name_native_thread
from .faults import RETRY_AFTER_MS

log = logging.getLogger("aios.store")

PROBE_S = RETRY_AFTER_MS / 1000  # between probes: the retry hint callers get, so a caller's retry finds it over


class WriteRefusals:
    """The refusing state of one database (see the module docstring); ``probe()`` makes one real write."""

    def __init__(self, probe: Callable[[], None], probe_s: float = PROBE_S):
        self._probe = probe
        self._probe_s = probe_s
        self._lock = threading.Lock()
        self.cause: str | None = None  # why writes are refused now; None while the store takes them
        self.since_ns = 0  # when the state began (monotonic)
        self.listeners: list[Callable[[str | None], None]] = []
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._refused = 0  # refusals so far: a probe ends the state only if none came since it began
        self.probes = 0  # probes tried (stats, tests)

    @property
    def refusing(self) -> bool:
        return self.cause is not None

    def refused(self, cause: str) -> None:
        """A write was refused for ``cause``: enter the state (or keep it, with the newest cause)."""
        with self._lock:
            first = self.cause is None
            self.cause = cause
            self._refused += 1
            if not first or self._closing.is_set():
                return
            self.since_ns = time.monotonic_ns()
            # (A probe thread that saw the state end and has not yet left goes on probing instead: it finds the
            # cause set under this lock. A second thread beside it told "takes writes again" twice.)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aios-store-probe", daemon=True)
                self._thread.start()
        log.warning("store: refusing writes until it takes them again (probed every %.3g s): %s", self._probe_s,
                    cause)
        self._tell(cause)

    def passed(self) -> None:
        """A write committed: the store takes writes (the probing thread tells the listeners)."""
        if self.cause is not None:
            with self._lock:
                self.cause = None

    def _run(self) -> None:
        name_native_thread()
        while not self._closing.wait(self._probe_s):
            if self.cause is not None:
                self.probes += 1
                before = self._refused
                try:
                    self._probe()  # (a refusal calls refused() again: the state stays, with its newest cause)
                except Exception:
                    continue
                with self._lock:
                    # Only if no write was refused since the probe began: one refused after its commit (which ended
                    # the state already, through ``passed``) began the state anew, and ending it here let new writes
                    # through and turned health SERVING while the lock was held again.
                    if self._refused == before:
                        self.cause = None
            with self._lock:
                if self.cause is not None:
                    continue
                self._thread = None
            seconds = (time.monotonic_ns() - self.since_ns) / 1e9
            log.warning("store: takes writes again, after refusing them for %.1f s", seconds)
            self._tell(None)
            return

    def _tell(self, cause: str | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(cause)
            except Exception:
                log.exception("store: a refusal listener failed")

    def close(self) -> None:
        """Stop probing (the database is closing)."""
        self._closing.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30.0)
