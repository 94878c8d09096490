"""The reference scheduler: plain Python, the specification the Cython core must match.

Step API (ARCHITECTURE.md §3), no I/O, no threads, no clock reads (time comes
in as ``now_ns``); callers serialise calls (the lane holds a lock):

- ``add_model(model, schedule)`` / ``remove_model(model) -> queued items``
- ``share_bounds(model, other)``: two copies of one model version (a reload's) count each other's queued
  requests against their queue bounds
- ``observe(model, rows, duration_ns)``: a latency sample (the load-time profile)
- ``submit(item, now_ns) -> ADMITTED | REJECT_*`` (sets ``item.retry_after_ns`` on rejection)
- ``cancel(item) -> bool``: drop a queued item
- ``next_batches(now_ns, limit) -> [Batch]``, ``start(batch, now_ns) -> bool``,
  ``complete(batch, duration_ns, held_ns=-1)``
- ``next_wakeup(now_ns) -> ns | None``, ``pop_expired()``, ``has_work()``, ``load(model)``, ``stats()``

NOTE: the algorithm.
- Each model keeps one heap ordered by (priority level, deadline, arrival):
  strict priority across levels, earliest deadline first within a level,
  arrival order among items without a deadline.
- A batch is the heap head plus the following items in heap order while
  they have the head's shape and fit in ``max_batch_size`` rows (or in the
  preferred size a static window chose, below); a request is never split.
  Cancelled and expired items are dropped when reached, and an item of the
  batch whose deadline comes before the batch's predicted end is expired
  there, not run (the rest of the batch runs without it).
- A model with a free instance is *ready* when a full batch is queued, or
  waiting is not worth it:
  - static window (Triton's dynamic batcher): at once when the batch that
    would be formed now can stop at exactly one of ``preferred_batch_sizes``
    rows (whole requests, in the order above); the batch is then cut at the
    largest such size, even with a full batch queued. Otherwise the model
    waits for more rows until its oldest queued request has waited
    ``max_queue_delay`` (or a full batch is queued), and the batch takes all
    it can up to ``max_batch_size``.
  - adaptive: the fit ``d(n) = a·n + b`` says a batch costs ``b`` regardless
    of its rows, so the scheduler waits for one more request only while
    requests arrive faster than ``b`` apart, never holds its oldest queued
    request longer than ``b``, and never waits past the point where the
    head's deadline would be missed.
  "Oldest" is by arrival, whatever its level or deadline: a more urgent
  request that becomes the head does not restart the wait.
- Among ready models: the most urgent head level first, then the smallest
  virtual time (batch time divided by the model's weight: weighted fair share).
- Queue bounds: ``max_queue`` requests per model and priority level,
  ``max_tenant_queue`` per named tenant across the levels (requests without
  a tenant count only against the model). Copies joined by ``share_bounds`` (a reloaded version and its old
  copy, which runs the requests queued on it before the reload) are bounded together: each counts the others'
  queued requests at its level and of its tenant (each counting only its own let a reload admit twice the
  bounds while the old copy drained).
- Admission: a request whose deadline cannot be met given the rows queued
  ahead of it (same or more urgent levels) and the running batch is refused
  at submit, with the predicted wait as its retry hint; so are requests over
  the model's or tenant's queue bound. The predicted wait is scaled by the
  model's service stretch: how much longer than the fit's batch times its
  batches took to follow each other while a full batch was always waiting
  (the lane's other work and the front end share the cores). Without it an
  overloaded one-core server admitted work that then finished late.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from .latency import LatencyFit
from .policy import (
    ADMITTED, ARRIVAL_EWMA_SHIFT, DEADLINE_NEVER, NO_DEADLINE, REJECT_DEADLINE, REJECT_QUEUE_FULL,
    REJECT_TENANT_FULL, STRETCH_EWMA_SHIFT, STRETCH_MAX, STRETCH_ONE, ModelSchedule,
)
from .types import ITEM_BATCHED, ITEM_CANCELLED, ITEM_EXPIRED, ITEM_QUEUED, Batch, PyWorkItem, WorkItem


class _Model:
    __slots__ = (
        "key", "index", "schedule", "heap", "arrivals", "queued", "queued_by_level", "rows_by_level", "tenants",
        "track_tenants",
        "preferred", "preferred_min", "preferred_max", "batch_limit", "in_flight", "busy_until", "vtime", "fit",
        "last_arrival", "gap", "stretch", "last_start", "last_predicted", "last_backlogged", "counters", "peers",
    )

    def __init__(self, key: object, index: int, schedule: ModelSchedule):
        self.key = key
        self.index = index  # registration order: the last tie-breaker
        self.schedule = schedule
        self.heap: list[tuple[int, int, int, WorkItem]] = []
        # The queued items in arrival order, each with the enqueued_ns it was submitted with: the first is
        # the oldest, which the batching window counts from (the heap's head is the most urgent instead).
        self.arrivals: OrderedDict[WorkItem, int] = OrderedDict()
        self.queued = 0
        self.queued_by_level = [0] * schedule.priority_levels  # max_queue bounds each level, as Triton's queues
        self.rows_by_level = [0] * schedule.priority_levels
        self.tenants: dict[str, int] = {}
        # Every copy of this model version registered (itself among them) when there are several (share_bounds),
        # else None: the queue bounds count the requests queued on all of them.
        self.peers: list[_Model] | None = None
        # Per-tenant counts only matter when that bound is tighter than the model's.
        # (max_queue bounds each level, a tenant's bound spans them: kernel/models/config.py)
        self.track_tenants = schedule.max_tenant_queue < schedule.max_queue * schedule.priority_levels
        # Preferred sizes a batch can have (static window, a batch dim), and the rows the next batch may take:
        # max_batch_size, or the preferred size _ready_at chose for it.
        preferred = schedule.preferred_batch_sizes if schedule.max_queue_delay_ns > 0 else ()
        self.preferred = frozenset(size for size in preferred if 0 < size <= schedule.max_batch_size)
        self.preferred_min = min(self.preferred, default=0)
        self.preferred_max = max(self.preferred, default=0)
        self.batch_limit = schedule.max_batch_size
        self.in_flight = 0
        self.busy_until = 0  # predicted end of the latest dispatched batch
        self.vtime = 0.0
        self.fit = LatencyFit()
        self.last_arrival = 0
        self.gap = 0  # EWMA of ns between submits
        self.stretch = STRETCH_ONE  # service stretch (policy.py): admission's predicted wait is scaled by it
        self.last_start = 0  # the latest dispatch: when, its predicted ns, and whether a full batch was left
        self.last_predicted = 0
        self.last_backlogged = False
        self.counters = {
            "submitted": 0, "rejected_queue_full": 0, "rejected_tenant_full": 0, "rejected_deadline": 0,
            "expired": 0, "expired_predicted": 0, "cancelled": 0, "batches": 0, "rows": 0,
        }


class ReferenceScheduler:
    name = "reference"
    item_class = PyWorkItem  # works with the compiled WorkItem too (it reads attributes only)

    def __init__(self) -> None:
        self._models: dict[object, _Model] = {}
        self._order: list[_Model] = []
        self._expired: list[WorkItem] = []
        self._queued = 0
        self._seq = 0
        self._vclock = 0.0  # virtual time of the last dispatch

    # -- models ---------------------------------------------------------------
    def add_model(self, model: object, schedule: ModelSchedule) -> None:
        if model not in self._models:
            state = _Model(model, len(self._order), schedule)
            self._models[model] = state
            self._order.append(state)

    def remove_model(self, model: object) -> list[WorkItem]:
        state = self._models.pop(model, None)
        if state is None:
            return []
        self._order.remove(state)
        if state.peers is not None:
            state.peers.remove(state)
            if len(state.peers) == 1:
                state.peers[0].peers = None
            state.peers = None
        left = sorted((entry for entry in state.heap if entry[3].state == ITEM_QUEUED), key=lambda e: e[:3])
        for *_, item in left:
            item.state = ITEM_CANCELLED
        self._queued -= state.queued
        return [entry[3] for entry in left]

    def share_bounds(self, model: object, other: object) -> None:
        """Bound ``model`` and ``other`` (both added; copies of one model version: a reload's new copy and the old
        one, which still runs what was queued on it) together: each one's queue bounds count the requests queued
        on the other, until one is removed."""
        state, peer = self._models[model], self._models[other]
        group = peer.peers or [peer]
        for joining in state.peers or [state]:
            if joining not in group:
                group.append(joining)
        for member in group:
            member.peers = group

    def observe(self, model: object, rows: int, duration_ns: int) -> None:
        self._models[model].fit.add(rows, duration_ns)

    def predict(self, model: object, rows: int) -> int:
        return self._models[model].fit.predict(rows)

    # -- queueing --------------------------------------------------------------
    def _level(self, state: _Model, item: WorkItem) -> int:
        return min(max(item.priority, 1), state.schedule.priority_levels)

    def submit(self, item: WorkItem, now_ns: int) -> int:
        state = self._models[item.model]  # KeyError: the caller resolved a model it never added
        schedule = state.schedule
        level = self._level(state, item)
        state.counters["submitted"] += 1
        if self._queued_at(state, level) >= schedule.max_queue:
            return self._reject(state, item, REJECT_QUEUE_FULL, self._room_after(state, now_ns, level))
        if state.track_tenants and item.tenant and self._tenant_queued(state, item.tenant) >= schedule.max_tenant_queue:
            return self._reject(state, item, REJECT_TENANT_FULL, self._room_after(state, now_ns, 1))
        if item.deadline_ns != NO_DEADLINE and state.fit.known:
            finish = now_ns + self._wait_ahead(state, level, item.rows, now_ns)
            if finish > item.deadline_ns:
                return self._reject(state, item, REJECT_DEADLINE, finish - now_ns)
        # Arrival-rate estimate for the adaptive wait.
        if state.last_arrival:
            gap = now_ns - state.last_arrival
            state.gap = gap if state.gap == 0 else state.gap + ((gap - state.gap) >> ARRIVAL_EWMA_SHIFT)
        state.last_arrival = now_ns
        if state.queued == 0 and state.in_flight == 0 and state.vtime < self._vclock:
            state.vtime = self._vclock  # an idle model does not bank credit
        self._seq += 1
        deadline_key = item.deadline_ns if item.deadline_ns != NO_DEADLINE else DEADLINE_NEVER
        heapq.heappush(state.heap, (level, deadline_key, self._seq, item))
        item.state = ITEM_QUEUED
        item.level = level
        state.arrivals[item] = item.enqueued_ns
        state.queued += 1
        state.queued_by_level[level - 1] += 1
        state.rows_by_level[level - 1] += item.rows
        if state.track_tenants and item.tenant:
            state.tenants[item.tenant] = state.tenants.get(item.tenant, 0) + 1
        self._queued += 1
        return ADMITTED

    @staticmethod
    def _queued_at(state: _Model, level: int) -> int:
        """Requests queued at ``level`` on ``state`` and the other copies of its version (share_bounds)."""
        if state.peers is None:
            return state.queued_by_level[level - 1]
        return sum(peer.queued_by_level[level - 1] for peer in state.peers if level <= len(peer.queued_by_level))

    @staticmethod
    def _tenant_queued(state: _Model, tenant: str) -> int:
        """``tenant``'s requests queued on ``state`` and the other copies of its version (a copy that does not
        count its tenants, its bound no tighter than its levels', adds none)."""
        if state.peers is None:
            return state.tenants.get(tenant, 0)
        return sum(peer.tenants.get(tenant, 0) for peer in state.peers)

    def _room_after(self, state: _Model, now_ns: int, level: int) -> int:
        """The retry hint of a full queue at ``level``: about when a batch leaves it. With a static window
        that is when the oldest request's window closes (unless a full batch is already queued); then the rows
        queued at more urgent levels, which strict priority runs first (a full level 3 behind 100 batches of
        level 1 hinted one batch's run); then one batch's run for a lane slot (the run alone was a 1 ms hint
        while the window held the queue 200 ms)."""
        schedule = state.schedule
        cap = schedule.capacity
        wait = 0
        if schedule.max_queue_delay_ns > 0 and state.queued and sum(state.rows_by_level) < cap:
            wait = max(0, self._oldest_ns(state) + schedule.max_queue_delay_ns - now_ns)
        ahead = sum(state.rows_by_level[:level - 1])
        if ahead:
            full, rest = divmod(ahead, cap)
            work = full * state.fit.predict(cap) + (state.fit.predict(rest) if rest else 0)
            wait += ((work // schedule.instances) * state.stretch) >> 10  # as _wait_ahead scales it
        return wait + state.fit.predict(cap)

    def _reject(self, state: _Model, item: WorkItem, reason: int, retry_after_ns: int) -> int:
        key = {REJECT_QUEUE_FULL: "rejected_queue_full", REJECT_TENANT_FULL: "rejected_tenant_full",
               REJECT_DEADLINE: "rejected_deadline"}[reason]
        state.counters[key] += 1
        item.retry_after_ns = retry_after_ns
        return reason

    def _wait_ahead(self, state: _Model, level: int, rows: int, now_ns: int) -> int:
        """Predicted ns until a new item at ``level`` with ``rows`` finishes."""
        schedule = state.schedule
        cap = schedule.capacity
        total = rows
        for index in range(level):
            total += state.rows_by_level[index]
        full, rest = divmod(total, cap)
        work = full * state.fit.predict(cap)
        if rest:
            work += state.fit.predict(rest)
        busy = 0
        if state.in_flight >= schedule.instances and state.busy_until > now_ns:
            busy = state.busy_until - now_ns
        return ((busy + work // schedule.instances) * state.stretch) >> 10  # stretch: fixed point, 1024 = 1.0

    def _unqueue(self, state: _Model, item: WorkItem) -> None:
        del state.arrivals[item]
        state.queued -= 1
        state.queued_by_level[item.level - 1] -= 1
        state.rows_by_level[item.level - 1] -= item.rows
        if state.track_tenants and item.tenant:
            left = state.tenants[item.tenant] - 1
            if left:
                state.tenants[item.tenant] = left
            else:
                del state.tenants[item.tenant]
        self._queued -= 1

    def cancel(self, item: WorkItem, expired: bool = False) -> bool:
        """Drop a queued item (``expired``: its deadline passed, counted as such)."""
        # Lazy removal: the heap entry stays and is skipped when reached.
        if item.state != ITEM_QUEUED:
            return False
        state = self._models.get(item.model)
        if state is None:
            return False
        item.state = ITEM_EXPIRED if expired else ITEM_CANCELLED
        state.counters["expired" if expired else "cancelled"] += 1
        self._unqueue(state, item)
        return True

    def has_work(self) -> bool:
        return self._queued > 0

    def load(self, model: object) -> tuple[int, int]:
        state = self._models.get(model)
        return (state.queued, state.in_flight) if state is not None else (0, 0)

    # -- dispatch ----------------------------------------------------------------
    def _clean_head(self, state: _Model, now_ns: int) -> WorkItem | None:
        """The valid head item, dropping cancelled and expired ones on the way."""
        heap = state.heap
        while heap:
            item = heap[0][3]
            if item.state != ITEM_QUEUED:
                heapq.heappop(heap)
                continue
            if item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns:
                heapq.heappop(heap)
                self._expire(state, item)
                continue
            return item
        return None

    def _expire(self, state: _Model, item: WorkItem) -> None:
        self._unqueue(state, item)
        self._mark_expired(state, item)

    def _mark_expired(self, state: _Model, item: WorkItem) -> None:
        """An item already out of the queue expires: counted, and handed back by ``pop_expired``."""
        item.state = ITEM_EXPIRED
        state.counters["expired"] += 1
        self._expired.append(item)

    def _ready_at(self, state: _Model, head: WorkItem, now_ns: int) -> int:
        """``now_ns`` when the model should dispatch now, else when to look again."""
        schedule = state.schedule
        cap = schedule.capacity
        rows = sum(state.rows_by_level)
        if schedule.max_queue_delay_ns > 0:  # static, Triton-like window
            state.batch_limit = schedule.max_batch_size
            limit = self._oldest_ns(state) + schedule.max_queue_delay_ns
            if now_ns >= limit:
                return now_ns  # the window closed: as many rows as a batch takes
            if state.preferred_min and rows >= state.preferred_min:
                size = self._preferred_size(state, head, now_ns)
                if size:
                    state.batch_limit = size
                    return now_ns
            return now_ns if rows >= cap else limit
        if rows >= cap:
            return now_ns
        fit = state.fit
        if not fit.known or state.gap == 0:
            return now_ns
        fixed = int(fit.b)
        if state.gap >= fixed:
            return now_ns  # the next request is not expected before a batch's fixed cost
        limit = self._oldest_ns(state) + fixed
        if now_ns >= limit:
            return now_ns
        wake = now_ns + state.gap
        if wake > limit:
            wake = limit
        if head.deadline_ns != NO_DEADLINE and wake + fit.predict(rows + 1) > head.deadline_ns:
            return now_ns
        return wake

    def _oldest_ns(self, state: _Model) -> int:
        """When the oldest queued item of ``state`` was enqueued (some item is queued)."""
        return next(iter(state.arrivals.values()))

    def _preferred_size(self, state: _Model, head: WorkItem, now_ns: int) -> int:
        """The largest preferred size the batch ``_take`` would form now can stop at exactly, else 0.

        Walks the heap in its order without popping (the next entry is the least child of those already
        seen), skipping what ``_take`` would drop, and stops where ``_take`` would stop: another shape, or
        ``max_batch_size`` rows."""
        heap = state.heap  # heap[0] is head: _clean_head made it so
        size = len(heap)
        preferred = state.preferred
        largest = state.preferred_max
        limit = state.schedule.max_batch_size
        rows = head.rows
        best = rows if rows in preferred else 0
        frontier: list[tuple[tuple, int]] = []
        index = 0
        while best < largest:
            child = 2 * index + 1
            if child < size:
                heapq.heappush(frontier, (heap[child], child))
                if child + 1 < size:
                    heapq.heappush(frontier, (heap[child + 1], child + 1))
            if not frontier:
                break
            entry, index = heapq.heappop(frontier)
            item = entry[3]
            if item.state != ITEM_QUEUED or (item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns):
                continue
            if item.shape_key != head.shape_key or rows + item.rows > limit:
                break
            rows += item.rows
            if rows in preferred:
                best = rows
        return best

    def _take(self, state: _Model, head: WorkItem, now_ns: int) -> Batch | None:
        heap = state.heap
        heapq.heappop(heap)
        chosen = [head]
        rows = head.rows
        if state.schedule.max_batch_size > 0:
            limit = state.batch_limit
            while True:
                item = self._clean_head(state, now_ns)
                if item is None or item.shape_key != head.shape_key or rows + item.rows > limit:
                    break
                heapq.heappop(heap)
                chosen.append(item)
                rows += item.rows
        for item in chosen:
            item.state = ITEM_BATCHED
            self._unqueue(state, item)
        predicted = state.fit.predict(rows)
        end = now_ns + predicted
        late = [item for item in chosen if item.deadline_ns != NO_DEADLINE and item.deadline_ns < end]
        if late:
            # Predicted to finish after their deadlines: expired now, never run (their compute would be
            # answered DEADLINE_EXCEEDED anyway, and under overload it is the others' time).
            for item in late:
                self._mark_expired(state, item)
                rows -= item.rows
            state.counters["expired_predicted"] += len(late)  # (of "expired": these never reached their deadline)
            chosen = [item for item in chosen if item.state != ITEM_EXPIRED]
            if not chosen:
                return None
            predicted = state.fit.predict(rows)
        state.in_flight += 1
        state.counters["batches"] += 1
        state.counters["rows"] += rows
        self._stretch_sample(state, now_ns, predicted)
        end = now_ns + predicted
        if end > state.busy_until:
            state.busy_until = end
        self._vclock = state.vtime
        return Batch(state.key, chosen, rows)

    def _stretch_sample(self, state: _Model, now_ns: int, predicted: int) -> None:
        """At a dispatch: the time since the model's previous one, if a full batch was left waiting then,
        against that batch's predicted time (per instance) updates the service stretch."""
        if state.last_backlogged and state.last_predicted > 0:
            sample = ((now_ns - state.last_start) * state.schedule.instances << 10) // state.last_predicted
            if sample > STRETCH_MAX:
                sample = STRETCH_MAX  # one stall moves the estimate by at most an eighth of the cap
            stretch = state.stretch + ((sample - state.stretch) >> STRETCH_EWMA_SHIFT)
            state.stretch = STRETCH_ONE if stretch < STRETCH_ONE else stretch
        state.last_start = now_ns
        state.last_predicted = predicted
        state.last_backlogged = sum(state.rows_by_level) >= state.schedule.capacity

    def next_batches(self, now_ns: int, limit: int = 1, max_level: int = 0) -> list[Batch]:
        """Up to ``limit`` batches ready now; ``max_level`` > 0 keeps to heads at that level or more urgent."""
        batches: list[Batch] = []
        while len(batches) < limit and self._queued:
            best = best_head = None
            best_key = None
            for state in self._order:
                if state.queued == 0 or state.in_flight >= state.schedule.instances:
                    continue
                head = self._clean_head(state, now_ns)
                if head is None or (max_level and head.level > max_level):
                    continue
                if self._ready_at(state, head, now_ns) > now_ns:
                    continue
                key = (head.level, state.vtime, state.index)
                if best_key is None or key < best_key:
                    best, best_head, best_key = state, head, key
            if best is None:
                break
            batch = self._take(best, best_head, now_ns)
            if batch is not None:  # None: every item of it was predicted late and expired; look again
                batches.append(batch)
        return batches

    def start(self, batch: Batch, now_ns: int) -> bool:
        """``batch`` (of ``next_batches``) starts to run at ``now_ns``. Its items whose deadline has passed since
        it was formed are expired (``pop_expired`` hands them back) and taken out of it: its thread may have
        waited since (answering the expiries found with it, for the GIL), and a request whose deadline passed
        before it ran must never run. False when none is left: the batch is over, not run, not to be completed."""
        state = self._models.get(batch.model)
        if state is None:
            return True
        late = [item for item in batch.items if item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns]
        if not late:
            return True
        dropped = 0
        for item in late:
            self._mark_expired(state, item)
            dropped += item.rows
        batch.items = [item for item in batch.items if item.state != ITEM_EXPIRED]
        batch.rows -= dropped
        state.counters["rows"] -= dropped  # (the stats count what ran)
        if batch.items:
            return True
        state.in_flight -= 1
        state.counters["batches"] -= 1
        return False

    def complete(self, batch: Batch, duration_ns: int, held_ns: int = -1) -> None:
        """``batch`` ran: the latency fit learns ``duration_ns`` (its run); fair share charges ``held_ns``, the
        lane time it held its slot (-1: the same), which is more for a failed batch retried one by one.
        ``duration_ns`` -1: the run was stopped part-way (scheduling/stopping.py), nothing for the fit to learn."""
        state = self._models.get(batch.model)
        if state is None:
            return
        state.in_flight -= 1
        if duration_ns >= 0:
            state.fit.add(batch.rows, duration_ns)
        state.vtime += (duration_ns if held_ns < 0 else held_ns) / state.schedule.weight

    def next_wakeup(self, now_ns: int, max_level: int = 0) -> int | None:
        """When the next batch will be ready (ns); ``max_level`` > 0: of heads at that level or more urgent."""
        wake = None
        for state in self._order:
            if state.queued == 0 or state.in_flight >= state.schedule.instances:
                continue
            head = self._clean_head(state, now_ns)
            if head is None or (max_level and head.level > max_level):
                continue
            at = self._ready_at(state, head, now_ns)
            if wake is None or at < wake:
                wake = at
        return wake

    def pop_expired(self) -> list[WorkItem]:
        expired, self._expired = self._expired, []
        return expired

    def stats(self) -> dict:
        models = {}
        for state in self._order:
            models[state.key] = {
                **state.counters,
                "queued": state.queued,
                "in_flight": state.in_flight,
                "fit_ns_per_row": state.fit.a,
                "fit_ns_fixed": state.fit.b,
                "service_stretch": state.stretch / STRETCH_ONE,
            }
        return {"scheduler": self.name, "queued": self._queued, "models": models}
