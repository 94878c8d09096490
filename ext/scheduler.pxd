# The compiled scheduler core: the twin of kernel/scheduling/reference.py,
# and the compiled WorkItem/Batch (twins of PyWorkItem/PyBatch in
# kernel/scheduling/types.py). Every field is declared here with its type.

cimport cython
from cpython.ref cimport PyObject


# One queued item's place in its level's heap. The ordering key is copied
# in, so sifting compares and moves plain C structs: no reference counting
# and no pointer chasing into the items.
cdef struct QEntry:
    long long key      # sched_key: the deadline, or DEADLINE_NEVER
    long long seq      # sched_seq: arrival order, the last tie-breaker
    PyObject* item     # borrowed: _ModelQ.slots[slot] holds the reference
    Py_ssize_t slot


# A binary min-heap on (key, seq): one priority level's items with a deadline.
cdef struct QHeap:
    QEntry* entries
    Py_ssize_t len
    Py_ssize_t cap


# A FIFO ring: one priority level's items without a deadline. Their key is
# DEADLINE_NEVER, after every deadline, and among themselves they go by seq,
# which is arrival order: a queue gives their order with no sifting.
cdef struct QRing:
    QEntry* entries
    Py_ssize_t front   # index of the oldest entry
    Py_ssize_t len
    Py_ssize_t cap     # a power of two (or 0)


# One queued item's arrival, for the batching window (which counts from the
# oldest queued item, not the head). The entry goes stale when its item
# leaves the queue; it is recognised then through the slot: that slot no
# longer holds a queued item with this seq.
cdef struct Arrival:
    long long enqueued_ns
    long long seq       # sched_seq of the item
    Py_ssize_t slot     # its index in _ModelQ.slots


# A FIFO ring of Arrival, in submit order, stale entries dropped lazily.
cdef struct ArrivalRing:
    Arrival* entries
    Py_ssize_t front
    Py_ssize_t len
    Py_ssize_t cap     # a power of two (or 0)


cdef class WorkItem:
    # What the scheduler reads while it batches comes first, next to the
    # object header: an item that waited in a long queue is cold in cache,
    # and these few fields then share one or two cache lines instead of four.
    cdef public int state              # ITEM_*
    cdef public int level              # the priority level the scheduler filed it under
    cdef public long long deadline_ns  # absolute monotonic ns, or NO_DEADLINE
    cdef public long long rows         # rows in the batch dim (1 without one)
    cdef public object shape_key       # items batch together only with equal keys
    cdef bint tenant_counted           # submit counted it against its tenant's queue bound
    cdef public object model           # scheduler key: a ModelVersion, compared by identity
    cdef public long long priority     # 1 = most urgent
    cdef public object tenant
    cdef public long long sched_key    # deadline, or DEADLINE_NEVER: EDF order within a level
    cdef public long long sched_seq    # arrival order: the last tie-breaker
    cdef public long long enqueued_ns
    cdef public long long started_ns
    cdef public object inputs
    cdef public object request_id
    cdef public object outputs
    cdef public object error
    cdef public object on_done
    cdef public bint blocking
    cdef public object selected
    cdef public object timings
    cdef public long long retry_after_ns
    cdef public object finisher        # per-batch after-work run by the lane (see types.PyWorkItem)
    cdef public object owner           # what the submitter needs back with the item
    cdef public long long decoded_bytes  # what the checked decoder made of its inputs (types.PyWorkItem)


cdef class Batch:
    cdef public object model
    cdef public list items
    cdef public long long rows
    cdef public object timings
    cdef public object runs            # see types.PyBatch
    cdef public object run_options     # see types.PyBatch


# Final: calls to their cdef methods are direct C calls the compiler can inline.
@cython.final
cdef class _ModelQ:
    cdef object key           # the model object the caller schedules for
    cdef object schedule      # its ModelSchedule
    cdef int index            # registration order
    cdef long long max_batch_size
    cdef long long capacity   # rows in a full batch (1 without a batch dim)
    cdef int instances
    cdef int levels
    cdef long long max_queue
    cdef long long max_tenant_queue
    cdef bint track_tenants
    cdef long long max_queue_delay_ns
    # Static window: preferred_mask[n] is 1 when n rows is a preferred size
    # (sizes 1..max_batch_size only; NULL without any); their least and
    # largest (0 without any).
    cdef unsigned char* preferred_mask
    cdef long long preferred_min
    cdef long long preferred_max
    cdef long long batch_limit  # rows the next batch may take: max_batch_size, or the preferred size _ready_at chose
    cdef double weight
    # The queue: per priority level, a heap of the items with a deadline and
    # a FIFO of those without. Levels are strict and a deadline sorts before
    # "never", so the head of the first non-empty level (its heap's head,
    # else its FIFO's front) is the head of the reference's single heap on
    # (level, key, seq). The items themselves live in `slots`, which the
    # garbage collector sees (and never empties: no_gc_clear in the .pyx);
    # an entry names its item's slot, and a freed slot is reused by the next
    # push.
    cdef QHeap heaps[16]      # MAX_PRIORITY_LEVELS; levels 1..levels in use
    cdef QRing rings[16]
    cdef list slots
    cdef Py_ssize_t* free_slots  # stack of unused indices into slots
    cdef Py_ssize_t free_len
    cdef Py_ssize_t free_cap
    cdef ArrivalRing arrivals   # every queued item's arrival, oldest first
    cdef Py_ssize_t* walk       # scratch for preferred_size: indices into a level's heap
    cdef Py_ssize_t walk_cap
    cdef long long queued
    cdef long long queued_rows  # the sum of rows_by_level
    cdef long long queued_by_level[16]  # max_queue bounds each level, as Triton's queues
    cdef long long rows_by_level[16]
    cdef dict tenants         # tenant -> queued items
    cdef list peers           # every copy of this model version (itself among them) when several: share_bounds
    cdef int in_flight
    cdef long long busy_until
    cdef double vtime
    # latency fit d(n) = a*n + b over a ring of the last LATENCY_WINDOW batches
    cdef long long win_n[50]
    cdef long long win_d[50]
    cdef int win_start
    cdef int win_count
    cdef long long sum_n, sum_d, sum_nn, sum_nd
    cdef double a, b
    cdef long long last_arrival
    cdef long long gap
    # admission's service stretch (kernel/scheduling/policy.py), fixed point, and the latest dispatch
    cdef long long stretch
    cdef long long last_start
    cdef long long last_predicted
    cdef bint last_backlogged
    # counters for stats()
    cdef long long submitted, rejected_queue_full, rejected_tenant_full, rejected_deadline
    cdef long long expired, expired_predicted, cancelled, batches, rows

    cdef int push(self, WorkItem item) except -1
    cdef QEntry* level_head(self, int level) noexcept
    cdef void drop_head(self, int level) noexcept
    cdef void compact_arrivals(self) noexcept
    cdef long long oldest_ns(self) noexcept
    cdef long long preferred_size(self, WorkItem head, long long now_ns) except -1
    cdef int walk_step(self, QEntry* entry, WorkItem head, long long now_ns, long long* rows, long long* best) except -1
    cdef void fit_add(self, long long rows, long long duration_ns) noexcept
    cdef long long predict(self, long long rows) noexcept


@cython.final
cdef class CythonScheduler:
    cdef dict _models
    cdef list _order
    cdef list _expired
    cdef long long _queued
    cdef long long _seq
    cdef double _vclock
    # The model of the last submit/complete and its queue: callers mostly
    # repeat one model, and this saves the dict lookup.
    cdef object _last_key
    cdef _ModelQ _last_q

    cdef _ModelQ _queue_of(self, object model)

    cdef long long _room_after(self, _ModelQ m, long long now_ns, int level) except? -1
    cdef int _reject(self, _ModelQ m, WorkItem item, int reason, long long retry_after_ns) except -1
    cdef long long _wait_ahead(self, _ModelQ m, int level, long long rows, long long now_ns)
    cdef void _stretch_sample(self, _ModelQ m, long long now_ns, long long predicted) noexcept
    cdef int _unqueue(self, _ModelQ m, WorkItem item) except -1
    cdef WorkItem _clean_head(self, _ModelQ m, long long now_ns)
    cdef int _expire(self, _ModelQ m, WorkItem item) except -1
    cdef int _mark_expired(self, _ModelQ m, WorkItem item) except -1
    cdef long long _ready_at(self, _ModelQ m, WorkItem head, long long now_ns) except? -1
    cdef Batch _take(self, _ModelQ m, WorkItem head, long long now_ns)
