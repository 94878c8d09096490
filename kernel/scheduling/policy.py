"""Per-model scheduling settings and the scheduler's constants, shared by both implementations.

``ext/consts.pxi`` repeats the constants for the compiled core; a test checks
the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Admission results of ``submit`` (the item's ``reject_reason``).
ADMITTED = 0
REJECT_QUEUE_FULL = 1  # the model's queue holds max_queue items
REJECT_TENANT_FULL = 2  # this tenant holds max_tenant_queue items of the model
REJECT_DEADLINE = 3  # the work ahead cannot finish before the item's deadline
REJECT_REASONS = {REJECT_QUEUE_FULL: "queue_full", REJECT_TENANT_FULL: "tenant_full", REJECT_DEADLINE: "deadline"}

LATENCY_WINDOW = 50  # batches in the latency model's sliding window
MAX_OBSERVED_NS = 100_000_000_000  # 100 s: longer batch times are clamped (a stalled machine, not the model)
# Once the fit has OUTLIER_MIN_SAMPLES batches, one that took more than OUTLIER_FACTOR x its prediction counts as
# OUTLIER_FACTOR x: one 1.9 s run of a 0.6 ms model (an input-dependent loop, a VM pause) moved the fit to 34 ms,
# and admission then refused every short-deadline request on the idle model, which never ran again to correct
# it (a scheduling audit). A lasting slowdown still moves the fit, by up to that factor a batch.
OUTLIER_FACTOR = 4
OUTLIER_MIN_SAMPLES = 8
ARRIVAL_EWMA_SHIFT = 3  # inter-arrival gap EWMA weight 1/8 (as a shift: identical in both implementations)
# Admission's service stretch (fixed point, ONE = 1.0): wall time between a backlogged model's batch
# starts over the fit's predicted batch time, as an EWMA of weight 1/8, clamped to [1, 8]. The fit
# times a batch alone; a queue also waits for what the lane does between batches (the other models'
# batches, the front end sharing the cores), so admission scales its predicted wait by it.
STRETCH_ONE = 1024
STRETCH_MAX = 8 * STRETCH_ONE
STRETCH_EWMA_SHIFT = 3
NO_DEADLINE = 0
DEADLINE_NEVER = (1 << 63) - 1  # sort key of items without a deadline: after every real one


@dataclass(frozen=True, slots=True)
class ModelSchedule:
    """How one model version is scheduled; from its model.toml."""

    max_batch_size: int  # rows per batch; 0 = the model has no batch dim (one request per batch)
    instances: int = 1  # batches of this model that may run at once
    weight: float = 1.0  # fair share against other models of the same priority
    priority_levels: int = 3  # request priorities 1..levels (1 = most urgent); others are clamped
    max_queue: int = 4096  # queued requests per model and priority level (Triton's per-level queue policy)
    max_tenant_queue: int = 1024  # queued requests per tenant per model
    max_queue_delay_ns: int = 0  # static batching window (Triton-like); 0 = adaptive
    preferred_batch_sizes: tuple[int, ...] = ()  # with a static window: dispatch at these sizes

    @property
    def capacity(self) -> int:
        """Rows in a full batch (1 for models without a batch dim)."""
        return self.max_batch_size if self.max_batch_size > 0 else 1
