# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=False
#
# The compiled scheduler core. It is a line-by-line twin of
# kernel/scheduling/reference.py, whose module docstring describes the
# algorithm; read that first. What differs here is only representation:
#
# - each queued item gets an _Entry holding the fields the scheduler reads
#   (copied once at submit), so heap comparisons and scans are C
#   comparisons instead of Python attribute lookups;
# - the heap is a list of _Entry with heapq's algorithm on typed entries;
# - the latency fit keeps its window in C arrays.
#
# Integer arithmetic uses Python semantics (cdivision=False) and the float
# operations run in the reference's order (and setup.py turns off FMA
# contraction), so both implementations produce the same plans; the
# differential hypothesis test holds them to it.

cimport cython

include "consts.pxi"

from kernel.scheduling.types import Batch as _Batch

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
    "MAX_PRIORITY_LEVELS": MAX_PRIORITY_LEVELS,
}


@cython.freelist(256)
cdef class _Entry:
    pass


cdef inline bint _lt(_Entry x, _Entry y) noexcept:
    if x.level != y.level:
        return x.level < y.level
    if x.key != y.key:
        return x.key < y.key
    return x.seq < y.seq


cdef void _sift_down(list heap, Py_ssize_t start, Py_ssize_t pos) except *:
    # heapq._siftdown: move heap[pos] up towards start.
    cdef _Entry new = <_Entry>heap[pos]
    cdef _Entry parent
    cdef Py_ssize_t parentpos
    while pos > start:
        parentpos = (pos - 1) >> 1
        parent = <_Entry>heap[parentpos]
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
    cdef _Entry new = <_Entry>heap[pos]
    cdef Py_ssize_t childpos = 2 * pos + 1
    cdef Py_ssize_t rightpos
    while childpos < endpos:
        rightpos = childpos + 1
        if rightpos < endpos and not _lt(<_Entry>heap[childpos], <_Entry>heap[rightpos]):
            childpos = rightpos
        heap[pos] = heap[childpos]
        pos = childpos
        childpos = 2 * pos + 1
    heap[pos] = new
    _sift_down(heap, startpos, pos)


cdef inline void _push(list heap, _Entry e) except *:
    heap.append(e)
    _sift_down(heap, 0, len(heap) - 1)


cdef _Entry _pop(list heap):
    cdef _Entry last = <_Entry>heap.pop()
    cdef _Entry top
    if heap:
        top = <_Entry>heap[0]
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
        cdef _Entry e
        if m is None:
            return []
        self._order.remove(m)
        left = [e for e in m.heap if e.state == ITEM_QUEUED]
        left.sort(key=_sort_key)
        for e in left:
            e.state = ITEM_CANCELLED
            e.item.state = ITEM_CANCELLED
        self._queued -= m.queued
        return [e.item for e in left]

    def observe(self, model, long long rows, long long duration_ns):
        (<_ModelQ>self._models[model]).fit_add(rows, duration_ns)

    def predict(self, model, long long rows):
        return (<_ModelQ>self._models[model]).predict(rows)

    # -- queueing ------------------------------------------------------------
    def submit(self, item, long long now_ns):
        cdef _ModelQ m = <_ModelQ>self._models[item.model]
        cdef long long priority = item.priority
        cdef int level = <int>(1 if priority < 1 else (m.levels if priority > m.levels else priority))
        cdef long long rows = item.rows
        cdef long long deadline = item.deadline_ns
        cdef long long gap, finish
        cdef object tenant = item.tenant
        cdef _Entry e
        m.submitted += 1
        if m.queued >= m.max_queue:
            return self._reject(m, item, REJECT_QUEUE_FULL, m.predict(m.capacity))
        if m.tenants.get(tenant, 0) >= m.max_tenant_queue:
            return self._reject(m, item, REJECT_TENANT_FULL, m.predict(m.capacity))
        if deadline != NO_DEADLINE and m.win_count >= 2:
            finish = now_ns + self._wait_ahead(m, level, rows, now_ns)
            if finish > deadline:
                return self._reject(m, item, REJECT_DEADLINE, finish - now_ns)
        if m.last_arrival:
            gap = now_ns - m.last_arrival
            m.gap = gap if m.gap == 0 else m.gap + ((gap - m.gap) >> ARRIVAL_EWMA_SHIFT)
        m.last_arrival = now_ns
        if m.queued == 0 and m.in_flight == 0 and m.vtime < self._vclock:
            m.vtime = self._vclock
        self._seq += 1
        e = _Entry.__new__(_Entry)
        e.item = item
        e.model = m
        e.level = level
        e.key = deadline if deadline != NO_DEADLINE else DEADLINE_NEVER
        e.seq = self._seq
        e.deadline = deadline
        e.enqueued = item.enqueued_ns
        e.rows = rows
        e.shape_key = item.shape_key
        e.tenant = tenant
        e.state = ITEM_QUEUED
        _push(m.heap, e)
        item.state = ITEM_QUEUED
        item.level = level
        item.ticket = e
        m.queued += 1
        m.rows_by_level[level - 1] += rows
        m.tenants[tenant] = m.tenants.get(tenant, 0) + 1
        self._queued += 1
        return ADMITTED

    cdef int _reject(self, _ModelQ m, object item, int reason, long long retry_after_ns) except -1:
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

    cdef void _unqueue(self, _ModelQ m, _Entry e) except *:
        m.queued -= 1
        m.rows_by_level[e.level - 1] -= e.rows
        left = m.tenants[e.tenant] - 1
        if left:
            m.tenants[e.tenant] = left
        else:
            del m.tenants[e.tenant]
        self._queued -= 1

    def cancel(self, item, bint expired=False):
        cdef _Entry e
        if item.state != ITEM_QUEUED:
            return False
        ticket = getattr(item, "ticket", None)
        if ticket is None or not isinstance(ticket, _Entry):
            return False
        e = <_Entry>ticket
        if e.state != ITEM_QUEUED or e.model is None or e.model.key not in self._models:
            return False
        e.state = ITEM_EXPIRED if expired else ITEM_CANCELLED
        item.state = e.state
        if expired:
            e.model.expired += 1
        else:
            e.model.cancelled += 1
        self._unqueue(e.model, e)
        return True

    def has_work(self):
        return self._queued > 0

    def load(self, model):
        cdef _ModelQ m = self._models.get(model)
        if m is None:
            return (0, 0)
        return (m.queued, m.in_flight)

    # -- dispatch ------------------------------------------------------------
    cdef _Entry _clean_head(self, _ModelQ m, long long now_ns):
        cdef list heap = m.heap
        cdef _Entry e
        while heap:
            e = <_Entry>heap[0]
            if e.state != ITEM_QUEUED:
                _pop(heap)
                continue
            if e.deadline != NO_DEADLINE and e.deadline <= now_ns:
                _pop(heap)
                self._expire(m, e)
                continue
            return e
        return None

    cdef void _expire(self, _ModelQ m, _Entry e) except *:
        e.state = ITEM_EXPIRED
        e.item.state = ITEM_EXPIRED
        m.expired += 1
        self._unqueue(m, e)
        self._expired.append(e.item)

    cdef long long _ready_at(self, _ModelQ m, _Entry head, long long now_ns):
        cdef long long rows = m.total_rows()
        cdef long long limit, fixed, wake
        if rows >= m.capacity:
            return now_ns
        if m.max_queue_delay_ns > 0:
            if rows in m.preferred:
                return now_ns
            limit = head.enqueued + m.max_queue_delay_ns
            return now_ns if now_ns >= limit else limit
        if m.win_count < 2 or m.gap == 0:
            return now_ns
        fixed = <long long>m.b
        if m.gap >= fixed:
            return now_ns
        limit = head.enqueued + fixed
        if now_ns >= limit:
            return now_ns
        wake = now_ns + m.gap
        if wake > limit:
            wake = limit
        if head.deadline != NO_DEADLINE and wake + m.predict(rows + 1) > head.deadline:
            return now_ns
        return wake

    cdef object _take(self, _ModelQ m, _Entry head, long long now_ns):
        cdef list heap = m.heap
        cdef _Entry e
        cdef long long rows = head.rows
        cdef long long end
        _pop(heap)
        chosen = [head]
        if m.max_batch_size > 0:
            while heap:
                e = <_Entry>heap[0]
                if e.state != ITEM_QUEUED:
                    _pop(heap)
                    continue
                if e.deadline != NO_DEADLINE and e.deadline <= now_ns:
                    _pop(heap)
                    self._expire(m, e)
                    continue
                if rows + e.rows > m.max_batch_size or e.shape_key != head.shape_key:
                    break
                _pop(heap)
                chosen.append(e)
                rows += e.rows
        items = []
        for e in chosen:
            e.state = ITEM_BATCHED
            e.item.state = ITEM_BATCHED
            self._unqueue(m, e)
            items.append(e.item)
        m.in_flight += 1
        m.batches += 1
        m.rows += rows
        end = now_ns + m.predict(rows)
        if end > m.busy_until:
            m.busy_until = end
        self._vclock = m.vtime
        return _Batch(m.key, items, rows)

    def next_batches(self, long long now_ns, Py_ssize_t limit=1):
        cdef list batches = []
        cdef _ModelQ m, best
        cdef _Entry head, best_head
        while len(batches) < limit and self._queued:
            best = None
            best_head = None
            for m in self._order:
                if m.queued == 0 or m.in_flight >= m.instances:
                    continue
                head = self._clean_head(m, now_ns)
                if head is None or self._ready_at(m, head, now_ns) > now_ns:
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
        cdef _Entry head
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


def _sort_key(_Entry e):
    return (e.level, e.key, e.seq)
