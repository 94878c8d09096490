"""A lane: the threads that run one device's batches, driving a step-API scheduler.

Two ways in:

- ``run_blocking(item)`` for callers that may block (the threaded gRPC front
  end). The caller's own thread runs batches while its item is unfinished
  (leader/follower): with nothing queued, a request runs inline with no
  thread hop at all; under load, whichever waiting thread is handed a free
  slot runs the next batch, which holds the requests of several callers.
- ``submit(item)`` for callers that must not block (asyncio, streams): a
  parked helper thread runs the batch and calls ``item.on_done``.

Either way the scheduler decides what runs; the lane only supplies threads,
the lock and the clock. An item may carry a ``finisher``: after its batch
ran, the lane hands the batch's items to ``finisher(items, done)`` (on the
thread that ran the batch, without the lock, once the slot is handed on)
instead of waking their callers, and wakes them when the finisher calls
``done(items)``. The Decide flow uses this to decide and audit whole groups
on one thread while each caller sleeps just once; calls answered later
(``kernel/api/answer_later.py``) to answer a batch's callers from that thread.

``slots`` bounds how many batches run at once, plus
``urgent_slots`` kept for batches led by a priority-1 request: batches run to
completion, so without a spare slot an urgent request would wait behind a
long batch of a lower priority (on a CPU the spare slot time-shares the
cores, and the OS lets the short urgent batch through quickly).

``batch_nice``: while requests of the urgent level have arrived recently, a
thread running a batch led by a lower priority lowers its own OS priority
(nice) for the model's compute in it: only the part that runs without the
GIL (``OnnxModel.run`` reads ``threads.compute_levels()``), since a thread
holding the GIL must not be lowered. On a CPU the model's batch competes
for the core with the front end's threads, and the OS shares the core
fairly: an urgent request's handler then waits behind the neighbour's
compute, which the scheduler's priorities cannot reach. Lowered, the long
low-priority compute gets what the front end leaves (bench/RESULTS.md,
"Priority isolation: niced batches and a lane spin fixed"). Callers' threads
run batches here (leader/follower), so the thread must come back to its own
priority afterwards, which the OS allows only with CAP_SYS_NICE (or
RLIMIT_NICE); the server passes 0 (off) without it.

Waking is targeted, never a broadcast: a blocked caller sleeps on a lock of
its own and is woken when its item finishes, or when it is chosen to run
the next batch (one sleeper per freed slot). A broadcast would wake every
waiting handler thread after every batch, which costs more CPU than the
batch saves at high concurrency.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

from .. import memory
from ..errors import Cancelled, DeadlineExceeded, DeadlineTooShort, Internal, ResourceExhausted, Unavailable
from ..threads import lower_next_compute, name_native_thread, normal_compute, thread_nice
from .policy import ADMITTED, REJECT_DEADLINE, REJECT_QUEUE_FULL, ModelSchedule
from .stopping import Abandoned, new_run_options, nobody_waits, stopped_error
from .types import ITEM_BATCHED, ITEM_CANCELLED, ITEM_DONE, ITEM_EXPIRED, ITEM_QUEUED, NO_DEADLINE, Batch, WorkItem

# The scheduler's counters that only grow (its stats() per model); the rest there are gauges and the latency fit.
SCHEDULER_COUNTERS = ("submitted", "rejected_queue_full", "rejected_tenant_full", "rejected_deadline", "expired",
                      "expired_predicted", "cancelled", "batches", "rows")


def add_counters(total: dict, counters: dict) -> None:
    for key in SCHEDULER_COUNTERS:
        total[key] = total.get(key, 0) + counters.get(key, 0)


log = logging.getLogger("aios.scheduling")

_FINISHED = (ITEM_DONE, ITEM_CANCELLED, ITEM_EXPIRED)
URGENT_LEVEL = 1  # batches led by requests of this priority level may use the urgent slots
URGENT_RECENT_NS = 10_000_000_000  # batch_nice applies while an urgent request came this recently
_IDLE_POLL_S = 1.0  # helpers re-check closing at this period when nothing wakes them
# A model that ever ran a batch this long is not run inline by ``run_if_idle`` again, whatever its fit
# predicts (a fit is a mean: one input may run a thousand times longer than the profile's zeros).
INLINE_NEVER_NS = 2_000_000


def remember_weakly(table: weakref.WeakKeyDictionary, model, value) -> None:
    """``table[model] = value`` for as long as anything holds ``model``; nothing for a model that cannot be
    weakly referenced (a test's stand-in)."""
    try:
        table[model] = value
    except TypeError:
        pass


class Lane:
    def __init__(
        self,
        scheduler,
        execute: Callable[[Batch], int],
        slots: int = 1,
        name: str = "cpu",
        urgent_slots: int = 1,
        on_batch: Callable[[Batch, int], None] | None = None,
        on_item: Callable[[WorkItem], None] | None = None,
        batch_nice: int = 0,
    ):
        self.name = name
        self._batch_nice = batch_nice
        self._base_nice = thread_nice() if batch_nice else 0  # threads started later inherit it
        self._urgent_seen_ns = -URGENT_RECENT_NS  # when a request of the urgent level last arrived
        self.scheduler = scheduler
        self.slots = slots
        self._execute = execute
        # Statistics hooks, called under the lock before the callers concerned
        # are woken (a caller that reads statistics after its answer finds
        # itself counted): on_batch(batch, now_ns) once per finished batch, for
        # the batch and all its items (one call, not one per item); on_item(item)
        # for an item that left without running (cancelled, expired, unloaded).
        self._on_batch = on_batch
        self._on_item = on_item
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # helpers wait here
        self._sleepers: dict = {}  # blocked item -> its thread's wake-up lock (insertion ordered)
        self._free_slots = slots
        self._free_urgent = urgent_slots
        self._async_queued = 0  # queued items whose callers will not run batches themselves
        self._closed = False
        # Batches running now -> None, or the requests in them no longer wanted (stopping.Abandoned, made at the
        # first cancel or expiry of one of them); and the RunOptions of no running batch, for the next ones.
        self._running: dict = {}
        self._spare_options: list = []
        self._leaving: set = set()  # models unloaded while they held work: removed once it is done
        self._schedules: dict = {}  # model -> its ModelSchedule, to add it back (_add_back_locked)
        # Models one of whose batches ran longer than INLINE_NEVER_NS: never run inline again (run_if_idle).
        self._not_inline: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Models dropped after their unload, while anything still holds them: a request that looked one up
        # just before its unload is queued on it all the same (weak: gone with the last reference).
        self._dropped: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._helpers = [
            threading.Thread(target=self._helper, name=f"aios-lane-{name}-{i}", daemon=True)
            for i in range(slots + urgent_slots)
        ]
        for thread in self._helpers:
            thread.start()

    # -- models -------------------------------------------------------------
    def add_model(self, model, schedule: ModelSchedule, profile=()) -> None:
        """Register ``model``; ``profile`` is [(rows, ns)] measured at load to warm the latency fit."""
        with self._lock:
            self.scheduler.add_model(model, schedule)
            self._schedules[model] = schedule
            self._share_bounds_locked(model)
            for rows, duration_ns in profile:
                self.scheduler.observe(model, rows, duration_ns)

    def _share_bounds_locked(self, model) -> None:
        """Bound ``model`` together with the other copies of its version registered here (a reload's old copy, which
        runs the requests queued on it before the reload): the version's queue bounds hold across its copies (each
        counting its own let a reload under load admit twice max_queue, and twice max_tenant_queue)."""
        version = getattr(model, "name", None), getattr(model, "version", None)
        if not version[0]:  # (a test's bare model)
            return
        for other in self._schedules:
            if other is not model and (getattr(other, "name", None), getattr(other, "version", None)) == version:
                self.scheduler.share_bounds(model, other)

    def remove_model(self, model) -> None:
        """Remove ``model`` once the work it holds is done: its queued requests still run (its session
        lives until their last batch), as Triton finishes in-flight requests on unload and reload.

        (It used to fail them at once with UNAVAILABLE: a reload under load dropped a quarter of the
        requests in flight.) New requests no longer reach it: the hub stops resolving it first.
        """
        with self._lock:
            if self._closed or self.scheduler.load(model) == (0, 0):
                self._drop_locked(model)
            else:
                self._leaving.add(model)

    def _drop_locked(self, model) -> None:
        self._leaving.discard(model)
        stats = getattr(model, "stats", None)  # (a ModelVersion's; tests drive lanes with bare models too)
        if stats is not None:
            add_counters(stats.retired, self.scheduler.stats()["models"].get(model, {}))
        schedule = self._schedules.pop(model, None)
        if schedule is not None and not self._closed:
            remember_weakly(self._dropped, model, schedule)
        for item in self.scheduler.remove_model(model):  # none when it drained; all of them at close
            item.error = Unavailable(f"model {model.name}/{model.version} was unloaded before the request ran")
            item.state = ITEM_CANCELLED
            self._finish_locked(item)
        if not self._closed:
            memory.release_soon()  # (its sessions' memory, kept by the C allocator otherwise: kernel/memory.py)

    def _add_back_locked(self, model) -> bool:
        """Register again a model dropped after its unload, as one leaving (dropped again once its work is
        done), for a request that looked it up before the unload: it runs on that version, as the requests
        queued at the unload do, instead of being refused in a window its caller cannot see. The latency
        fit starts afresh. False for a model this lane never ran, or dropped at close."""
        schedule = self._dropped.pop(model, None)
        if schedule is None:
            return False
        self.scheduler.add_model(model, schedule)
        self._schedules[model] = schedule
        self._share_bounds_locked(model)
        self._leaving.add(model)
        return True

    def _settle_leaving_locked(self, model) -> None:
        """Drop ``model`` if it was unloaded and its last queued or running work just left."""
        if model in self._leaving and self.scheduler.load(model) == (0, 0):
            self._drop_locked(model)

    def load(self, model) -> tuple[int, int]:
        """(queued requests, running batches) of ``model``."""
        with self._lock:
            return self.scheduler.load(model)

    def stats(self) -> dict:
        with self._lock:
            return self.scheduler.stats()

    def version_counters(self, into: dict) -> None:
        """Add the scheduler counters of each model version here to ``into``, keyed by ``id`` of its
        ``ModelStats`` (shared by a reload's copies), with the counts of its copies already dropped
        (``ModelStats.retired``) — read under the lock that drops them, so a scrape never sees a dropped
        copy's counts both live and retired, or neither. ``queued`` and ``in_flight`` (gauges) are summed over
        its copies here too: a reload's old copy keeps the requests queued on it until they have run."""
        with self._lock:
            for model, counters in self.scheduler.stats()["models"].items():
                stats = getattr(model, "stats", None)
                if stats is None:
                    continue
                total = into.get(id(stats))
                if total is None:
                    total = into[id(stats)] = {"queued": 0, "in_flight": 0}
                    add_counters(total, stats.retired)
                add_counters(total, counters)
                total["queued"] += counters["queued"]
                total["in_flight"] += counters["in_flight"]

    def predict(self, model, rows: int) -> int:
        """The latency fit's ns for a batch of ``rows`` of ``model`` (0: not measured yet, or dropped)."""
        with self._lock:
            return self._predict_locked(model, rows)

    def _predict_locked(self, model, rows: int) -> int:
        try:
            return self.scheduler.predict(model, rows)
        except KeyError:  # dropped after an unload: not measured (its request is queued as any other)
            return 0

    # -- entry points ---------------------------------------------------------
    def run_blocking(self, item: WorkItem, on_wait: Callable[[WorkItem], None] | None = None) -> WorkItem:
        """Queue ``item`` and return once it is finished; may run batches on this thread.

        ``on_wait(item)`` is called once, without the lock, if the caller has
        to sleep: the place to hook up client cancellation, which a request
        that runs inline at once never needs.
        """
        lock = self._lock
        lock.acquire()
        held = True
        try:
            now = self._submit_locked(item, blocking=True)
            while item.state not in _FINISHED:
                wake_at = None
                if self._free_slots > 0 or self._free_urgent > 0:
                    batch, urgent = self._next_batch_locked(now)
                    if batch is not None:
                        self._run_locked(batch, urgent)
                        now = time.monotonic_ns()
                        continue
                    if item.state in _FINISHED:  # expired while looking for a batch
                        break
                    wake_at = self._wake_at_locked(now)  # a batching window may be open
                if item.deadline_ns != NO_DEADLINE:
                    if item.deadline_ns > now:
                        wake_at = item.deadline_ns if wake_at is None else min(wake_at, item.deadline_ns)
                    elif item.state == ITEM_QUEUED:
                        self._expire_locked(item)
                        break
                    else:
                        # It runs in another thread's batch; wait for that batch, which
                        # answers DEADLINE_EXCEEDED for it if it finishes too late, and is
                        # stopped if nobody waits for any of its requests any more.
                        self._abandon_locked(item, cancelled=False)
                waiter = threading.Lock()
                waiter.acquire()
                self._sleepers[item] = waiter
                held = False
                lock.release()
                woken = False
                try:
                    if on_wait is not None:
                        on_wait(item)
                        on_wait = None
                    if wake_at is None:
                        woken = waiter.acquire()
                    else:
                        woken = waiter.acquire(timeout=max(0.0, (wake_at - time.monotonic_ns()) / 1e9))
                finally:
                    if not (woken and item.state in _FINISHED):
                        lock.acquire()
                        held = True
                        self._sleepers.pop(item, None)
                # Woken with the item finished: _wake_locked set its final state and
                # took the waiter out of _sleepers before releasing it, so nothing is
                # left to do under the lane lock. Under load, not taking that busy
                # lock again spares each answered caller a wait and a thread switch.
                if not held:
                    return item
                now = time.monotonic_ns()
        finally:
            if held:
                lock.release()
        return item

    def run_if_idle(self, item: WorkItem, max_ns: int) -> bool:
        """Run ``item`` on this thread if the lane is idle and its batch is predicted to take at most ``max_ns``.

        For callers that must not block for long (an event loop): True means
        the item finished here and ``item.on_done`` was *not* called; False
        means it was queued as by ``submit`` and ``on_done`` reports it. A
        lone request on an idle lane then costs no thread hop at all, as in a
        server that runs its model inline; a slow model, a model whose batches
        have not been timed yet (no prediction), or a lane with work queued
        still goes through the helpers, so that requests batch.
        """
        on_done = item.on_done
        with self._lock:
            if (self._free_slots > 0 and not self.scheduler.has_work() and item.model not in self._not_inline
                    and 0 < self._predict_locked(item.model, item.rows) <= max_ns):  # 0: not measured yet
                item.on_done = None  # finished here: the caller reads the item itself
                now = self._submit_locked(item, blocking=False)
                batch, urgent = self._next_batch_locked(now)
                if batch is not None:  # nothing else was queued: the batch is this item alone
                    self._run_locked(batch, urgent)
                    return True
                if item.state in _FINISHED:  # expired at once
                    return True
                item.on_done = on_done  # held for a batching window: a helper runs it
            else:
                self._submit_locked(item, blocking=False)
            self._notify_helper_locked(item)
            return False

    def run_or_queue(self, item: WorkItem) -> bool:
        """Queue ``item`` and, if a slot is free, run the next batch on this thread; never waits.

        For callers whose items carry a ``finisher`` that answers them (the
        threaded front end's calls answered later): the batch run here may
        hold other callers' items and may not hold this one (a more urgent
        batch goes first); whatever stays queued runs when a slot frees up,
        on the thread that frees it or a helper. True if a batch ran here.
        """
        with self._lock:
            now = self._submit_locked(item, blocking=False)
            if self._free_slots > 0 or self._free_urgent > 0:
                batch, urgent = self._next_batch_locked(now)
                if batch is not None:
                    self._run_locked(batch, urgent)
                    return True
            self._notify_helper_locked(item)
            return False

    def submit(self, item: WorkItem) -> None:
        """Queue ``item``; ``item.on_done(item)`` is called from a lane thread when it finishes."""
        with self._lock:
            self._submit_locked(item, blocking=False)
            self._notify_helper_locked(item)

    def _notify_helper_locked(self, item: WorkItem) -> None:
        """Wake a helper for ``item`` if one could run a batch now. With every slot taken none could:
        the running batch's end hands its slot on (``_hand_over_slot_locked``), and a helper woken
        here would only look and sleep again, a thread switch per queued request under load."""
        if self._free_slots > 0 or (self._free_urgent > 0 and item.priority <= URGENT_LEVEL):
            self._work.notify()

    def cancel(self, item: WorkItem, reason: str = "the client cancelled the request") -> bool:
        """Remove a queued item; False if it already runs or finished. A running one is noted as no longer
        wanted: its batch is stopped once none of its requests is (``_abandon_locked``)."""
        with self._lock:
            if item.state != ITEM_QUEUED or not self.scheduler.cancel(item):
                if item.state == ITEM_BATCHED:
                    self._abandon_locked(item, cancelled=True)
                return False
            item.error = Cancelled(reason)
            self._finish_locked(item)
            return True

    def expire(self, item: WorkItem) -> bool:
        """Drop a queued item whose deadline passed (DEADLINE_EXCEEDED); False if it already left the queue."""
        with self._lock:
            if item.state != ITEM_QUEUED:
                if item.state == ITEM_BATCHED:
                    self._abandon_locked(item, cancelled=False)
                return False
            self._expire_locked(item)
            return item.state == ITEM_EXPIRED

    def _abandon_locked(self, item: WorkItem, cancelled: bool) -> None:
        """``item``, in a running batch, is no longer wanted (``cancelled`` by its client, or its deadline passed):
        if none of its batch's requests is, stop the batch's run (scheduling/stopping.py). Nothing for an item
        whose batch has ended (waiting for its finisher) or is being formed. Only on a cancel or an expiry: the
        lookups here cost nothing to a request that is neither."""
        for batch, abandoned in self._running.items():
            if item in batch.items:
                break
        else:
            return
        if abandoned is None:
            abandoned = self._running[batch] = Abandoned()
        abandoned.reasons.setdefault(item, cancelled)
        if not abandoned.stopped and nobody_waits(batch, abandoned, time.monotonic_ns()):
            abandoned.stopped = True
            batch.run_options.terminate = True

    def close(self) -> None:
        """Stop the helpers once the queue is empty (call after the front end drained)."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
        for thread in self._helpers:
            thread.join(timeout=5)

    # -- internals (all *_locked run with self._lock held) ----------------------
    def _submit_locked(self, item: WorkItem, blocking: bool) -> int:
        """Queue ``item``; returns the clock reading it was queued at (reused as "now")."""
        if self._closed:
            raise Unavailable("the kernel is shutting down")
        now = item.enqueued_ns = time.monotonic_ns()
        item.blocking = blocking
        if item.priority <= URGENT_LEVEL:
            self._urgent_seen_ns = now
        try:
            verdict = self.scheduler.submit(item, now)
        except KeyError:  # dropped since the caller looked it up: a reload or an unload finished meanwhile
            if not self._add_back_locked(item.model):
                raise Unavailable(f"model {item.model.name}/{item.model.version} was unloaded before the request "
                                  "was queued (a reload or an unload); send it again") from None
            verdict = self.scheduler.submit(item, now)
        if verdict != ADMITTED:
            refusal = item.error = self._refusal_locked(item, verdict, now)
            if self._on_item is not None:  # a refused request is a failed one in ModelStatistics, as in Triton
                self._on_item(item)
            raise refusal
        if not blocking:
            self._async_queued += 1
        return now

    def _refusal_locked(self, item: WorkItem, verdict: int, now: int) -> ResourceExhausted | DeadlineExceeded:
        """Why admission refused ``item``. RESOURCE_EXHAUSTED (with a retry hint) means busy: work is queued or
        running ahead of it. A deadline missed with nothing ahead is DEADLINE_EXCEEDED: the whole predicted
        wait is its own run, and retrying the same request could not help. (With work ahead the kernel does
        not tell the two apart: the latency fit, fed by the batches ahead, extrapolates poorly to a request
        of another size — it put one row behind 512-row batches at 120 ms.)"""
        if verdict == REJECT_DEADLINE and sum(self.scheduler.load(item.model)) == 0:
            return _too_short(item, now, item.retry_after_ns)
        return _rejection(item, verdict, self._schedules[item.model])  # (the scheduler that refused it has it)

    def _next_batch_locked(self, now: int) -> tuple[Batch | None, bool]:
        """The next batch to run and whether it takes an urgent slot."""
        urgent = self._free_slots == 0
        batches = self.scheduler.next_batches(now, 1, URGENT_LEVEL if urgent else 0)
        for item in self.scheduler.pop_expired():
            self._expire_locked(item, already_removed=True)
        return (batches[0] if batches else None), urgent

    def _expire_locked(self, item: WorkItem, already_removed: bool = False) -> None:
        if not already_removed:
            if item.state != ITEM_QUEUED or not self.scheduler.cancel(item, True):
                return
        item.state = ITEM_EXPIRED
        now = time.monotonic_ns()
        waited = f"{(now - item.enqueued_ns) / 1e6:.1f} ms in the queue"
        if item.deadline_ns != NO_DEADLINE and item.deadline_ns > now:  # the scheduler's prediction (reference.py)
            why = (f"the batch it was to run in was predicted to end after its deadline, "
                   f"{(item.deadline_ns - now) / 1e6:.1f} ms away, after {waited}")
        else:
            why = f"deadline passed after {waited}"
        item.error = DeadlineExceeded(f"{why}; the model never ran this request")
        self._finish_locked(item)

    def _start_locked(self, batch: Batch) -> int | None:
        """When ``batch`` starts (a fresh clock reading), or None if none of it is left to run.

        Its requests whose deadline passed since the scheduler formed it are answered DEADLINE_EXCEEDED
        and never run (``scheduler.start``). The thread that formed it has answered the requests expired
        with it meanwhile (each a gRPC send or a wake-up, under load a wait for the GIL), or waited for
        the GIL itself: a stress test saw batches start 50-425 ms after they were formed, and ran requests
        (decided and recorded Decides) whose deadlines had passed in that time. Answering the requests
        expired here may take as long again, so the check is repeated until one finds none: the last is
        made just before the lock is released to run the batch."""
        scheduler = self.scheduler
        count = len(batch.items)
        while True:
            now = time.monotonic_ns()
            running = scheduler.start(batch, now)
            if running and len(batch.items) == count:
                return now  # (the common case: nothing expired since it was formed)
            for item in scheduler.pop_expired():
                self._expire_locked(item, already_removed=True)
            if not running:
                return None
            count = len(batch.items)

    def _run_locked(self, batch: Batch, urgent: bool) -> None:
        """Run ``batch`` (of ``_next_batch_locked``) with the lock released; re-acquires it before returning.
        A batch none of whose requests is left in time (``_start_locked``) is not run."""
        now = self._start_locked(batch)
        if now is None:
            if self.scheduler.has_work():  # (as at the end of a run: the caller may not look again)
                self._hand_over_slot_locked()
            return
        if urgent:
            self._free_urgent -= 1
        else:
            self._free_slots -= 1
        items = batch.items
        for item in items:
            item.started_ns = now
        spare = self._spare_options
        batch.run_options = spare.pop() if spare else new_run_options()
        running = self._running
        running[batch] = None
        niced = (self._batch_nice and items[0].priority > URGENT_LEVEL  # items[0]: the batch's head
                 and now - self._urgent_seen_ns < URGENT_RECENT_NS)
        self._lock.release()
        if niced:  # the model's compute inside execute runs lowered (OnnxModel.run), not its Python parts
            lower_next_compute(self._base_nice + self._batch_nice, self._base_nice)
        escaped = None
        try:
            compute_ns = self._execute(batch)
        except BaseException as exc:  # execute sets each item's error itself; this is a bug in it, or an interrupt
            escaped = exc
            compute_ns = time.monotonic_ns() - now
            log.exception("running a batch of %s/%s failed outside the model", batch.model.name, batch.model.version)
            for item in items:
                if item.error is None:
                    item.outputs = None
                    item.error = Internal(f"the batch failed: {type(exc).__name__}: {exc}")
        finally:
            if niced:
                normal_compute()
            self._lock.acquire()
        if urgent:
            self._free_urgent += 1
        else:
            self._free_slots += 1
        abandoned = running.pop(batch)
        stopped = False
        if abandoned is not None and abandoned.stopped:
            batch.run_options.terminate = False  # (kept for another batch)
            # Stopped part-way (no model call finished), not a race lost to a run that finished first.
            stopped = escaped is None and batch.runs is not None and not batch.runs
        spare.append(batch.run_options)
        scheduler = self.scheduler
        if stopped:  # (a part of a run teaches the latency fit nothing; fair share charges the time it held)
            scheduler.complete(batch, -1, compute_ns)
        else:
            scheduler.complete(batch, compute_ns, compute_ns if escaped is not None else _held_ns(batch, compute_ns))
        if compute_ns > INLINE_NEVER_NS and batch.model not in self._not_inline:
            # Its run time depends on its inputs (a loop, a sequence length), or its profile on zeros was
            # flattering: an inline run on a front end's only thread (gRPC's poller, the event loop) could hold
            # every call of the kernel that long (a scheduling audit: 1.9 s, ServerLive included).
            remember_weakly(self._not_inline, batch.model, compute_ns)
        if self._leaving:
            self._settle_leaving_locked(batch.model)
        if escaped is not None:
            batch.runs = []  # (no successful execution to count)
        now = time.monotonic_ns()
        timings = batch.timings if batch.runs is None else None  # (retried one by one: each item has its own)
        finishing = None
        for item in items:
            if timings is not None:
                item.timings = timings
            if stopped:  # each request as it was given up: CANCELLED or DEADLINE_EXCEEDED, never a fault
                item.outputs = None
                item.error = stopped_error(item, abandoned)
            elif item.deadline_ns != NO_DEADLINE and now > item.deadline_ns and item.error is None:
                # Never answer after the deadline: the caller has given up on this result.
                item.outputs = None
                item.error = DeadlineExceeded(
                    f"the model finished {(now - item.deadline_ns) / 1e6:.1f} ms after the request's deadline"
                )
            if item.finisher is None:
                item.state = ITEM_DONE
            elif finishing is None:
                finishing = [item]
            else:
                finishing.append(item)
        if self._on_batch is not None:
            self._on_batch(batch, now)
        for item in items:
            if item.state == ITEM_DONE:
                self._wake_locked(item)
        if scheduler.has_work():
            self._hand_over_slot_locked()
        if finishing is not None:
            self._finish_outside_lock(finishing)
        if escaped is not None and not isinstance(escaped, Exception):
            raise escaped  # KeyboardInterrupt and the like, once the batch's callers are answered and its slot is back

    def _finish_outside_lock(self, finishing: list) -> None:
        """Hand finished items to their finishers, grouped, without the lane lock (a finisher may answer
        its callers itself, which must not hold up threads queueing work); re-acquires it after."""
        groups: dict = {}
        for item in finishing:
            groups.setdefault(item.finisher, []).append(item)
        refused = []
        self._lock.release()
        try:
            for finisher, group in groups.items():
                try:
                    taken = finisher(group, self._finished)
                except Exception:  # a finisher's bug must not leave its callers asleep
                    log.exception("a finisher of %d items failed", len(group))
                    taken = False
                if not taken:  # refused (closing): the callers finish alone
                    refused.extend(group)
        finally:
            self._lock.acquire()
        for item in refused:
            if item.state not in _FINISHED:
                item.state = ITEM_DONE
                self._wake_locked(item)

    def _finished(self, items: list) -> None:
        """A finisher's items are finished (results set): wake their callers."""
        with self._lock:
            for item in items:
                item.state = ITEM_DONE
                self._wake_locked(item)

    def _wake_at_locked(self, now: int) -> int | None:
        """When a thread that found no batch it may run should look again; None: when handed a slot.

        With a normal slot free, when any batch will be ready. With only an
        urgent slot free, when an *urgent* batch will be ready: a batch of a
        lower priority that is ready now cannot run here (``next_batches``
        just said so), and asking "when is anything ready" would answer "now"
        and send the caller round again at once. Such a spin (every caller of
        that model retaking the lane lock and the GIL in a loop) starved the
        thread finishing the running batch for 100-300 ms under load
        (bench/RESULTS.md, "And its cause: a spin, fixed"). With no slot free,
        the end of a running batch hands a slot over.
        """
        if self._free_slots > 0:
            return self.scheduler.next_wakeup(now)
        if self._free_urgent > 0:
            return self.scheduler.next_wakeup(now, URGENT_LEVEL)
        return None

    def _hand_over_slot_locked(self) -> None:
        """A slot is free and work is queued: wake one thread to run the next batch."""
        if self._sleepers:
            self._sleepers.pop(next(iter(self._sleepers))).release()
        elif self._async_queued:
            self._work.notify()

    def _finish_locked(self, item: WorkItem) -> None:
        """``item`` left the kernel without running: count it, wake its caller or call its callback."""
        if self._on_item is not None:
            self._on_item(item)
        self._wake_locked(item)
        if self._leaving:  # a cancelled or expired item may have been an unloaded model's last
            self._settle_leaving_locked(item.model)

    def _wake_locked(self, item: WorkItem) -> None:
        """``item`` is finished (state and outputs/error final): wake its caller or call its callback."""
        if item.blocking:
            waiter = self._sleepers.pop(item, None)
            if waiter is not None:
                waiter.release()
        else:
            self._async_queued -= 1
        # on_done hands the result to another thread (an event loop): cheap and
        # non-blocking by contract, so it is safe to call with the lock held.
        if item.on_done is not None:
            item.on_done(item)

    def _helper(self) -> None:
        name_native_thread()
        with self._lock:
            while True:
                now = time.monotonic_ns()
                if (self._free_slots > 0 or self._free_urgent > 0) and self.scheduler.has_work():
                    batch, urgent = self._next_batch_locked(now)
                    if batch is not None:
                        self._run_locked(batch, urgent)
                        continue
                if self._closed and not self.scheduler.has_work():
                    return
                wakeup = self._wake_at_locked(now)
                timeout = _IDLE_POLL_S if wakeup is None else max(0.0, (wakeup - time.monotonic_ns()) / 1e9)
                self._work.wait(timeout)


def _held_ns(batch: Batch, compute_ns: int) -> int:
    """The lane time ``batch`` held its slot, for fair share: its run (``compute_ns``, what the latency fit learns),
    and for a failed batch retried one by one (``runs`` not None) each request's own run too (execute.run_batch
    gave each item its timings). Charged the failed run alone, a model with a poisoned request in every batch
    held the lane for runs nobody paid for: it took turns 1:1 with a clean model while holding the lane 5x as long."""
    if batch.runs is None:
        return compute_ns
    return compute_ns + sum(sum(item.timings) for item in batch.items)


def _too_short(item: WorkItem, now: int, run_ns: int) -> DeadlineTooShort:
    model = f"{item.model.name}/{item.model.version}"
    return DeadlineTooShort(
        f"model {model} cannot finish this request within its deadline, {max(0, item.deadline_ns - now) / 1e6:.3f} ms "
        f"away: running its {item.rows} row(s) is predicted to take {run_ns / 1e6:.3f} ms; the model never ran it "
        "(give it a longer deadline: retrying as it is would fail the same way)", run_ns)


def _rejection(item: WorkItem, verdict: int, schedule: ModelSchedule) -> ResourceExhausted:
    """The admission refusal as an error with gRPC's retry hint trailer. A full queue names the bound that refused
    it: max_queue bounds each priority level (another level may have room), max_tenant_queue a tenant across them."""
    retry_ms = max(1, -(-item.retry_after_ns // 1_000_000))
    model = f"{item.model.name}/{item.model.version}"
    if verdict == REJECT_DEADLINE:
        why = f"model {model} cannot finish this request before its deadline: predicted wait {retry_ms} ms"
    elif verdict == REJECT_QUEUE_FULL:
        level = min(max(item.priority, 1), schedule.priority_levels)  # the level the scheduler files it under
        why = f"model {model}'s queue for priority {level} is full (max_queue {schedule.max_queue} a priority level)"
    else:
        why = (f"tenant {item.tenant or '(default)'} has too many requests queued for model {model} "
               f"(max_tenant_queue {schedule.max_tenant_queue}, across the priority levels)")
    return ResourceExhausted(f"{why}; retry after {retry_ms} ms", trailers=(("retry-after-ms", str(retry_ms)),))
