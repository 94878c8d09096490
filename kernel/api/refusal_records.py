"""Refused calls on the audit log, at most one record a minute per RPC, with the count of those in between.

A refusal is itself audited (who was told no, and why). One record per
refusal let anyone who can reach the port grow the log without bound (a
compliance audit: 200 anonymous refused StreamAudit calls, 200 records).
Here the first refusal of an RPC in a window is recorded at once, naming its
peer; the ones after it in the window are counted, and the next record says
how many there were (``refused_since_last_record``), so the log still holds
every refusal's number and window, without one record each. The count of a
window nobody ends is written by ``flush`` (the kernel's stop).
"""

from __future__ import annotations

import json
import threading
import time

from .._proto.aios.kernel.v1 import kernel_pb2

WINDOW_NS = 60 * 1_000_000_000


class RefusalRecords:
    def __init__(self, log, window_ns: int = WINDOW_NS, clock=time.monotonic_ns):
        self._log = log
        self._window_ns = window_ns
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, list] = {}  # rpc -> [window start (monotonic ns), refusals since its record, reason]

    def refused(self, rpc: str, reason: str, peer: str) -> None:
        """Audit one refusal of ``rpc`` (not waited for: the caller is told no either way)."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(rpc)
            if window is not None and now - window[0] < self._window_ns:
                window[1] += 1
                return
            uncounted = window[1] if window is not None else 0
            self._windows[rpc] = [now, 0, reason]
        self._append(rpc, reason, peer or "anonymous", uncounted)

    def flush(self) -> None:
        """Record the refusals counted since each RPC's last record (the kernel is stopping)."""
        with self._lock:
            pending = [(rpc, w[2], w[1]) for rpc, w in self._windows.items() if w[1]]
            for rpc, _reason, _count in pending:
                self._windows[rpc][1] = 0
        for rpc, reason, count in pending:
            self._append(rpc, reason, "", count)

    def _append(self, rpc: str, reason: str, peer: str, uncounted: int) -> None:
        detail = {"rpc": rpc, "reason": reason, "refused_since_last_record": uncounted}
        self._log.append(kernel_pb2.AuditRecord(
            kind=kernel_pb2.PERMISSION_DENIED, principal=peer or "kernel",
            payload=json.dumps(detail, sort_keys=True).encode()))
