# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=False
#
# The compiled scheduler core. It is a line-by-line twin of
# kernel/scheduling/reference.py, whose module docstring describes the
# algorithm; read that first. What differs here is only representation:
#
# - WorkItem and Batch are extension types here, so the fields the
#   scheduler reads are C struct members, not Python attribute lookups;
# - the heap is a list of WorkItem with heapq's algorithm on typed items;
# - the latency fit keeps its window in C arrays.
#
# Integer arithmetic uses Python semantics (cdivision=False) and the float
# operations run in the reference's order (and setup.py turns off FMA
# contraction), so both implementations produce the same plans; the
# differential hypothesis test holds them to it.

cimport cython

include "consts.pxi"

# Exposed so a test can check these agree with kernel/scheduling/policy.py.
CONSTANTS = {
    "LATENCY_WINDOW": LATENCY_WINDOW,
    "MAX_OBSERVED_NS": MAX_OBSERVED_NS,
    "ARRIVAL_EWMA_SHIFT": ARRIVAL_EWMA_SHIFT,
    "NO_DEADLINE": NO_DEADLINE,
    "DEADLINE_NEVER": DEADLINE_NEVER,
    "ADMITTED": ADMITTED,
    "REJECT_QUEUE_FULL": REJECT_QUEUE_FULL,
    "REJECT_TENANT_FULL": REJECT_TENANT_FULL,
    "REJECT_DEADLINE": REJECT_DEADLINE,
    "ITEM_QUEUED": ITEM_QUEUED,
    "ITEM_BATCHED": ITEM_BATCHED,
    "ITEM_CANCELLED": ITEM_CANCELLED,
    "ITEM_EXPIRED": ITEM_EXPIRED,
    "ITEM_NEW": ITEM_NEW,
    "MAX_PRIORITY_LEVELS": MAX_PRIORITY_LEVELS,
}


@cython.freelist(256)
cdef class WorkItem:
    def __init__(self, model, long long rows, shape_key, inputs, request_id, long long priority=1,
                 long long deadline_ns=NO_DEADLINE, on_done=None, tenant=""):
        self.model = model
        self.rows = rows
        self.shape_key = shape_key
        self.priority = priority
        self.deadline_ns = deadline_ns
        self.tenant = tenant
        self.inputs = inputs
        self.request_id = request_id
        self.state = ITEM_NEW
        self.on_done = on_done
        self.timings = _ZERO_TIMINGS


@cython.freelist(64)
cdef class Batch:
    def __init__(self, model, list items, long long rows):
        self.model = model
        self.items = items
        self.rows = rows
        self.timings = _ZERO_TIMINGS


cdef tuple _ZERO_TIMINGS = (0, 0, 0)


cdef inline bint _lt(WorkItem x, WorkItem y) noexcept:
    if x.level != y.level:
        return x.level < y.level
    if x.sched_key != y.sched_key:
        return x.sched_key < y.sched_key
    return x.sched_seq < y.sched_seq


cdef void _sift_down(list heap, Py_ssize_t start, Py_ssize_t pos) except *:
    # heapq._siftdown: move heap[pos] up towards start.
    cdef WorkItem new = <WorkItem>heap[pos]
    cdef WorkItem parent
    cdef Py_ssize_t parentpos
    while pos > start:
        parentpos = (pos - 1) >> 1
        parent = <WorkItem>heap[parentpos]
        if _lt(new, parent):
            heap[pos] = parent
            pos = parentpos
            continue
        break
    heap[pos] = new


cdef void _sift_up(list heap, Py_ssize_t pos) except *:
    # heapq._siftup: bubble the smaller child up, then place heap[pos].
    cdef Py_ssize_t endpos = len(heap)
    cdef Py_ssize_t startpos = pos
    cdef WorkItem new = <WorkItem>heap[pos]
    cdef Py_ssize_t childpos = 2 * pos + 1
    cdef Py_ssize_t rightpos
    while childpos < endpos:
        rightpos = childpos + 1
        if rightpos < endpos and not _lt(<WorkItem>heap[childpos], <WorkItem>heap[rightpos]):
            childpos = rightpos
        heap[pos] = heap[childpos]
        pos = childpos
        childpos = 2 * pos + 1
    heap[pos] = new
    _sift_down(heap, startpos, pos)


cdef inline void _push(list heap, WorkItem e) except *:
    heap.append(e)
    _sift_down(heap, 0, len(heap) - 1)


cdef WorkItem _pop(list heap):
    cdef WorkItem last = <WorkItem>heap.pop()
    cdef WorkItem top
    if heap:
        top = <WorkItem>heap[0]
        heap[0] = last
        _sift_up(heap, 0)
        return top
    return last


cdef class _ModelQ:
    def __cinit__(self, object key, int index, object schedule):
        cdef int level
        self.key = key
        self.index = index
        self.schedule = schedule
        self.max_batch_size = schedule.max_batch_size
        self.capacity = schedule.capacity
        self.instances = schedule.instances
        self.levels = schedule.priority_levels
        if not 1 <= self.levels <= MAX_PRIORITY_LEVELS:
            raise ValueError(f"priority_levels must be 1..{MAX_PRIORITY_LEVELS}, got {self.levels}")
        self.max_queue = schedule.max_queue
        self.max_tenant_queue = schedule.max_tenant_queue
        self.max_queue_delay_ns = schedule.max_queue_delay_ns
        self.preferred = tuple(schedule.preferred_batch_sizes)
        self.weight = schedule.weight
        self.track_tenants = self.max_tenant_queue < self.max_queue
        self.heap = []
        self.tenants = {}
        for level in range(MAX_PRIORITY_LEVELS):
            self.rows_by_level[level] = 0

    cdef void fit_add(self, long long rows, long long duration_ns):
        cdef int slot
        cdef long long count, den, old_n, old_d
        if duration_ns < 0:
            duration_ns = 0
        if duration_ns > MAX_OBSERVED_NS:
            duration_ns = MAX_OBSERVED_NS
        if self.win_count == LATENCY_WINDOW:
            old_n = self.win_n[self.win_start]
            old_d = self.win_d[self.win_start]
            self.sum_n -= old_n
            self.sum_d -= old_d
            self.sum_nn -= old_n * old_n
            self.sum_nd -= old_n * old_d
            self.win_start = (self.win_start + 1) % LATENCY_WINDOW
            self.win_count -= 1
        slot = (self.win_start + self.win_count) % LATENCY_WINDOW
        self.win_n[slot] = rows
        self.win_d[slot] = duration_ns
        self.win_count += 1
        self.sum_n += rows
        self.sum_d += duration_ns
        self.sum_nn += rows * rows
        self.sum_nd += rows * duration_ns
        count = self.win_count
        den = count * self.sum_nn - self.sum_n * self.sum_n
        if den > 0:
            self.a = <double>(count * self.sum_nd - self.sum_n * self.sum_d) / <double>den
            if self.a < 0.0:
                self.a = 0.0
            self.b = (<double>self.sum_d - self.a * <double>self.sum_n) / <double>count
        else:
            self.a = 0.0
            self.b = <double>self.sum_d / <double>count
        if self.b < 0.0:
            self.b = 0.0

    cdef long long predict(self, long long rows):
        cdef double value
        if self.win_count == 0:
            return 0
        value = self.a * <double>rows + self.b
        return <long long>value if value > 0.0 else 0

    cdef long long total_rows(self):
        cdef long long total = 0
        cdef int level
        for level in range(self.levels):
            total += self.rows_by_level[level]
        return total


cdef class CythonScheduler:
    name = "cython"
    item_class = WorkItem  # the core reads its own WorkItem's fields directly

    def __cinit__(self):
        self._models = {}
        self._order = []
        self._expired = []
        self._queued = 0
        self._seq = 0
        self._vclock = 0.0

    # -- models -------------------------------------------------------------
    def add_model(self, model, schedule):
        if model not in self._models:
            m = _ModelQ(model, len(self._order), schedule)
            self._models[model] = m
            self._order.append(m)

    def remove_model(self, model):
        cdef _ModelQ m = self._models.pop(model, None)
        cdef WorkItem item
        if m is None:
            return []
        self._order.remove(m)
        left = [item for item in m.heap if item.state == ITEM_QUEUED]
        left.sort(key=_sort_key)
        for item in left:
            item.state = ITEM_CANCELLED
        self._queued -= m.queued
        return left

    def observe(self, model, long long rows, long long duration_ns):
        (<_ModelQ>self._models[model]).fit_add(rows, duration_ns)

    def predict(self, model, long long rows):
        return (<_ModelQ>self._models[model]).predict(rows)

    # -- queueing ------------------------------------------------------------
    def submit(self, WorkItem item, long long now_ns):
        cdef _ModelQ m = <_ModelQ>self._models[item.model]
        cdef long long priority = item.priority
        cdef int level = <int>(1 if priority < 1 else (m.levels if priority > m.levels else priority))
        cdef long long deadline = item.deadline_ns
        cdef long long gap, finish
        m.submitted += 1
        if m.queued >= m.max_queue:
            return self._reject(m, item, REJECT_QUEUE_FULL, m.predict(m.capacity))
        if m.track_tenants and item.tenant and m.tenants.get(item.tenant, 0) >= m.max_tenant_queue:
            return self._reject(m, item, REJECT_TENANT_FULL, m.predict(m.capacity))
        if deadline != NO_DEADLINE and m.win_count >= 2:
            finish = now_ns + self._wait_ahead(m, level, item.rows, now_ns)
            if finish > deadline:
                return self._reject(m, item, REJECT_DEADLINE, finish - now_ns)
        if m.last_arrival:
            gap = now_ns - m.last_arrival
            m.gap = gap if m.gap == 0 else m.gap + ((gap - m.gap) >> ARRIVAL_EWMA_SHIFT)
        m.last_arrival = now_ns
        if m.queued == 0 and m.in_flight == 0 and m.vtime < self._vclock:
            m.vtime = self._vclock
        self._seq += 1
        item.level = level
        item.sched_key = deadline if deadline != NO_DEADLINE else DEADLINE_NEVER
        item.sched_seq = self._seq
        item.state = ITEM_QUEUED
        _push(m.heap, item)
        m.queued += 1
        m.rows_by_level[level - 1] += item.rows
        if m.track_tenants and item.tenant:
            m.tenants[item.tenant] = m.tenants.get(item.tenant, 0) + 1
        self._queued += 1
        return ADMITTED

    cdef int _reject(self, _ModelQ m, WorkItem item, int reason, long long retry_after_ns) except -1:
        if reason == REJECT_QUEUE_FULL:
            m.rejected_queue_full += 1
        elif reason == REJECT_TENANT_FULL:
            m.rejected_tenant_full += 1
        else:
            m.rejected_deadline += 1
        item.retry_after_ns = retry_after_ns
        return reason

    cdef long long _wait_ahead(self, _ModelQ m, int level, long long rows, long long now_ns):
        cdef long long total = rows
        cdef long long full, rest, work, busy
        cdef int index
        for index in range(level):
            total += m.rows_by_level[index]
        full = total // m.capacity
        rest = total % m.capacity
        work = full * m.predict(m.capacity)
        if rest:
            work += m.predict(rest)
        busy = 0
        if m.in_flight >= m.instances and m.busy_until > now_ns:
            busy = m.busy_until - now_ns
        return busy + work // m.instances

    cdef void _unqueue(self, _ModelQ m, WorkItem item) except *:
        m.queued -= 1
        m.rows_by_level[item.level - 1] -= item.rows
        if m.track_tenants and item.tenant:
            left = m.tenants[item.tenant] - 1
            if left:
                m.tenants[item.tenant] = left
            else:
                del m.tenants[item.tenant]
        self._queued -= 1

    def cancel(self, WorkItem item, bint expired=False):
        cdef _ModelQ m
        if item.state != ITEM_QUEUED:
            return False
        m = self._models.get(item.model)
        if m is None:
            return False
        item.state = ITEM_EXPIRED if expired else ITEM_CANCELLED
        if expired:
            m.expired += 1
        else:
            m.cancelled += 1
        self._unqueue(m, item)
        return True

    def has_work(self):
        return self._queued > 0

    def load(self, model):
        cdef _ModelQ m = self._models.get(model)
        if m is None:
            return (0, 0)
        return (m.queued, m.in_flight)

    # -- dispatch ------------------------------------------------------------
    cdef WorkItem _clean_head(self, _ModelQ m, long long now_ns):
        cdef list heap = m.heap
        cdef WorkItem item
        while heap:
            item = <WorkItem>heap[0]
            if item.state != ITEM_QUEUED:
                _pop(heap)
                continue
            if item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns:
                _pop(heap)
                self._expire(m, item)
                continue
            return item
        return None

    cdef void _expire(self, _ModelQ m, WorkItem item) except *:
        item.state = ITEM_EXPIRED
        m.expired += 1
        self._unqueue(m, item)
        self._expired.append(item)

    cdef long long _ready_at(self, _ModelQ m, WorkItem head, long long now_ns):
        cdef long long rows = m.total_rows()
        cdef long long limit, fixed, wake
        if rows >= m.capacity:
            return now_ns
        if m.max_queue_delay_ns > 0:
            if rows in m.preferred:
                return now_ns
            limit = head.enqueued_ns + m.max_queue_delay_ns
            return now_ns if now_ns >= limit else limit
        if m.win_count < 2 or m.gap == 0:
            return now_ns
        fixed = <long long>m.b
        if m.gap >= fixed:
            return now_ns
        limit = head.enqueued_ns + fixed
        if now_ns >= limit:
            return now_ns
        wake = now_ns + m.gap
        if wake > limit:
            wake = limit
        if head.deadline_ns != NO_DEADLINE and wake + m.predict(rows + 1) > head.deadline_ns:
            return now_ns
        return wake

    cdef Batch _take(self, _ModelQ m, WorkItem head, long long now_ns):
        cdef list heap = m.heap
        cdef WorkItem item
        cdef long long rows = head.rows
        cdef long long end
        cdef Batch batch
        _pop(heap)
        chosen = [head]
        if m.max_batch_size > 0:
            while True:
                item = self._clean_head(m, now_ns)
                if item is None or rows + item.rows > m.max_batch_size or item.shape_key != head.shape_key:
                    break
                _pop(heap)
                chosen.append(item)
                rows += item.rows
        for item in chosen:
            item.state = ITEM_BATCHED
            self._unqueue(m, item)
        m.in_flight += 1
        m.batches += 1
        m.rows += rows
        end = now_ns + m.predict(rows)
        if end > m.busy_until:
            m.busy_until = end
        self._vclock = m.vtime
        batch = Batch.__new__(Batch)
        batch.model = m.key
        batch.items = chosen
        batch.rows = rows
        batch.timings = _ZERO_TIMINGS
        return batch

    def next_batches(self, long long now_ns, Py_ssize_t limit=1, int max_level=0):
        cdef list batches = []
        cdef _ModelQ m, best
        cdef WorkItem head, best_head
        while len(batches) < limit and self._queued:
            best = None
            best_head = None
            for m in self._order:
                if m.queued == 0 or m.in_flight >= m.instances:
                    continue
                head = self._clean_head(m, now_ns)
                if head is None or (max_level and head.level > max_level):
                    continue
                if self._ready_at(m, head, now_ns) > now_ns:
                    continue
                if best is None or head.level < best_head.level or (
                    head.level == best_head.level and (
                        m.vtime < best.vtime or (m.vtime == best.vtime and m.index < best.index)
                    )
                ):
                    best = m
                    best_head = head
            if best is None:
                break
            batches.append(self._take(best, best_head, now_ns))
        return batches

    def complete(self, batch, long long duration_ns):
        cdef _ModelQ m = self._models.get(batch.model)
        if m is None:
            return
        m.in_flight -= 1
        m.fit_add(batch.rows, duration_ns)
        m.vtime += duration_ns / m.weight

    def next_wakeup(self, long long now_ns):
        cdef _ModelQ m
        cdef WorkItem head
        cdef long long at
        wake = None
        for m in self._order:
            if m.queued == 0 or m.in_flight >= m.instances:
                continue
            head = self._clean_head(m, now_ns)
            if head is None:
                continue
            at = self._ready_at(m, head, now_ns)
            if wake is None or at < wake:
                wake = at
        return wake

    def pop_expired(self):
        expired = self._expired
        self._expired = []
        return expired

    def stats(self):
        cdef _ModelQ m
        models = {}
        for m in self._order:
            models[m.key] = {
                "submitted": m.submitted,
                "rejected_queue_full": m.rejected_queue_full,
                "rejected_tenant_full": m.rejected_tenant_full,
                "rejected_deadline": m.rejected_deadline,
                "expired": m.expired,
                "cancelled": m.cancelled,
                "batches": m.batches,
                "rows": m.rows,
                "queued": m.queued,
                "in_flight": m.in_flight,
                "fit_ns_per_row": m.a,
                "fit_ns_fixed": m.b,
            }
        return {"scheduler": self.name, "queued": self._queued, "models": models}


def _sort_key(WorkItem item):
    return (item.level, item.sched_key, item.sched_seq)
