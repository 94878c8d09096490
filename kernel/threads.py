"""Thread settings the kernel's own threads share."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

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


_PR_SET_NAME = 15  # linux/prctl.h
_libc = None


def libc():
    """The process's C library (loaded once): ``prctl`` here, ``malloc_trim`` in kernel/memory.py."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def name_native_thread() -> None:
    """Give the calling thread its Python name in the OS too (first 15 bytes), where Linux allows.

    ``top -H``, ``ps -L`` and ``/proc/<pid>/task/*/comm`` then show which
    kernel thread uses the CPU (handler threads, the decision finisher, the
    review-row writer, ...) instead of "python" for all of them;
    ``bench/thread_cpu.py`` reads them to split a call's CPU by thread.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc().prctl(_PR_SET_NAME, threading.current_thread().name.encode("utf-8", "replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the names are a convenience
        log.debug("could not name the thread", exc_info=True)


def start_handler_thread() -> None:
    """What each front-end handler thread runs first: its OS name, then ``no_wakeup_preemption``."""
    name_native_thread()
    no_wakeup_preemption()


def thread_nice() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def set_thread_nice(value: int) -> None:
    """Set the calling thread's nice value (on Linux a thread's own attribute, not the process's)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)


class _ComputeNice(threading.local):
    levels: tuple[int, int] | None = None  # (lowered, base) for this thread's next compute, or None


_compute_nice = _ComputeNice()


def lower_next_compute(lowered: int, base: int) -> None:
    """Run this thread's model computations (``compute_levels``) at nice ``lowered``, then back at ``base``, until ``normal_compute``."""
    _compute_nice.levels = (lowered, base)


def normal_compute() -> None:
    _compute_nice.levels = None


def compute_levels() -> tuple[int, int] | None:
    """``(lowered, base)`` if this thread's model compute is to run lowered now, else None.

    Only the part of a batch that runs without the GIL (the model's own
    compute) may run lowered: a thread holding the GIL at a low OS priority
    would keep every other Python thread waiting while the OS gives it little
    of the core (priority inversion through the GIL; bench/RESULTS.md,
    "Priority isolation: niced batches"). ``OnnxModel.run`` reads this around
    its onnxruntime call.
    """
    return _compute_nice.levels


_renice_checked: dict[int, bool] = {}


def can_lower_and_restore(nice: int) -> bool:
    """Whether a thread of this process may go ``nice`` steps lower in priority and come back.

    Lowering is always allowed; coming back needs CAP_SYS_NICE (root has it)
    or a high enough RLIMIT_NICE, which most containers do not grant. Tried
    once, on a throwaway thread, since a refused restore leaves that thread
    lowered for good.
    """
    if nice in _renice_checked:
        return _renice_checked[nice]
    result = [False]

    def probe() -> None:
        try:
            base = thread_nice()
            set_thread_nice(min(19, base + nice))
            set_thread_nice(base)
            result[0] = thread_nice() == base
        except (OSError, AttributeError):  # refused, or no per-thread priorities here
            result[0] = False

    thread = threading.Thread(target=probe, name="aios-nice-probe", daemon=True)
    thread.start()
    thread.join()
    _renice_checked[nice] = result[0]
    return result[0]
