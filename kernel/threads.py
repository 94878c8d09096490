"""Thread settings the kernel's own threads share."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("aios.threads")


def no_wakeup_preemption() -> None:
    """Make the calling thread wait for its turn when woken, not preempt (Linux SCHED_BATCH).

    grpc's sync server hands each call from its poller thread to a handler
    thread and wakes that thread again when the request message arrives.
    With wake-up preemption the woken handler takes the core from the poller
    at once, only to block on the GIL the poller still holds, and the core
    switches back: two context switches per wake-up for nothing. SCHED_BATCH
    (no privileges needed) lets the poller run on until it blocks. Measured
    with the tiny model, server on one core, 3 alternating rounds: 1.12x
    ModelInfer/s at concurrency 1 and 1.17x at 16 (bench/RESULTS.md, "Front
    ends again, small model"). The sync server's thread pool runs this in each handler thread
    as it starts (``KernelServer``), so every RPC's thread has it. grpc's poller
    thread gets SCHED_BATCH only while calls overlap (``handler_pool.poller_policy``).
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:  # not Linux: nothing to do
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:  # refused (a container policy, say): the kernel runs as before
        log.debug("SCHED_BATCH refused for a thread", exc_info=True)
