# Compiled twin of kernel/policy/vectorized.py: runs a rule Program
# (kernel/policy/program.py) over a batch, and encodes request dicts into the
# columns it reads. Declarations only; see rules.pyx for the why.

# Opcodes: the numbering of kernel/policy/program.py (tests/test_policy_backends.py checks it).
cdef enum:
    OP_NUM_LT = 0
    OP_NUM_LE = 1
    OP_NUM_GT = 2
    OP_NUM_GE = 3
    OP_NUM_EQ = 4
    OP_NUM_NE = 5
    OP_PAIR_LT = 6
    OP_PAIR_LE = 7
    OP_PAIR_GT = 8
    OP_PAIR_GE = 9
    OP_PAIR_EQ = 10
    OP_PAIR_NE = 11
    OP_CODE_EQ = 12
    OP_CODE_NE = 13
    OP_CODE_LUT = 14
    OP_IS_NAN = 15
    OP_NOT_NAN = 16
    OP_CONST = 17
    OP_AND = 18
    OP_OR = 19

cdef enum:
    BLOCK_ROWS = 256        # rows per block: every register of a block stays in L1 (instructions x 256 bytes)
    # Batches at least this long run without the GIL. A smaller one is done in microseconds, and letting go
    # of the GIL for it could cost a hand-off under load (the finisher waited to get it back behind the
    # poller and the handler threads: 11 % of its busy samples in a Decide run; bench/RESULTS.md, "Decide:
    # two GIL hand-offs per decision removed").
    NOGIL_ROWS = 1024

# encode_rows field flags
cdef enum:
    FIELD_CODED = 1         # string/bool field: value -> small int code through a dict
    FIELD_INTEGER = 2       # numeric field that must hold whole numbers
    FIELD_REQUIRED = 4      # model output: never missing
    FIELD_OTHER_OK = 8      # a value missing from the code dict is OTHER (else: ask the fallback, which refuses)

cdef struct Instr:
    int op                  # OP_*
    int dst                 # register written (== the instruction's index)
    int a                   # column slot, or first register (AND/OR)
    int b                   # second column slot / register, or lut offset (CODE_LUT)
    double c                # constant (NUM_*, CODE_EQ/NE: the code, CONST)
    int ci                  # c as an int, for the code tests


cdef class Kernel:
    cdef Instr* instrs
    cdef int n_instrs
    cdef object luts_ref    # keeps the uint8 lookup tables alive
    cdef const unsigned char* luts
    cdef int* rule_regs     # register holding each rule's condition
    cdef int* order         # rule indices, best first: the first that matches wins
    cdef int n_rules
    cdef public int n_numeric
    cdef public int n_coded

    cdef void _rows(self, const double** xs, const int** ks, unsigned char* regs, Py_ssize_t* winner,
                    unsigned char* masks, Py_ssize_t n) noexcept nogil
    cdef void _block(self, const double** xs, const int** ks, unsigned char* regs, Py_ssize_t start,
                     Py_ssize_t m) noexcept nogil
