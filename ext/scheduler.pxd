# The compiled scheduler core: the twin of kernel/scheduling/reference.py,
# and the compiled WorkItem/Batch (twins of PyWorkItem/PyBatch in
# kernel/scheduling/types.py). Every field is declared here with its type.

cdef class WorkItem:
    cdef public object model           # scheduler key: a ModelVersion, compared by identity
    cdef public long long rows         # rows in the batch dim (1 without one)
    cdef public object shape_key       # items batch together only with equal keys
    cdef public long long priority     # 1 = most urgent
    cdef public long long deadline_ns  # absolute monotonic ns, or NO_DEADLINE
    cdef public object tenant
    cdef public long long enqueued_ns
    cdef public long long started_ns
    cdef public object inputs
    cdef public object request_id
    cdef public int state              # ITEM_*
    cdef public object outputs
    cdef public object error
    cdef public object on_done
    cdef public bint blocking
    cdef public object selected
    cdef public object timings
    cdef public int level              # the priority level the scheduler filed it under
    cdef public long long retry_after_ns
    cdef public long long sched_key    # deadline, or DEADLINE_NEVER: EDF order within a level
    cdef public long long sched_seq    # arrival order: the last tie-breaker


cdef class Batch:
    cdef public object model
    cdef public list items
    cdef public long long rows
    cdef public object timings


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
    cdef tuple preferred
    cdef double weight
    cdef list heap            # of WorkItem, a binary min-heap on (level, sched_key, sched_seq)
    cdef long long queued
    cdef long long rows_by_level[16]
    cdef dict tenants         # tenant -> queued items
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
    # counters for stats()
    cdef long long submitted, rejected_queue_full, rejected_tenant_full, rejected_deadline
    cdef long long expired, cancelled, batches, rows

    cdef void fit_add(self, long long rows, long long duration_ns)
    cdef long long predict(self, long long rows)
    cdef long long total_rows(self)


cdef class CythonScheduler:
    cdef dict _models
    cdef list _order
    cdef list _expired
    cdef long long _queued
    cdef long long _seq
    cdef double _vclock

    cdef int _reject(self, _ModelQ m, WorkItem item, int reason, long long retry_after_ns) except -1
    cdef long long _wait_ahead(self, _ModelQ m, int level, long long rows, long long now_ns)
    cdef void _unqueue(self, _ModelQ m, WorkItem item) except *
    cdef WorkItem _clean_head(self, _ModelQ m, long long now_ns)
    cdef void _expire(self, _ModelQ m, WorkItem item) except *
    cdef long long _ready_at(self, _ModelQ m, WorkItem head, long long now_ns)
    cdef Batch _take(self, _ModelQ m, WorkItem head, long long now_ns)
