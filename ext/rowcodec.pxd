# Compiled twin of kernel/pipelines/rowcodec.py: a pipeline's fields read from
# a DecisionRequest, encoded into the model's one-row input and hashed for
# provenance. Declarations only; see rowcodec.pyx for the why.

cdef enum:
    TYPE_NUMBER = 0
    TYPE_INTEGER = 1
    TYPE_STRING = 2
    TYPE_BOOL = 3

cdef enum:
    ENC_NONE = 0
    ENC_STANDARDIZE = 1
    ENC_ONEHOT = 2
    ENC_NUMBER = 3            # "bool" and "raw": the value as a number

# What a Slot holds: one field's value in C form, for encoding and hashing.
cdef enum:
    SLOT_MISSING = 0          # not (yet) seen on the wire
    SLOT_FLOAT = 1            # x
    SLOT_INT = 2              # i (fits int64)
    SLOT_BOOL = 3             # i (0 or 1)
    SLOT_STR = 4              # s/slen: its UTF-8 (obj, when set, is the str)
    SLOT_OBJECT = 5           # anything else: obj, handled through Python

cdef enum:
    MAX_STACK_FIELDS = 64     # fields: slots live on the C stack up to this many, else on the heap
    HASH_STACK_BYTES = 1024   # bytes: canonical hash text built on the stack up to this size

cdef struct Field:
    int type                  # TYPE_*
    int encode                # ENC_*
    bint required
    bint log1p                # transform = "log1p"
    bint number_fast          # lo/hi are the spec's bounds exactly as doubles (else every value goes to FieldSpec.read)
    bint integer_fast         # ilo..ihi hold every accepted integer (else FieldSpec.read)
    bint encode_fast          # mean/std are the spec's exactly as doubles (else encode_one)
    double lo                 # number: min, or -inf
    double hi                 # number: max, or +inf
    double lo_open            # number: values must be > this (-1 for log1p, else -inf)
    long long ilo             # integer: smallest accepted, bounds and log1p folded in
    long long ihi             # integer: largest accepted
    double mean
    double std
    const char* name          # UTF-8, owned by RowCodec._wire_names
    Py_ssize_t name_len

cdef struct Slot:
    int kind                  # SLOT_*
    double x
    long long i
    const char* s             # SLOT_STR: UTF-8, borrowed from the wire buffer or the str
    Py_ssize_t slen
    void* obj                 # borrowed PyObject* (the values dict or the spec owns it), or NULL

cdef class RowCodec:
    cdef readonly str pipeline
    cdef readonly tuple fields
    cdef readonly Py_ssize_t width
    cdef readonly tuple sorted_names       # the order of the input hash
    cdef Py_ssize_t n
    cdef Field* plan
    cdef int* hash_order                   # field indices in sorted-name order
    cdef tuple _names                      # str, declaration order
    cdef tuple _wire_names                 # bytes (UTF-8), declaration order
    cdef tuple _hash_prefixes              # bytes "\x1fname=", sorted-name order
    cdef tuple _slow                       # FieldSpec.read per field
    cdef tuple _defaults
    cdef tuple _allowed                    # frozenset of allowed strings per field (empty = any)
    cdef tuple _values                     # spec.values per field (str)
    cdef tuple _values_utf8                # spec.values per field (bytes)
    cdef frozenset _known
    cdef str _field_list                   # "a, b, c" for the unknown-field message
    cdef bytes _head                       # the pipeline name, UTF-8

    cpdef dict read(self, object given)
    cpdef object encode(self, object values)
    cpdef str input_hash(self, object values, object digests)
    cpdef tuple read_encode_hash(self, object request, object digests)

    cdef object _plain(self, Py_ssize_t index, object value)
    cdef int _refuse_unknown(self, object given) except -1
    cdef int _parse(self, const char* data, Py_ssize_t size, Slot* slots) except -1
    cdef int _entry(self, const char* p, const char* end, Slot* slots) except -1
    cdef dict _values_of(self, Slot* slots)
    cdef int _slots_of(self, object values, Slot* slots) except -1
    cdef object _encode_slots(self, Slot* slots)
    cdef object _hash_slots(self, Slot* slots, object digests)
