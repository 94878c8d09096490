"""The latency model: an online least-squares fit ``duration(n) = a·n + b`` over recent batches.

Pure Python reference; ``ext/scheduler.pyx`` has the compiled twin. Both do
the same integer sums and the same float operations in the same order, so
they predict identical nanoseconds (the differential tests compare plans).
"""

from __future__ import annotations

from collections import deque

from .policy import LATENCY_WINDOW, MAX_OBSERVED_NS, OUTLIER_FACTOR, OUTLIER_MIN_SAMPLES


class LatencyFit:
    __slots__ = ("samples", "sum_n", "sum_d", "sum_nn", "sum_nd", "a", "b")

    def __init__(self) -> None:
        self.samples: deque[tuple[int, int]] = deque()
        self.sum_n = self.sum_d = self.sum_nn = self.sum_nd = 0
        self.a = 0.0  # ns per row
        self.b = 0.0  # fixed ns per batch

    @property
    def known(self) -> bool:
        return len(self.samples) >= 2

    def add(self, rows: int, duration_ns: int) -> None:
        duration_ns = min(max(duration_ns, 0), MAX_OBSERVED_NS)
        if len(self.samples) >= OUTLIER_MIN_SAMPLES:
            cap = self.predict(rows) * OUTLIER_FACTOR
            if 0 < cap < duration_ns:
                duration_ns = cap
        if len(self.samples) == LATENCY_WINDOW:
            old_n, old_d = self.samples.popleft()
            self.sum_n -= old_n
            self.sum_d -= old_d
            self.sum_nn -= old_n * old_n
            self.sum_nd -= old_n * old_d
        self.samples.append((rows, duration_ns))
        self.sum_n += rows
        self.sum_d += duration_ns
        self.sum_nn += rows * rows
        self.sum_nd += rows * duration_ns
        count = len(self.samples)
        den = count * self.sum_nn - self.sum_n * self.sum_n
        if den > 0:
            # float() of each integer first, as the C code does, so both round alike.
            self.a = float(count * self.sum_nd - self.sum_n * self.sum_d) / float(den)
            if self.a < 0.0:
                self.a = 0.0  # noise can tilt the line; a batch never gets cheaper with more rows
            self.b = (float(self.sum_d) - self.a * float(self.sum_n)) / float(count)
        else:  # all samples at one batch size: no slope to learn yet
            self.a = 0.0
            self.b = float(self.sum_d) / float(count)
        if self.b < 0.0:
            self.b = 0.0

    def predict(self, rows: int) -> int:
        """Predicted ns for a batch of ``rows``; 0 while unknown."""
        if not self.samples:
            return 0
        value = self.a * rows + self.b
        return int(value) if value > 0.0 else 0
