"""Run one batch on its model: gather the items' inputs, call onnxruntime, slice outputs back."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import Internal

log = logging.getLogger("aios.scheduling")


def _run(model, items, rows: int) -> tuple[bool, tuple[int, int, int]]:
    """Run ``items`` as one model call; sets each item's outputs or error. Returns (ok, phase ns)."""
    started = gathered = time.monotonic_ns()
    try:
        if len(items) == 1:
            feeds = items[0].inputs
        else:
            # One contiguous array per input: onnxruntime wants it, and the copy
            # is a few µs against a model call that the batch amortises.
            feeds = {name: np.concatenate([item.inputs[name] for item in items]) for name in items[0].inputs}
        gathered = time.monotonic_ns()
        outputs = model.runtime.run(feeds)
    except Exception as exc:  # onnxruntime raises its own exception types for run-time faults
        failed = time.monotonic_ns()
        for item in items:
            item.outputs = None
            item.error = Internal(
                f"model {model.name}/{model.version} failed at run time: {exc} (request id {item.request_id})"
            )
        log.error("model %s/%s failed on %d rows (request ids %s): %s", model.name, model.version, rows,
                  ", ".join(item.request_id for item in items), exc)
        return False, (gathered - started, failed - gathered, 0)
    ran = time.monotonic_ns()
    if len(items) == 1:
        items[0].outputs = outputs
        items[0].error = None
        return True, (gathered - started, ran - gathered, 0)
    for out in outputs:
        if out.ndim == 0 or out.shape[0] != rows:
            for item in items:
                item.error = Internal(
                    f"model {model.name}/{model.version} returned {out.shape} for a batch of {rows} rows "
                    f"(request id {item.request_id})"
                )
            return False, (gathered - started, ran - gathered, 0)
    offset = 0
    for item in items:
        end = offset + item.rows
        item.outputs = [out[offset:end] for out in outputs]
        item.error = None
        offset = end
    return True, (gathered - started, ran - gathered, time.monotonic_ns() - ran)


def run_batch(batch) -> int:
    """Execute ``batch``; sets each item's ``outputs`` or ``error``. Returns compute ns.

    Rows go back to exactly the request they came from. When a batch of
    several requests fails, each request is retried once on its own: one
    poisoned request then fails alone (INTERNAL, with its request id) instead
    of taking the unrelated requests of its batch down with it.
    """
    started = time.monotonic_ns()
    ok, timings = _run(batch.model, batch.items, batch.rows)
    if not ok and len(batch.items) > 1:
        log.warning("retrying the %d requests of a failed %s/%s batch one by one", len(batch.items),
                    batch.model.name, batch.model.version)
        for item in batch.items:
            _, alone = _run(batch.model, [item], item.rows)
            timings = (timings[0] + alone[0], timings[1] + alone[1], timings[2] + alone[2])
    batch.timings = timings
    return time.monotonic_ns() - started
