"""The durability watermark: how many records are durable, and the threads waiting for more.

The writer thread ``publish``es a new size after each group; a waiter blocks
on its own lock until the size passes its record (so one group's waiters are
woken, not every waiter), until its timeout, or until the log stops. Readers
following the live tail wait here too.
"""

from __future__ import annotations

import threading


class Watermark:
    __slots__ = ("value", "stopped", "_lock", "_waiters")

    def __init__(self, value: int):
        self.value = value  # records 0..value-1 are durable (written, in async mode)
        self.stopped = False  # no more records will come (closed or failed)
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, threading.Lock]] = []  # (sequence, a held lock released when it is durable)

    def wait_for(self, sequence: int, timeout_s: float | None) -> bool:
        """Block until record ``sequence`` is durable: True, or False on timeout or once stopped."""
        with self._lock:
            if sequence < self.value:
                return True
            if self.stopped:
                return False
            waiter = threading.Lock()
            waiter.acquire()
            entry = (sequence, waiter)
            self._waiters.append(entry)
        if not waiter.acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0.0)):
            with self._lock:
                try:
                    self._waiters.remove(entry)
                except ValueError:  # released at the same moment
                    pass
        return sequence < self.value

    def publish(self, value: int) -> None:
        """Records before ``value`` are durable: release their waiters."""
        with self._lock:
            self.value = value
            if self._waiters:
                keep = []
                for entry in self._waiters:
                    if entry[0] < value:
                        entry[1].release()
                    else:
                        keep.append(entry)
                self._waiters = keep

    def stop(self) -> None:
        """No record will become durable any more: release every waiter (they see False)."""
        with self._lock:
            self.stopped = True
            waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.release()
