# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=False
#
# The compiled scheduler core. It is a line-by-line twin of
# kernel/scheduling/reference.py, whose module docstring describes the
# algorithm; read that first. What differs here is only representation:
#
# - WorkItem and Batch are extension types here, so the fields the
#   scheduler reads are C struct members, not Python attribute lookups;
# - the reference's one heap of (level, deadline, seq, item) tuples is, per
#   level, a heap of C structs for the items with a deadline and a FIFO ring
#   for those without (scheduler.pxd, _ModelQ): the same order, with no
#   tuple per request and no reference counting while sifting;
# - the reference's arrivals (an OrderedDict of the queued items, removed
#   as they leave) are a ring of C structs per model whose stale entries
#   are dropped lazily from the front, and compacted instead of grown when
#   at least half of a full ring is stale;
# - the preferred sizes are a byte mask, and the walk over the heap in its
#   order (preferred_size) uses a scratch array of indices;
# - the latency fit keeps its window in C arrays.
#
# Integer arithmetic uses Python semantics (cdivision=False) and the float
# operations run in the reference's order (and setup.py turns off FMA
# contraction), so both implementations produce the same plans; the
# differential hypothesis test holds them to it.

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.string cimport memcpy, memset

include "consts.pxi"

cdef extern from *:
    void _prefetch "__builtin_prefetch"(const void* address) noexcept nogil

# A DEF beyond the C int range is a Python int inside Cython expressions
# (every comparison with it would box a long long); the code uses these
# typed copies instead.
cdef long long NEVER_KEY = DEADLINE_NEVER
cdef long long OBSERVED_CAP_NS = MAX_OBSERVED_NS

# Exposed so a test can check these agree with kernel/scheduling/policy.py.
CONSTANTS = {
    "LATENCY_WINDOW": LATENCY_WINDOW,
    "MAX_OBSERVED_NS": MAX_OBSERVED_NS,
    "OUTLIER_FACTOR": OUTLIER_FACTOR,
    "OUTLIER_MIN_SAMPLES": OUTLIER_MIN_SAMPLES,
    "ARRIVAL_EWMA_SHIFT": ARRIVAL_EWMA_SHIFT,
    "STRETCH_ONE": STRETCH_ONE,
    "STRETCH_MAX": STRETCH_MAX,
    "STRETCH_EWMA_SHIFT": STRETCH_EWMA_SHIFT,
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
        self.runs = None


cdef tuple _ZERO_TIMINGS = (0, 0, 0)


# -- the heap -----------------------------------------------------------------
# heapq's algorithm on QEntry structs, one heap per level. Pop order is the
# total order on (level, key, seq) -- seq is unique -- so it matches the
# reference's single heapq of tuples whatever the arrays' layout.

cdef inline bint _before(const QEntry* x, const QEntry* y) noexcept nogil:
    if x.key != y.key:
        return x.key < y.key
    return x.seq < y.seq


cdef inline void _sift_down(QEntry* heap, Py_ssize_t start, Py_ssize_t pos) noexcept nogil:
    # heapq._siftdown: move heap[pos] up towards start.
    cdef QEntry new = heap[pos]
    cdef Py_ssize_t parentpos
    while pos > start:
        parentpos = (pos - 1) >> 1
        if _before(&new, &heap[parentpos]):
            heap[pos] = heap[parentpos]
            pos = parentpos
            continue
        break
    heap[pos] = new


cdef inline void _sift_up(QEntry* heap, Py_ssize_t endpos, Py_ssize_t pos) noexcept nogil:
    # heapq._siftup: bubble the smaller child up to the leaves, then place heap[pos].
    cdef Py_ssize_t startpos = pos
    cdef QEntry new = heap[pos]
    cdef Py_ssize_t childpos = 2 * pos + 1
    cdef Py_ssize_t rightpos
    while childpos < endpos:
        rightpos = childpos + 1
        if rightpos < endpos and not _before(&heap[childpos], &heap[rightpos]):
            childpos = rightpos
        heap[pos] = heap[childpos]
        pos = childpos
        childpos = 2 * pos + 1
    heap[pos] = new
    _sift_down(heap, startpos, pos)


cdef void* _unrolled(void* entries, Py_ssize_t front, Py_ssize_t length, Py_ssize_t cap, Py_ssize_t new_cap,
                     size_t size) except NULL:
    # A ring's entries copied into a new array of new_cap, oldest first; the old array is freed.
    # (One piece for every ring of fixed-size entries: the queue's and the arrivals'.)
    cdef char* fresh = <char*>PyMem_Malloc(new_cap * size)
    cdef Py_ssize_t index
    if fresh == NULL:
        raise MemoryError()
    for index in range(length):
        memcpy(fresh + index * size, <char*>entries + ((front + index) & (cap - 1)) * size, size)
    PyMem_Free(entries)
    return fresh


cdef int _grow_ring(QRing* ring) except -1:
    # Double the ring (or allocate HEAP_INITIAL entries), oldest entry first.
    cdef Py_ssize_t new_cap = ring.cap * 2 if ring.cap else HEAP_INITIAL
    ring.entries = <QEntry*>_unrolled(ring.entries, ring.front, ring.len, ring.cap, new_cap, sizeof(QEntry))
    ring.front = 0
    ring.cap = new_cap
    return 0


cdef int _grow_arrivals(ArrivalRing* ring) except -1:
    # _grow_ring for the arrivals.
    cdef Py_ssize_t new_cap = ring.cap * 2 if ring.cap else HEAP_INITIAL
    ring.entries = <Arrival*>_unrolled(ring.entries, ring.front, ring.len, ring.cap, new_cap, sizeof(Arrival))
    ring.front = 0
    ring.cap = new_cap
    return 0


cdef inline bint _arrival_queued(list slots, const Arrival* arrival) noexcept:
    # Its item is still queued: the slot holds a queued item with its seq
    # (a slot is released only once its item left the queue, and seq is
    # unique, so a reused slot does not match).
    cdef PyObject* held = PyList_GET_ITEM(slots, arrival.slot)
    if held == <PyObject*>None:
        return False
    return (<WorkItem>held).sched_seq == arrival.seq and (<WorkItem>held).state == ITEM_QUEUED


# A binary min-heap of indices into a level's heap, ordered by the entries
# they name: preferred_size's frontier while it walks that heap in order.
cdef inline void _walk_push(Py_ssize_t* walk, Py_ssize_t* count, const QEntry* heap, Py_ssize_t index) noexcept nogil:
    cdef Py_ssize_t pos = count[0]
    cdef Py_ssize_t parentpos
    count[0] += 1
    while pos > 0:
        parentpos = (pos - 1) >> 1
        if _before(&heap[index], &heap[walk[parentpos]]):
            walk[pos] = walk[parentpos]
            pos = parentpos
            continue
        break
    walk[pos] = index


cdef inline Py_ssize_t _walk_pop(Py_ssize_t* walk, Py_ssize_t* count, const QEntry* heap) noexcept nogil:
    cdef Py_ssize_t top = walk[0]
    cdef Py_ssize_t last, pos = 0, childpos
    count[0] -= 1
    if count[0] == 0:
        return top
    last = walk[count[0]]
    childpos = 1
    while childpos < count[0]:
        if childpos + 1 < count[0] and _before(&heap[walk[childpos + 1]], &heap[walk[childpos]]):
            childpos += 1
        if not _before(&heap[walk[childpos]], &heap[last]):
            break
        walk[pos] = walk[childpos]
        pos = childpos
        childpos = 2 * pos + 1
    walk[pos] = last
    return top


cdef int _grow(void** array, Py_ssize_t* cap, size_t item_size) except -1:
    # Double a PyMem array (or allocate HEAP_INITIAL items); *array is kept on failure.
    cdef Py_ssize_t new_cap = cap[0] * 2 if cap[0] else HEAP_INITIAL
    cdef void* grown = PyMem_Realloc(array[0], new_cap * item_size)
    if grown == NULL:
        raise MemoryError()
    array[0] = grown
    cap[0] = new_cap
    return 0


cdef inline long long _queued_at(_ModelQ m, int level) except? -1:
    # The reference's _queued_at: requests queued at ``level`` on m and the other copies of its version.
    cdef long long total = 0
    if m.peers is None:
        return m.queued_by_level[level - 1]
    for peer in m.peers:
        if level <= (<_ModelQ>peer).levels:
            total += (<_ModelQ>peer).queued_by_level[level - 1]
    return total


cdef long long _tenant_queued(_ModelQ m, object tenant) except? -1:
    # The reference's _tenant_queued.
    cdef long long total = 0
    if m.peers is None:
        return m.tenants.get(tenant, 0)
    for peer in m.peers:
        total += (<_ModelQ>peer).tenants.get(tenant, 0)
    return total


# The heaps and rings point at items that `slots` keeps alive, so the
# collector must never empty `slots` (a cycle through a queue is broken at
# its lists and dicts instead).
@cython.no_gc_clear
cdef class _ModelQ:
    def __cinit__(self, object key, int index, object schedule):
        cdef int level
        cdef long long size
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
        self.batch_limit = self.max_batch_size
        self.weight = schedule.weight
        # (max_queue bounds each level, a tenant's bound spans them: kernel/models/config.py)
        self.track_tenants = self.max_tenant_queue < self.max_queue * schedule.priority_levels
        self.slots = []
        self.tenants = {}
        self.stretch = STRETCH_ONE
        for level in range(MAX_PRIORITY_LEVELS):
            self.rows_by_level[level] = 0
            self.queued_by_level[level] = 0
        if self.max_queue_delay_ns > 0 and self.max_batch_size > 0:
            for size in schedule.preferred_batch_sizes:
                if not 0 < size <= self.max_batch_size:
                    continue  # no batch has that many rows
                if self.preferred_mask == NULL:
                    self.preferred_mask = <unsigned char*>PyMem_Malloc(self.max_batch_size + 1)
                    if self.preferred_mask == NULL:
                        raise MemoryError()
                    memset(self.preferred_mask, 0, self.max_batch_size + 1)
                self.preferred_mask[size] = 1
                if self.preferred_min == 0 or size < self.preferred_min:
                    self.preferred_min = size
                if size > self.preferred_max:
                    self.preferred_max = size

    def __dealloc__(self):
        # The items' references are in self.slots, which Python frees itself.
        cdef int level
        for level in range(MAX_PRIORITY_LEVELS):
            PyMem_Free(self.heaps[level].entries)
            PyMem_Free(self.rings[level].entries)
        PyMem_Free(self.free_slots)
        PyMem_Free(self.arrivals.entries)
        PyMem_Free(self.walk)
        PyMem_Free(self.preferred_mask)

    cdef int push(self, WorkItem item) except -1:
        # File item (its level, sched_key and sched_seq set) in its level's
        # heap, or FIFO when it has no deadline.
        cdef QHeap* heap = &self.heaps[item.level - 1]
        cdef QRing* ring = &self.rings[item.level - 1]
        cdef bint fifo = item.sched_key == NEVER_KEY
        cdef Py_ssize_t slot
        cdef PyObject* empty
        cdef QEntry* entry
        cdef Arrival* arrival
        cdef ArrivalRing* arrivals = &self.arrivals
        if arrivals.len == arrivals.cap:  # full: drop the stale entries if half of it is, else grow
            if arrivals.cap and self.queued * 2 <= arrivals.cap:
                self.compact_arrivals()
            else:
                _grow_arrivals(arrivals)
        if fifo:
            if ring.len == ring.cap:
                _grow_ring(ring)
            entry = &ring.entries[(ring.front + ring.len) & (ring.cap - 1)]
        else:
            if heap.len == heap.cap:
                _grow(<void**>&heap.entries, &heap.cap, sizeof(QEntry))
            entry = &heap.entries[heap.len]
        if self.free_len:
            self.free_len -= 1
            slot = self.free_slots[self.free_len]
            empty = PyList_GET_ITEM(self.slots, slot)  # None, released below
            Py_INCREF(item)
            PyList_SET_ITEM(self.slots, slot, item)
            Py_XDECREF(empty)
        else:
            slot = len(self.slots)
            if slot == self.free_cap:  # room to free every slot later, so drop_head cannot fail
                _grow(<void**>&self.free_slots, &self.free_cap, sizeof(Py_ssize_t))
            self.slots.append(item)
        entry.key = item.sched_key
        entry.seq = item.sched_seq
        entry.item = <PyObject*>item
        entry.slot = slot
        if fifo:
            ring.len += 1
        else:
            heap.len += 1
            _sift_down(heap.entries, 0, heap.len - 1)
        arrival = &arrivals.entries[(arrivals.front + arrivals.len) & (arrivals.cap - 1)]
        arrival.enqueued_ns = item.enqueued_ns
        arrival.seq = item.sched_seq
        arrival.slot = slot
        arrivals.len += 1
        return 0

    cdef inline QEntry* level_head(self, int level) noexcept:
        # The first entry of `level` (1-based), or NULL when it is empty.
        cdef QHeap* heap = &self.heaps[level - 1]
        cdef QRing* ring
        if heap.len:
            return &heap.entries[0]
        ring = &self.rings[level - 1]
        if ring.len:
            return &ring.entries[ring.front]
        return NULL

    cdef void drop_head(self, int level) noexcept:
        # Remove level_head(level) and release its slot. The caller holds
        # its own reference to the item if it still needs it.
        cdef QHeap* heap = &self.heaps[level - 1]
        cdef QRing* ring
        cdef Py_ssize_t slot
        cdef PyObject* item
        if heap.len:
            slot = heap.entries[0].slot
            heap.len -= 1
            if heap.len:
                heap.entries[0] = heap.entries[heap.len]
                _sift_up(heap.entries, heap.len, 0)
        else:
            ring = &self.rings[level - 1]
            slot = ring.entries[ring.front].slot
            ring.front = (ring.front + 1) & (ring.cap - 1)
            ring.len -= 1
            if ring.len:
                # The new front has waited longest of all, so it is the item
                # least likely to be in cache; the next look at this level
                # reads its first fields (WorkItem puts the ones read there).
                _prefetch(ring.entries[ring.front].item)
        item = PyList_GET_ITEM(self.slots, slot)
        self.free_slots[self.free_len] = slot
        self.free_len += 1
        Py_INCREF(None)
        PyList_SET_ITEM(self.slots, slot, None)
        Py_XDECREF(item)

    cdef void compact_arrivals(self) noexcept:
        # Keep only the arrivals of queued items, in order (push calls it when
        # the ring is full and at least half of it stale: amortized O(1)).
        cdef ArrivalRing* ring = &self.arrivals
        cdef Py_ssize_t mask = ring.cap - 1
        cdef Py_ssize_t read, kept = 0
        cdef Arrival* arrival
        for read in range(ring.len):
            arrival = &ring.entries[(ring.front + read) & mask]
            if _arrival_queued(self.slots, arrival):
                ring.entries[(ring.front + kept) & mask] = arrival[0]
                kept += 1
        ring.len = kept

    cdef long long oldest_ns(self) noexcept:
        # The reference's _oldest_ns: the enqueued_ns of the oldest queued
        # item (the caller knows one is queued), dropping stale arrivals.
        cdef ArrivalRing* ring = &self.arrivals
        while ring.len:
            if _arrival_queued(self.slots, &ring.entries[ring.front]):
                return ring.entries[ring.front].enqueued_ns
            ring.front = (ring.front + 1) & (ring.cap - 1)
            ring.len -= 1
        return 0

    cdef long long preferred_size(self, WorkItem head, long long now_ns) except -1:
        # The reference's _preferred_size: the largest preferred size the
        # batch _take would form now can stop at exactly, else 0. Visits the
        # items _take would take, in its order, taking none: levels before
        # head's are empty (_clean_head), and within a level the heap (walked
        # in order through a frontier of indices) comes before the FIFO.
        cdef long long rows = 0
        cdef long long best = 0
        cdef int level
        cdef QHeap* heap
        cdef QRing* ring
        cdef Py_ssize_t count, index, childpos, offset
        for level in range(head.level, self.levels + 1):
            heap = &self.heaps[level - 1]
            if heap.len:
                while self.walk_cap < heap.len:  # the frontier never holds more than the heap
                    _grow(<void**>&self.walk, &self.walk_cap, sizeof(Py_ssize_t))
                count = 0
                _walk_push(self.walk, &count, heap.entries, 0)
                while count:
                    index = _walk_pop(self.walk, &count, heap.entries)
                    childpos = 2 * index + 1
                    if childpos < heap.len:
                        _walk_push(self.walk, &count, heap.entries, childpos)
                        if childpos + 1 < heap.len:
                            _walk_push(self.walk, &count, heap.entries, childpos + 1)
                    if self.walk_step(&heap.entries[index], head, now_ns, &rows, &best):
                        return best
            ring = &self.rings[level - 1]
            for offset in range(ring.len):
                if self.walk_step(&ring.entries[(ring.front + offset) & (ring.cap - 1)], head, now_ns, &rows, &best):
                    return best
        return best

    cdef int walk_step(self, QEntry* entry, WorkItem head, long long now_ns, long long* rows,
                       long long* best) except -1:
        # One item of preferred_size's walk: 1 where _take would stop before
        # it (or the largest preferred size is reached), else 0.
        cdef WorkItem item = <WorkItem>entry.item
        if item.state != ITEM_QUEUED or (item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns):
            return 0  # _take drops it
        if item is not head and (
            rows[0] + item.rows > self.max_batch_size or not _same_shape(item.shape_key, head.shape_key)
        ):
            return 1
        rows[0] += item.rows
        if 0 < rows[0] <= self.max_batch_size and self.preferred_mask[rows[0]]:
            best[0] = rows[0]
            if rows[0] >= self.preferred_max:
                return 1
        return 0

    # Divisors here are positive (den > 0, count >= 1) and the operands of %
    # non-negative, where C and Python arithmetic agree; C's needs no checks.
    @cython.cdivision(True)
    cdef void fit_add(self, long long rows, long long duration_ns) noexcept:
        cdef int slot
        cdef long long count, den, old_n, old_d, cap
        if duration_ns < 0:
            duration_ns = 0
        if duration_ns > OBSERVED_CAP_NS:
            duration_ns = OBSERVED_CAP_NS
        if self.win_count >= OUTLIER_MIN_SAMPLES:  # (kernel/scheduling/policy.py says why)
            cap = self.predict(rows) * OUTLIER_FACTOR
            if 0 < cap < duration_ns:
                duration_ns = cap
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

    cdef long long predict(self, long long rows) noexcept:
        cdef double value
        if self.win_count == 0:
            return 0
        value = self.a * <double>rows + self.b
        return <long long>value if value > 0.0 else 0


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

    cdef _ModelQ _queue_of(self, object model):
        # self._models[model], through a one-entry cache (identity implies the
        # dict's equality). None for an unknown model.
        cdef _ModelQ m
        if model is self._last_key and self._last_q is not None:
            return self._last_q
        m = self._models.get(model)
        if m is not None:
            self._last_key = model
            self._last_q = m
        return m

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
        if m is self._last_q:
            self._last_key = None
            self._last_q = None
        self._order.remove(m)
        if m.peers is not None:
            m.peers.remove(m)
            if len(m.peers) == 1:
                (<_ModelQ>m.peers[0]).peers = None
            m.peers = None
        left = [item for item in m.slots if item is not None and (<WorkItem>item).state == ITEM_QUEUED]
        left.sort(key=_sort_key)
        for item in left:
            item.state = ITEM_CANCELLED
        self._queued -= m.queued
        return left

    def share_bounds(self, model, other):
        # The reference's share_bounds: copies of one model version count each other's queued requests against
        # their queue bounds, until one is removed.
        cdef _ModelQ m = self._models[model]
        cdef _ModelQ peer = self._models[other]
        group = peer.peers if peer.peers is not None else [peer]
        for joining in (m.peers if m.peers is not None else [m]):
            if joining not in group:
                group.append(joining)
        for member in group:
            (<_ModelQ>member).peers = group

    def observe(self, model, long long rows, long long duration_ns):
        (<_ModelQ>self._models[model]).fit_add(rows, duration_ns)

    def predict(self, model, long long rows):
        return (<_ModelQ>self._models[model]).predict(rows)

    # -- queueing ------------------------------------------------------------
    def submit(self, WorkItem item, long long now_ns):
        cdef _ModelQ m = self._queue_of(item.model)
        cdef long long priority = item.priority
        cdef int level
        cdef long long deadline = item.deadline_ns
        cdef long long gap, finish
        cdef bint by_tenant
        if m is None:
            raise KeyError(item.model)  # the caller resolved a model it never added
        level = <int>(1 if priority < 1 else (m.levels if priority > m.levels else priority))
        m.submitted += 1
        if _queued_at(m, level) >= m.max_queue:
            return self._reject(m, item, REJECT_QUEUE_FULL, self._room_after(m, now_ns, level))
        # Requests without a tenant count only against the model.
        by_tenant = m.track_tenants and _truthy(item.tenant)
        if by_tenant and _tenant_queued(m, item.tenant) >= m.max_tenant_queue:
            return self._reject(m, item, REJECT_TENANT_FULL, self._room_after(m, now_ns, 1))
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
        item.sched_key = deadline if deadline != NO_DEADLINE else NEVER_KEY
        item.sched_seq = self._seq
        item.state = ITEM_QUEUED
        m.push(item)
        m.queued += 1
        m.queued_by_level[level - 1] += 1
        m.rows_by_level[level - 1] += item.rows
        m.queued_rows += item.rows
        item.tenant_counted = by_tenant
        if by_tenant:
            m.tenants[item.tenant] = m.tenants.get(item.tenant, 0) + 1
        self._queued += 1
        return ADMITTED

    cdef long long _room_after(self, _ModelQ m, long long now_ns, int level) except? -1:
        # The reference's _room_after: a full level's retry hint, about when a batch leaves it (after the
        # rows queued at more urgent levels, which strict priority runs first).
        cdef long long wait = 0
        cdef long long ahead = 0
        cdef long long work
        cdef int index
        if m.max_queue_delay_ns > 0 and m.queued and m.queued_rows < m.capacity:
            wait = m.oldest_ns() + m.max_queue_delay_ns - now_ns
            if wait < 0:
                wait = 0
        for index in range(level - 1):
            ahead += m.rows_by_level[index]
        if ahead:
            work = (ahead // m.capacity) * m.predict(m.capacity)
            if ahead % m.capacity:
                work += m.predict(ahead % m.capacity)
            wait += ((work // m.instances) * m.stretch) >> 10
        return wait + m.predict(m.capacity)

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
        return ((busy + work // m.instances) * m.stretch) >> 10

    cdef void _stretch_sample(self, _ModelQ m, long long now_ns, long long predicted) noexcept:
        cdef long long sample, stretch
        if m.last_backlogged and m.last_predicted > 0:
            sample = ((now_ns - m.last_start) * m.instances << 10) // m.last_predicted
            if sample > STRETCH_MAX:
                sample = STRETCH_MAX
            stretch = m.stretch + ((sample - m.stretch) >> STRETCH_EWMA_SHIFT)
            m.stretch = STRETCH_ONE if stretch < STRETCH_ONE else stretch
        m.last_start = now_ns
        m.last_predicted = predicted
        m.last_backlogged = m.queued_rows >= m.capacity

    cdef inline int _unqueue(self, _ModelQ m, WorkItem item) except -1:
        m.queued -= 1
        m.queued_by_level[item.level - 1] -= 1
        m.rows_by_level[item.level - 1] -= item.rows
        m.queued_rows -= item.rows
        if item.tenant_counted:
            left = m.tenants[item.tenant] - 1
            if left:
                m.tenants[item.tenant] = left
            else:
                del m.tenants[item.tenant]
        self._queued -= 1
        return 0

    def cancel(self, WorkItem item, bint expired=False):
        cdef _ModelQ m
        if item.state != ITEM_QUEUED:
            return False
        m = self._queue_of(item.model)
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
        cdef WorkItem item
        cdef QEntry* entry
        cdef int level = 1
        while level <= m.levels:
            entry = m.level_head(level)
            if entry == NULL:
                level += 1
                continue
            item = <WorkItem>entry.item
            if item.state != ITEM_QUEUED:
                m.drop_head(level)
                continue
            if item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns:
                m.drop_head(level)
                self._expire(m, item)
                continue
            return item
        return None

    cdef int _expire(self, _ModelQ m, WorkItem item) except -1:
        self._unqueue(m, item)
        return self._mark_expired(m, item)

    cdef int _mark_expired(self, _ModelQ m, WorkItem item) except -1:
        # An item already out of the queue expires: counted, and handed back by pop_expired().
        item.state = ITEM_EXPIRED
        m.expired += 1
        self._expired.append(item)
        return 0

    cdef long long _ready_at(self, _ModelQ m, WorkItem head, long long now_ns) except? -1:
        cdef long long rows = m.queued_rows
        cdef long long limit, fixed, wake, size
        if m.max_queue_delay_ns > 0:
            m.batch_limit = m.max_batch_size
            limit = m.oldest_ns() + m.max_queue_delay_ns
            if now_ns >= limit:
                return now_ns
            if m.preferred_min and rows >= m.preferred_min:
                size = m.preferred_size(head, now_ns)
                if size:
                    m.batch_limit = size
                    return now_ns
            return now_ns if rows >= m.capacity else limit
        if rows >= m.capacity:
            return now_ns
        if m.win_count < 2 or m.gap == 0:
            return now_ns
        fixed = <long long>m.b
        if m.gap >= fixed:
            return now_ns
        limit = m.oldest_ns() + fixed
        if now_ns >= limit:
            return now_ns
        wake = now_ns + m.gap
        if wake > limit:
            wake = limit
        if head.deadline_ns != NO_DEADLINE and wake + m.predict(rows + 1) > head.deadline_ns:
            return now_ns
        return wake

    cdef Batch _take(self, _ModelQ m, WorkItem head, long long now_ns):
        cdef WorkItem item
        cdef long long rows = head.rows
        cdef long long end, predicted
        cdef Batch batch
        cdef list chosen = [head]
        cdef object shape = head.shape_key
        m.drop_head(head.level)
        head.state = ITEM_BATCHED
        self._unqueue(m, head)
        if m.max_batch_size > 0:
            while True:
                item = self._clean_head(m, now_ns)
                if item is None or rows + item.rows > m.batch_limit or not _same_shape(item.shape_key, shape):
                    break
                m.drop_head(item.level)
                item.state = ITEM_BATCHED
                self._unqueue(m, item)
                chosen.append(item)
                rows += item.rows
        predicted = m.predict(rows)
        end = now_ns + predicted
        for item in chosen:
            if item.deadline_ns != NO_DEADLINE and item.deadline_ns < end:
                break
        else:
            item = None
        if item is not None:  # some are predicted to finish after their deadlines: expired, not run
            kept = []
            for item in chosen:
                if item.deadline_ns != NO_DEADLINE and item.deadline_ns < end:
                    self._mark_expired(m, item)
                    m.expired_predicted += 1
                    rows -= item.rows
                else:
                    kept.append(item)
            if not kept:
                return None
            chosen = kept
            predicted = m.predict(rows)
        m.in_flight += 1
        m.batches += 1
        m.rows += rows
        self._stretch_sample(m, now_ns, predicted)
        end = now_ns + predicted
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
            batch = self._take(best, best_head, now_ns)
            if batch is not None:  # None: every item of it was predicted late and expired; look again
                batches.append(batch)
        return batches

    def start(self, batch, long long now_ns):
        # The reference's start: items of batch whose deadline passed since
        # it was formed are expired and taken out; False when none is left.
        cdef _ModelQ m = self._queue_of(batch.model)
        cdef WorkItem item
        cdef long long dropped = 0
        cdef list kept
        cdef list items = batch.items
        if m is None:
            return True
        for item in items:
            if item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns:
                break
        else:
            return True  # the common case: nothing late, nothing allocated
        kept = []
        for item in items:
            if item.deadline_ns != NO_DEADLINE and item.deadline_ns <= now_ns:
                self._mark_expired(m, item)
                dropped += item.rows
            else:
                kept.append(item)
        batch.items = kept
        batch.rows -= dropped
        m.rows -= dropped
        if kept:
            return True
        m.in_flight -= 1
        m.batches -= 1
        return False

    def complete(self, batch, long long duration_ns, long long held_ns=-1):
        # The fit learns the batch's run; fair share charges the lane time it
        # held (held_ns, -1: the same): more for a failed batch retried one by one.
        # duration_ns -1: a run stopped part-way (scheduling/stopping.py), nothing to learn.
        cdef _ModelQ m
        cdef long long rows
        if type(batch) is Batch:  # ours: C fields, no attribute lookups
            m = self._queue_of((<Batch>batch).model)
            rows = (<Batch>batch).rows
        else:
            m = self._queue_of(batch.model)
            rows = batch.rows
        if m is None:
            return
        m.in_flight -= 1
        if duration_ns >= 0:
            m.fit_add(rows, duration_ns)
        m.vtime += (duration_ns if held_ns < 0 else held_ns) / m.weight

    def next_wakeup(self, long long now_ns, int max_level=0):
        cdef _ModelQ m
        cdef WorkItem head
        cdef long long at
        wake = None
        for m in self._order:
            if m.queued == 0 or m.in_flight >= m.instances:
                continue
            head = self._clean_head(m, now_ns)
            if head is None or (max_level and head.level > max_level):
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
                "expired_predicted": m.expired_predicted,
                "cancelled": m.cancelled,
                "batches": m.batches,
                "rows": m.rows,
                "queued": m.queued,
                "in_flight": m.in_flight,
                "fit_ns_per_row": m.a,
                "fit_ns_fixed": m.b,
                "service_stretch": m.stretch / <double>STRETCH_ONE,
            }
        return {"scheduler": self.name, "queued": self._queued, "models": models}


cdef inline bint _same_shape(object key, object head_key) except -1:
    # `not (key != head_key)`, the reference's test. Models with fixed shapes
    # give every item the same tuple object, and a tuple is always equal to
    # itself (its items compare by identity first), so that case skips the
    # comparison.
    if key is head_key and type(key) is tuple:
        return True
    return not (key != head_key)


cdef inline bint _truthy(object value) except -1:
    # bool(value), without the generic call for the usual str
    if type(value) is str:
        return len(<str>value) != 0
    return bool(value)


def _sort_key(WorkItem item):
    return (item.level, item.sched_key, item.sched_seq)
