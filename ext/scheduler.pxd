# The compiled scheduler core: the twin of kernel/scheduling/reference.py.
# Every field is declared here with its type; scheduler.pyx has the why.

cdef class _Entry:
    cdef object item          # the WorkItem this entry queues
    cdef object shape_key
    cdef object tenant
    cdef _ModelQ model
    cdef int level            # 1 = most urgent
    cdef int state            # ITEM_* (mirrored to item.state on every transition)
    cdef long long key        # deadline, or DEADLINE_NEVER: EDF order within a level
    cdef long long seq        # arrival order: the last tie-breaker
    cdef long long deadline   # absolute monotonic ns, or NO_DEADLINE
    cdef long long enqueued   # ns
    cdef long long rows


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
    cdef long long max_queue_delay_ns
    cdef tuple preferred
    cdef double weight
    cdef list heap            # of _Entry, a binary min-heap on (level, key, seq)
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

    cdef int _reject(self, _ModelQ m, object item, int reason, long long retry_after_ns) except -1
    cdef long long _wait_ahead(self, _ModelQ m, int level, long long rows, long long now_ns)
    cdef void _unqueue(self, _ModelQ m, _Entry e) except *
    cdef _Entry _clean_head(self, _ModelQ m, long long now_ns)
    cdef void _expire(self, _ModelQ m, _Entry e) except *
    cdef long long _ready_at(self, _ModelQ m, _Entry head, long long now_ns)
    cdef object _take(self, _ModelQ m, _Entry head, long long now_ns)
