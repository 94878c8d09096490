"""Run one batch on its model: gather the items' inputs, call onnxruntime, slice outputs back."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import Internal
from .types import Batch

log = logging.getLogger("aios.scheduling")


def run_batch(batch: Batch) -> int:
    """Execute ``batch``; sets each item's ``outputs`` or ``error``. Returns compute ns.

    A failing batch fails every item in it with the same error (a request
    must never be answered with another request's rows).
    """
    items = batch.items
    model = batch.model
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
        elapsed = time.monotonic_ns() - started
        batch.timings = (gathered - started, elapsed - (gathered - started), 0)
        ids = ", ".join(item.request_id for item in items)
        log.error("model %s/%s failed on a batch of %d rows (request ids %s): %s",
                  model.name, model.version, batch.rows, ids, exc)
        for item in items:
            error = Internal(f"model {model.name}/{model.version} failed at run time: {exc} (request id {item.request_id})")
            item.error = error
        return elapsed
    ran = time.monotonic_ns()
    if len(items) == 1:
        items[0].outputs = outputs
        batch.timings = (gathered - started, ran - gathered, 0)
        return ran - started
    for out in outputs:
        if out.ndim == 0 or out.shape[0] != batch.rows:
            for item in items:
                item.error = Internal(
                    f"model {model.name}/{model.version} returned {out.shape} for a batch of {batch.rows} rows "
                    f"(request id {item.request_id})"
                )
            batch.timings = (gathered - started, ran - gathered, 0)
            return ran - started
    offset = 0
    for item in items:
        end = offset + item.rows
        item.outputs = [out[offset:end] for out in outputs]
        offset = end
    done = time.monotonic_ns()
    batch.timings = (gathered - started, ran - gathered, done - ran)
    return done - started
