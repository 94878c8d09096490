"""A duration histogram for one writer thread, read by the metrics endpoint.

The audit writer's group fsync is where a slow or failing disk shows first, and
a maximum alone (``slowest_sync_ns``) cannot say whether one stall or every
group is slow. Observed once per group (never per request), by the one thread
that commits; a scrape reads the plain ints without a lock: at worst a count
one group behind its sum, never a count that goes back.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in ns, Prometheus' `le` (inclusive): 50 µs .. 5 s, a local NVMe's fsync to a stalled network disk.
FSYNC_BOUNDS_NS = (50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000,
                   50_000_000, 100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 5_000_000_000)


class DurationHistogram:
    __slots__ = ("bounds_ns", "counts", "count", "sum_ns")

    def __init__(self, bounds_ns: tuple[int, ...] = FSYNC_BOUNDS_NS):
        self.bounds_ns = bounds_ns
        self.counts = [0] * (len(bounds_ns) + 1)  # per bucket, not cumulative; the last is +Inf
        self.count = 0
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(self.bounds_ns, ns)] += 1
        self.sum_ns += ns
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, observations at or below it) per bucket, +Inf last, as Prometheus wants."""
        out, running = [], 0
        for bound, count in zip((*(b / 1e9 for b in self.bounds_ns), float("inf")), list(self.counts)):
            running += count
            out.append((bound, running))
        return out
