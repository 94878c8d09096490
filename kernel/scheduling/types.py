"""What the scheduler queues and hands out: work items and batches.

The scheduler reads only the routing fields of an item (model, rows,
shape_key, priority, deadline, tenant); the tensors ride along for the
executor. ``WorkItem`` and ``Batch`` are the compiled classes of
``ext/scheduler.pyx`` when built (the core then reads their fields as C
struct members); ``PyWorkItem``/``PyBatch`` here are their pure-Python
references with the same attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Item states. An item leaves QUEUED exactly once.
ITEM_QUEUED = 0
ITEM_BATCHED = 1
ITEM_DONE = 2
ITEM_CANCELLED = 3
ITEM_EXPIRED = 4
ITEM_NEW = 5  # built, not (yet) admitted: a refused item stays NEW

NO_DEADLINE = 0  # deadline_ns value meaning "none"


class PyWorkItem:
    """One request's rows for one model version."""

    __slots__ = (
        "model", "rows", "shape_key", "priority", "deadline_ns", "enqueued_ns", "started_ns", "inputs",
        "request_id", "state", "outputs", "error", "on_done", "blocking", "selected", "timings", "tenant",
        "level", "retry_after_ns", "sched_key", "sched_seq", "finisher", "owner", "decoded_bytes",
    )

    def __init__(
        self,
        model: Any,
        rows: int,
        shape_key: Any,
        inputs: Any,
        request_id: str,
        priority: int = 1,
        deadline_ns: int = NO_DEADLINE,
        on_done: Callable[[Any], None] | None = None,
        tenant: str = "",
    ):
        self.model = model  # scheduler key: a ModelVersion, compared by identity
        self.rows = rows  # rows in the batch dim (1 for models without one)
        self.shape_key = shape_key  # items batch together only with equal keys
        self.priority = priority  # 1 = most urgent
        self.deadline_ns = deadline_ns  # absolute time.monotonic_ns(), or NO_DEADLINE
        self.tenant = tenant  # queue bounds are kept per tenant
        self.enqueued_ns = 0
        self.started_ns = 0
        self.inputs = inputs
        self.request_id = request_id
        self.state = ITEM_NEW
        self.outputs = None  # list of numpy arrays, this item's slice of the batch output
        self.error: BaseException | None = None
        self.on_done = on_done  # called once, from the lane, when the item leaves the kernel
        self.blocking = False  # the submitting thread waits and may run batches itself
        self.selected = None  # indices of the outputs the caller asked for; None = all
        self.timings = (0, 0, 0)  # its batch's compute phases, ns (for statistics)
        self.level = 0  # priority level the scheduler filed it under
        self.retry_after_ns = 0  # set when admission refuses it
        self.sched_key = 0  # the scheduler's ordering key (deadline or "never")
        self.sched_seq = 0  # the scheduler's arrival number
        # finisher(items): per-batch after-work (the Decide flow's policy and audit), run by the lane on
        # the thread that ran the batch, without the lane lock and slot, before the callers are woken.
        self.finisher = None
        self.owner = None  # what the submitter needs back with the item (the Decide flow's Pending)
        # What its inputs hold decoded, estimated by the checked decoder (typed contents, BYTES: copies that can be
        # many times the request's bytes; api/tensors.py); 0 when they are views of the request's bytes (the raw
        # fast path). The front ends charge it against the payload budget (api/payload_budget.py).
        self.decoded_bytes = 0


class PyBatch:
    """Items of one model version that run in one model call."""

    __slots__ = ("model", "items", "rows", "timings", "runs", "run_options")

    def __init__(self, model: Any, items: list, rows: int):
        self.model = model
        self.items = items  # never empty; all share the model and the shape_key
        self.rows = rows  # sum of item rows; <= the model's max_batch_size when it batches
        self.timings = (0, 0, 0)  # ns spent gathering inputs, in the model, slicing outputs
        # The model calls that succeeded, for the statistics (execute.run_batch): None when the batch ran as
        # one call that succeeded (the common case: no list made); else a list of (rows, timings), empty when
        # the batch failed, one entry per request that succeeded alone when a failed batch was retried one by
        # one (each item then has its own timings).
        self.runs = None
        # The onnxruntime RunOptions it runs with, set by the lane while it runs: the lane sets its terminate once
        # none of its requests is wanted any more (scheduling/stopping.py). None: a plain run.
        self.run_options = None


def _compiled():
    from .. import accel

    if accel.FORCE_PURE:
        return PyWorkItem, PyBatch
    try:
        from .._ext.scheduler import Batch, WorkItem
    except ImportError:  # kernel.accel reports missing extensions once, when it loads one
        return PyWorkItem, PyBatch
    return WorkItem, Batch


WorkItem, Batch = _compiled()
