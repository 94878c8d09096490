"""Per-version counters in the shape of Triton's ModelStatistics.

Updated by the lane that runs the batches (under its lock), read by the
statistics RPC and, later, the Prometheus exporter.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class ComputeStats:
    """Triton's three compute phases; perf_analyzer requires their counts to agree."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def add(self, timings: tuple[int, int, int]) -> None:
        self.compute_input.add(timings[0])
        self.compute_infer.add(timings[1])
        self.compute_output.add(timings[2])


@dataclass(slots=True)
class ModelStats:
    inference_count: int = 0  # rows that completed (Triton counts inferences, not requests)
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # wall clock, milliseconds since the epoch, as Triton reports it
    success: Duration = field(default_factory=Duration)  # requests, queue + compute
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: ComputeStats = field(default_factory=ComputeStats)  # per request, as Triton counts
    batches: dict[int, ComputeStats] = field(default_factory=dict)  # per batch, by rows
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(self, rows: int, timings: tuple[int, int, int]) -> None:
        with self.lock:
            self.execution_count += 1
            self.last_inference_ms = time.time_ns() // 1_000_000
            per_size = self.batches.get(rows)
            if per_size is None:
                per_size = self.batches[rows] = ComputeStats()
            per_size.add(timings)

    def record_request(self, ok: bool, rows: int, queue_ns: int, total_ns: int, timings: tuple[int, int, int]) -> None:
        """A finished request; ``timings`` are its batch's compute phases (each request is charged the whole batch)."""
        with self.lock:
            if ok:
                self.inference_count += rows
                self.success.add(total_ns)
                self.queue.add(queue_ns)
                self.compute.add(timings)
            else:
                self.fail.add(total_ns)
