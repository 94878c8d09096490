"""Run one batch on its model: gather the items' inputs, call onnxruntime, slice outputs back."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import DeadlineExceeded, Internal, ModelRefusedInput
from ..ids import random_hex
from ..observability.log_budget import budget_for, not_logged
from .stopping import was_stopped
from .types import NO_DEADLINE

log = logging.getLogger("aios.scheduling")

_clock = time.monotonic_ns


def request_id_of(item) -> str:
    """The item's request id, made (and kept) on first need when the caller sent none.

    Most requests finish without anyone reading their id, so it is not made
    per request up front.
    """
    if not item.request_id:
        item.request_id = random_hex()
    return item.request_id


def _fail(model, items, rows: int, exc: Exception) -> None:
    """The model raised on ``items``: each gets INTERNAL naming its request id, but a request that failed alone
    with onnxruntime's INVALID_ARGUMENT (an index out of a table's bounds, say) gets INVALID_ARGUMENT: its own
    input is what the model refused, and INTERNAL invited a retry that fails the same way (a scheduling audit)."""
    refused = len(items) == 1 and _is_invalid_argument(exc)
    for item in items:
        item.outputs = None
        if refused:
            item.error = ModelRefusedInput(f"model {model.name}/{model.version} refused this request's input: {exc} "
                                         f"(request id {request_id_of(item)})")
        else:
            item.error = Internal(
                f"model {model.name}/{model.version} failed at run time: {exc} (request id {request_id_of(item)})"
            )
    skipped = budget_for(model, "refused" if refused else "failed").take()
    (log.debug if skipped is None else log.warning if refused else log.error)(
        "model %s/%s %s on %d rows (request ids %s): %s%s", model.name, model.version,
        "refused a request's input" if refused else "failed", rows, ", ".join(item.request_id for item in items), exc,
        not_logged(skipped or 0))


def _is_invalid_argument(exc: Exception) -> bool:
    """onnxruntime's INVALID_ARGUMENT status (its own exception class of that name)."""
    kind = type(exc)
    return kind.__name__ == "InvalidArgument" and kind.__module__.startswith("onnxruntime")


def _run(model, items, rows: int, options) -> tuple[bool | None, tuple[int, int, int]]:
    """Run ``items`` as one model call; sets each item's outputs or error. Returns (ok, phase ns); ok is None
    when the lane stopped the run (``options.terminate``: nobody wanted its answers), which sets nothing."""
    started = gathered = _clock()
    try:
        if len(items) == 1:
            feeds = items[0].inputs
        else:
            # One contiguous array per input: onnxruntime wants it, and the copy
            # is a few µs against a model call that the batch amortises.
            feeds = {name: np.concatenate([item.inputs[name] for item in items]) for name in items[0].inputs}
        gathered = _clock()
        outputs = model.runtime.run(feeds, options)
    except Exception as exc:  # onnxruntime raises its own exception types for run-time faults
        if was_stopped(options):
            return None, (gathered - started, _clock() - gathered, 0)
        _fail(model, items, rows, exc)
        return False, (gathered - started, _clock() - gathered, 0)
    ran = _clock()
    if len(items) == 1:
        if _rows_kept(model, items, rows, outputs):
            items[0].outputs = outputs
            items[0].error = None
            return True, (gathered - started, ran - gathered, 0)
        return False, (gathered - started, ran - gathered, 0)
    if not _rows_kept(model, items, rows, outputs):
        return False, (gathered - started, ran - gathered, 0)
    offset = 0
    for item in items:
        end = offset + item.rows
        item.outputs = [out[offset:end] for out in outputs]
        item.error = None
        offset = end
    return True, (gathered - started, ran - gathered, _clock() - ran)


def _rows_kept(model, items, rows: int, outputs) -> bool:
    """Whether every output of a batching model has the batch's ``rows``; else each item gets the model's fault.
    Never sliced out: each request would get another's rows, or none; and a request alone answered with another
    number of rows than it sent would get them with OK, against the batch dim its metadata promises (a model
    repository audit: one row for a request of 4). A model fault the operator must see (the one-by-one retry of a
    batch may well succeed and hide it from every caller)."""
    if not model.config.max_batch_size:  # (no batch dim: its outputs are whatever shape the model gives)
        return True
    for out in outputs:
        if out.ndim == 0 or out.shape[0] != rows:
            log.error("model %s/%s returned %s for a batch of %d rows: its outputs cannot be split back to the "
                      "requests; a batch-wide step in the graph?", model.name, model.version, out.shape, rows)
            for item in items:
                item.outputs = None
                item.error = Internal(
                    f"model {model.name}/{model.version} returned {out.shape} for a batch of {rows} rows "
                    f"(request id {request_id_of(item)})"
                )
            return False
    return True


def run_batch(batch) -> int:
    """Execute ``batch``; sets each item's ``outputs`` or ``error``, and ``batch.timings``/``batch.runs`` for
    the statistics (types.PyBatch). Returns the compute ns the latency fit learns from.

    Rows go back to exactly the request they came from. When a batch of
    several requests fails, each request is retried once on its own: one
    poisoned request then fails alone (INTERNAL, with its request id) instead
    of taking the unrelated requests of its batch down with it (not one whose
    deadline has passed by then: DEADLINE_EXCEEDED, never run after it). The retries
    are executions of their own size in the statistics, each request charged
    its own run; the fit learns the failed batch's time (a statistics audit: one
    bad input filed 7 runs as one batch of 6, 11x its compute, and charged every
    request in it the others' runs).

    A run the lane stopped (``batch.run_options.terminate``: every request in it was cancelled or past its
    deadline; scheduling/stopping.py) is no fault: no error is set, nothing is retried, and ``batch.runs`` is
    empty (no model call finished); the lane answers each request why it was dropped.
    """
    items = batch.items
    options = batch.run_options
    if len(items) == 1:
        # A batch of one (every request on an idle lane): its inputs are the
        # feeds as they are, and its outputs are the item's; nothing to gather
        # or slice, so two clock reads instead of five.
        item = items[0]
        started = _clock()
        try:
            outputs = batch.model.runtime.run(item.inputs, options)
        except Exception as exc:  # onnxruntime raises its own exception types for run-time faults
            if was_stopped(options):
                elapsed = _clock() - started
                batch.runs = []
                batch.timings = (0, elapsed, 0)
                return elapsed
            _fail(batch.model, items, batch.rows, exc)
            outputs = None
        elapsed = _clock() - started
        if outputs is not None and _rows_kept(batch.model, items, batch.rows, outputs):
            item.outputs = outputs
            item.error = None
        else:
            batch.runs = []  # (no successful execution)
        batch.timings = (0, elapsed, 0)
        return elapsed
    ok, timings = _run(batch.model, items, batch.rows, options)
    batch.timings = timings
    if ok is None:
        batch.runs = []
    elif not ok:
        skipped = budget_for(batch.model, "retried").take()
        (log.debug if skipped is None else log.warning)(
            "retrying the %d requests of a failed %s/%s batch one by one%s", len(items), batch.model.name,
            batch.model.version, not_logged(skipped or 0))
        runs = batch.runs = []
        for item in items:
            if was_stopped(options):  # (the requests not retried yet were abandoned too: the lane answers them all)
                batch.runs = []
                break
            if item.deadline_ns != NO_DEADLINE and time.monotonic_ns() >= item.deadline_ns:
                # Its answer would be DEADLINE_EXCEEDED whatever the run gave: no run after the deadline (as the
                # lane's start() keeps late requests out of a batch), and no lane time spent on it.
                item.outputs = None
                item.error = DeadlineExceeded("its deadline passed while the batch it ran in failed; the model never "
                                              "ran this request alone (a batch fails when one of its requests makes "
                                              f"the model raise; request id {request_id_of(item)})")
                item.timings = (0, 0, 0)
                continue
            alone_ok, alone = _run(batch.model, [item], item.rows, options)
            item.timings = alone
            if alone_ok:
                runs.append((item.rows, alone))
    return timings[0] + timings[1] + timings[2]
