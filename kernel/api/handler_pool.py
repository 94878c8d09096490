"""The threaded front end's handler threads: a thread pool cut down to what ``grpc.server`` uses.

``grpc.server(thread_pool)`` calls only ``thread_pool.submit(fn, *args)`` and
``add_done_callback`` on what it returns (to count calls in progress). A
``concurrent.futures.ThreadPoolExecutor`` does much more per call: a
``Future`` with its own ``Condition``, a state machine, a ``Semaphore``
round to find an idle thread, all in Python, part of it on grpc's single
poller thread. ``HandlerPool`` keeps one lock, one queue and a tiny call
record; measured alone, one submit → run → done-callback round costs ~3 µs
less (bench/RESULTS.md, "Front ends: last two targets").

Threads start on demand, up to ``max_workers``, and stay; each runs
``initializer`` first (the kernel's ``threads.no_wakeup_preemption``).

``on_overlap(overlapping)`` is called on the submitting thread (grpc's poller)
when calls start to overlap (two or more already in progress as one more
arrives) and when one arrives to an idle pool. The kernel passes
``poller_policy``: SCHED_BATCH for the poller under load, its own policy back
when calls come one at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger("aios.api")


class PoolCall:
    """What ``submit`` returns: enough of a ``Future`` for grpc (``add_done_callback``, ``done``, ``cancel``)."""

    __slots__ = ("_pool", "fn", "args", "_callbacks", "_done")

    def __init__(self, pool: HandlerPool, fn, args: tuple):
        self._pool = pool
        self.fn = fn
        self.args = args
        self._callbacks: list | None = None
        self._done = False

    def add_done_callback(self, callback) -> None:
        """Call ``callback(self)`` once the call has run (at once if it already has)."""
        with self._pool._lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = [callback]
                else:
                    self._callbacks.append(callback)
                return
        _invoke(callback, self)

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        return False  # queued calls always run: grpc answers a call it accepted


def _invoke(callback, call: PoolCall) -> None:
    try:
        callback(call)
    except Exception:  # as concurrent.futures does: a callback's fault is logged, not raised
        log.exception("a handler pool done-callback raised")


class HandlerPool:
    __slots__ = ("max_workers", "_prefix", "_initializer", "_queue", "_lock", "_idle", "_threads", "_closed",
                 "_busy", "_on_overlap", "_overlapping")

    def __init__(self, max_workers: int, thread_name_prefix: str = "aios-grpc", initializer=None, on_overlap=None):
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._initializer = initializer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads that finished a call and have not been promised another
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._busy = 0  # calls submitted and not yet finished
        self._on_overlap = on_overlap
        self._overlapping = False  # what on_overlap was last told

    def submit(self, fn, *args) -> PoolCall:
        """Run ``fn(*args)`` on a handler thread; a new thread starts only when none is idle."""
        call = PoolCall(self, fn, args)
        thread = None
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            busy = self._busy
            self._busy = busy + 1
            flip = self._overlap_change_locked(busy)
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
        if flip is not None:
            self._on_overlap(flip)  # a system call, and only when the load changes: outside the lock
        if thread is not None:
            try:
                thread.start()
            except BaseException:
                # No thread to be had (the limit on threads: RuntimeError "can't start new thread"): the call is not
                # taken, and the thread that never ran is not counted (it was queued, and the pool counted a worker
                # it did not have). The caller answers it (eager_receive: UNAVAILABLE saying what ran out).
                with self._lock:
                    self._threads.remove(thread)
                    self._busy -= 1
                raise
        self._queue.put(call)  # (after the start: a thread that could not start leaves nothing queued)
        return call

    def arrival_while_idle(self) -> bool:
        """A call arrived to an idle pool and runs on the submitting thread instead (eager_receive's poller
        inline): tell ``on_overlap`` that calls no longer overlap, as ``submit`` would. False if the pool
        is closed (the call takes ``submit``, which refuses it)."""
        with self._lock:
            if self._closed:
                return False
            flip = self._overlap_change_locked(self._busy)
        if flip is not None:
            self._on_overlap(flip)
        return True

    def _overlap_change_locked(self, busy: int) -> bool | None:
        """What ``on_overlap`` is to be told as a call arrives with ``busy`` others in progress, if anything."""
        if self._on_overlap is None:
            return None
        if busy >= 2 and not self._overlapping:
            self._overlapping = True
            return True
        if busy == 0 and self._overlapping:
            self._overlapping = False
            return False
        return None

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        get, lock = self._queue.get, self._lock
        while True:
            call = get()
            if call is None:  # shutdown
                return
            try:
                call.fn(*call.args)
            except BaseException:  # grpc's behaviours catch their own; this is a last resort
                log.exception("a handler pool call raised")
            with lock:
                call._done = True
                callbacks = call._callbacks
                self._idle += 1
                self._busy -= 1
            if callbacks is not None:
                for callback in callbacks:
                    _invoke(callback, call)
            del call  # drop the request and its context before waiting for the next

    def in_progress(self) -> int:
        """Calls submitted and not finished (waiting for a thread or running): what gRPC's limit counts."""
        return self._busy

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Let the threads finish what is queued, then end them (``cancel_futures`` is accepted and ignored)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


_normal_policy: int | None = None  # the poller's own policy, kept the first time it is changed


def poller_policy(overlapping: bool) -> None:
    """SCHED_BATCH for the calling thread (grpc's poller) while calls overlap; its own policy when they do not.

    Under load (concurrency 16, 64) the poller is woken for every message
    while a handler thread holds the GIL; with wake-up preemption it takes the
    core only to wait for the GIL, and on one core that left the model's
    batches so much of the CPU that callers fell behind: at concurrency 64 on
    large_mlp batches shrank to 8-14 rows in some runs (vs ~30) and the
    kernel served 1.17x more with the poller on SCHED_BATCH. At concurrency 1 the
    poller must take the core as soon as a message arrives: SCHED_BATCH cost
    ~4 % there. (bench/RESULTS.md, "Front ends: last two targets".)
    """
    global _normal_policy
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:  # not Linux
        return
    try:
        if _normal_policy is None:
            _normal_policy = os.sched_getscheduler(0)
        policy = batch if overlapping else _normal_policy
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:  # refused (a container policy, say): the kernel runs as before
        log.debug("cannot change the gRPC poller's scheduling policy", exc_info=True)
