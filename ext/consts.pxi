# Tunables and fixed sizes shared by the compiled modules, with their units.
# kernel/scheduling/policy.py holds the same values for the reference
# implementation; tests/test_scheduling_core.py checks that they agree.

DEF LEN_PREFIX_BYTES = 4            # bytes: length prefix of one BYTES tensor element (OIP)

DEF LATENCY_WINDOW = 50             # batches in the latency model's sliding window
DEF MAX_OBSERVED_NS = 100000000000  # ns (100 s): longer batch times are clamped
DEF OUTLIER_FACTOR = 4              # a batch time over this x the fit's prediction counts as that much
DEF OUTLIER_MIN_SAMPLES = 8         # once the fit has this many batches
DEF ARRIVAL_EWMA_SHIFT = 3          # inter-arrival EWMA weight 1/8, as a shift
DEF STRETCH_ONE = 1024              # admission's service stretch, fixed point: 1024 = 1.0
DEF STRETCH_MAX = 8192              # its cap (8.0)
DEF STRETCH_EWMA_SHIFT = 3          # its EWMA weight 1/8, as a shift
DEF NO_DEADLINE = 0                 # deadline_ns meaning "none"
DEF DEADLINE_NEVER = 9223372036854775807  # ns: sort key of items without a deadline
DEF MAX_PRIORITY_LEVELS = 16        # levels per model (model.toml priority_levels)
DEF HEAP_INITIAL = 64               # entries: first size of a level's heap or FIFO array (doubles when full; a power of two)

# Admission verdicts of submit()
DEF ADMITTED = 0
DEF REJECT_QUEUE_FULL = 1
DEF REJECT_TENANT_FULL = 2
DEF REJECT_DEADLINE = 3

# Item states (kernel/scheduling/types.py)
DEF ITEM_QUEUED = 0
DEF ITEM_BATCHED = 1
DEF ITEM_DONE = 2
DEF ITEM_CANCELLED = 3
DEF ITEM_EXPIRED = 4
DEF ITEM_NEW = 5
