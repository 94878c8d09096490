"""Per-version counters in the shape of Triton's ModelStatistics.

Updated by the lane that runs the batches (under its lock), read by the
statistics RPC and, later, the Prometheus exporter.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, Internal, ModelRefusedInput
from ..scheduling.stopping import CancelledWhileRunning, ExpiredWhileRunning


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
    # Failed requests the scheduler never saw or counted, by reason (each is in ``fail`` too): a deadline passed
    # before the request could be queued; refused as the kernel's calls in progress were at their limit (the
    # threads kept for priority 1); answered DEADLINE_EXCEEDED because the model finished after the deadline.
    # (A statistics audit: 15 of 160 calls of a mixed load were in no counter.)
    expired_before_queue: int = 0
    rejected_busy: int = 0
    finished_late: int = 0
    # Requests the model itself failed (each in ``fail`` too): it raised or returned what cannot be split (INTERNAL),
    # or onnxruntime refused the request's input (INVALID_ARGUMENT). A failing model alerts on these.
    model_errors: int = 0
    refused_inputs: int = 0
    # Batches stopped part-way because none of their requests was wanted any more (scheduling/stopping.py), and
    # their requests (each in ``fail`` too): cancelled by their client, or past their deadline, while they ran.
    stopped_batches: int = 0
    stopped_cancelled: int = 0
    stopped_expired: int = 0
    # The scheduler's counters (submitted, rejected_*, expired, ...) of this version's copies already dropped from
    # their lane: a reload's old copy, once its queued work ran. A reload keeps this object (ModelHub), so the
    # metrics endpoint adds these to the live copy's and a version's totals never go back (a Prometheus counter
    # that drops reads as a reset: the old copy's counts would be counted twice). Written under the lane's lock.
    retired: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # Both recorders run on the hot path: the Duration updates are written out
    # inline instead of calling add() many times.
    def record_batch(self, batch, now_ns: int) -> None:
        """A finished batch and every request in it, under one lock round.

        ``now_ns`` is when the batch finished (``time.monotonic_ns()``). Each
        successful request is charged its batch's compute phases (as Triton
        counts them), its queue time (``started_ns - enqueued_ns``) and its
        time in the kernel (``now_ns - enqueued_ns``). Executions and the
        per-size batch statistics count the model calls that succeeded, as
        Triton's ``execution_count`` does (``batch.runs``: a failed batch is
        none, a failed batch retried one by one is one per request that then
        succeeded, each charged its own run), so ``inference_count /
        execution_count`` stays the average batch size.
        """
        timings = batch.timings
        runs = batch.runs
        last_ms = time.time_ns() // 1_000_000
        ok = ok_rows = ok_ns = queued_ns = failed = failed_ns = late = errors = refused = cancelled = expired = 0
        own = None if runs is None else [0, 0, 0]  # retried one by one: the successful requests' own runs
        for item in batch.items:
            if item.error is None:
                ok += 1
                ok_rows += item.rows
                ok_ns += now_ns - item.enqueued_ns
                queued_ns += item.started_ns - item.enqueued_ns
                if own is not None:
                    alone = item.timings
                    own[0] += alone[0]
                    own[1] += alone[1]
                    own[2] += alone[2]
            else:
                failed += 1
                failed_ns += now_ns - item.enqueued_ns
                kind = type(item.error)
                if kind is DeadlineExceeded:  # (the lane's: the model finished after the deadline)
                    late += 1
                elif kind is Internal:
                    errors += 1
                elif kind is ModelRefusedInput:
                    refused += 1
                elif kind is CancelledWhileRunning:
                    cancelled += 1
                elif kind is ExpiredWhileRunning:
                    expired += 1
        with self.lock:
            self.last_inference_ms = last_ms
            self.finished_late += late
            self.model_errors += errors
            self.refused_inputs += refused
            if cancelled or expired:  # (a stopped batch's requests all get one of the two)
                self.stopped_batches += 1
                self.stopped_cancelled += cancelled
                self.stopped_expired += expired
            if runs is None:
                self.execution_count += 1
                _add_phases(self._per_size(batch.rows), timings)
            else:
                for rows, alone in runs:
                    self.execution_count += 1
                    _add_phases(self._per_size(rows), alone)
            if ok:
                self.inference_count += ok_rows
                success = self.success
                success.count += ok
                success.ns += ok_ns
                queue = self.queue
                queue.count += ok
                queue.ns += queued_ns
                if own is None:
                    _add_phases(self.compute, timings, ok)
                else:
                    _add_phase_sums(self.compute, own, ok)
            if failed:
                fail = self.fail
                fail.count += failed
                fail.ns += failed_ns

    def _per_size(self, rows: int) -> ComputeStats:
        """The batch statistics of executions of ``rows`` rows (called with the lock held)."""
        per_size = self.batches.get(rows)
        if per_size is None:
            per_size = self.batches[rows] = ComputeStats()
        return per_size

    def record_answered_late(self, item, now_ns: int) -> None:
        """A request its batch's statistics counted a success whose answer was then found late (its caller
        waited for the GIL after the lane's check) and answered DEADLINE_EXCEEDED: a failure, finished late.
        (A statistics audit: such answers stayed successes.) Its batch ended at about ``started_ns`` plus its
        compute, which is what ``record_batch`` charged it."""
        timings = item.timings
        compute_ns = timings[0] + timings[1] + timings[2]
        queued_ns = item.started_ns - item.enqueued_ns
        with self.lock:
            self.inference_count -= item.rows
            self.success.count -= 1
            self.success.ns -= queued_ns + compute_ns
            self.queue.count -= 1
            self.queue.ns -= queued_ns
            _add_phase_sums(self.compute, (-timings[0], -timings[1], -timings[2]), -1)
            self.fail.count += 1
            self.fail.ns += now_ns - item.enqueued_ns
            self.finished_late += 1

    def record_refused(self, reason: str) -> None:
        """A request refused before it reached the scheduler: ``reason`` names its counter
        (``expired_before_queue``, ``rejected_busy``); it is a failed request too, of no time in the kernel."""
        with self.lock:
            setattr(self, reason, getattr(self, reason) + 1)
            self.fail.count += 1

    def record_request(self, ok: bool, rows: int, queue_ns: int, total_ns: int, timings: tuple[int, int, int]) -> None:
        """A request that finished outside a batch (cancelled, expired, unloaded: not ``ok``), or any one request."""
        with self.lock:
            if ok:
                self.inference_count += rows
                success = self.success
                success.count += 1
                success.ns += total_ns
                queue = self.queue
                queue.count += 1
                queue.ns += queue_ns
                _add_phases(self.compute, timings)
            else:
                fail = self.fail
                fail.count += 1
                fail.ns += total_ns


def _add_phases(stats: ComputeStats, timings: tuple[int, int, int], times: int = 1) -> None:
    """``times`` more counts, each of ``timings``, for the three compute phases (called with the lock held)."""
    phase = stats.compute_input
    phase.count += times
    phase.ns += timings[0] * times
    phase = stats.compute_infer
    phase.count += times
    phase.ns += timings[1] * times
    phase = stats.compute_output
    phase.count += times
    phase.ns += timings[2] * times


def _add_phase_sums(stats: ComputeStats, sums, count: int) -> None:
    """``count`` more counts whose three phases add up to ``sums`` (called with the lock held)."""
    stats.compute_input.add(sums[0], count)
    stats.compute_infer.add(sums[1], count)
    stats.compute_output.add(sums[2], count)
