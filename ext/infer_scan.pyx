# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``kernel/infer_scan.py`` (the reference and its docstring say what and why).

One pass over the bytes in C, no Python object made but for the input it
refuses: the walk runs on the event loop (grpc.aio calls the deserializer
there), ~40x faster than the reference's. Same results (tests/test_infer_scan.py
compares both on random requests and random bytes).
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcmp

DEF INPUTS = 5
DEF RAW = 7
DEF NAME = 1
DEF DATATYPE = 2
DEF SHAPE = 3
DEF CONTENTS = 5
DEF BYTES_FIELD = 8
DEF PARAMETERS = 4  # the request's and an input's parameters; a requested output's are its field 2
DEF OUTPUT_PARAMETERS = 2
DEF MAX_KEPT_DIMS = 65  # dims kept for the refusal's message: the reference keeps max_dims + 1 of them

cdef int WIDTH[8]
WIDTH[:] = [0, 1, 4, 8, 4, 8, 4, 8]  # each typed field's element as upb holds it (reference: WIDTH)
cdef int UNPACKED[8]
UNPACKED[:] = [-1, 0, 0, 0, 0, 0, 5, 1]


cdef struct Tensor:
    Py_ssize_t name_at, name_len, datatype_at, datatype_len
    long long ndims
    int kept
    int64_t dims[MAX_KEPT_DIMS]
    long long counts[9]


cdef inline Py_ssize_t _varint(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint64_t* value) noexcept:
    # The position after the varint at ``pos``, -1 past ``end`` or past 10 bytes (as the reference).
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef uint8_t byte
    while pos < end and shift < 70:
        byte = p[pos]
        pos += 1
        if shift < 64:
            result |= (<uint64_t>(byte & 0x7F)) << shift
        if not byte & 0x80:
            value[0] = result
            return pos
        shift += 7
    return -1


cdef Py_ssize_t _skip(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, int wire_type, uint64_t number) except -2:
    cdef uint64_t value
    cdef list groups
    if wire_type == 0:
        return _varint(p, pos, end, &value)
    if wire_type == 1:
        return pos + 8 if pos + 8 <= end else -1
    if wire_type == 5:
        return pos + 4 if pos + 4 <= end else -1
    if wire_type == 2:
        pos = _varint(p, pos, end, &value)
        return pos + <Py_ssize_t>value if pos != -1 and value <= <uint64_t>(end - pos) else -1
    if wire_type == 3:  # a group (rare: a Python list of the open ones is fast enough; no recursion, no C stack)
        groups = [number]
        while pos < end:
            pos = _varint(p, pos, end, &value)
            if pos == -1:
                return -1
            if value & 7 == 4:
                if value >> 3 != groups.pop():
                    return -1
                if not groups:
                    return pos
            elif value & 7 == 3:
                groups.append(value >> 3)
            else:
                pos = _skip(p, pos, end, <int>(value & 7), value >> 3)
                if pos == -1:
                    return -1
    return -1


cdef inline long long _varints(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    cdef long long count = 0
    while pos < end:
        count += not (p[pos] & 0x80)
        pos += 1
    return count


cdef int _contents(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Tensor* t) except -1:
    cdef uint64_t key, length
    cdef uint64_t number
    cdef int wire_type
    cdef Py_ssize_t start
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos == -1:
            return 0
        number, wire_type = key >> 3, <int>(key & 7)
        if number == BYTES_FIELD and wire_type == 2:
            t.counts[BYTES_FIELD] += 1
        elif 1 <= number <= 7 and wire_type == 2:  # packed
            start = _varint(p, pos, end, &length)
            if start == -1 or length > <uint64_t>(end - start):
                return 0
            if number >= 6:
                t.counts[number] += <long long>(length // <uint64_t>WIDTH[number])
            else:
                t.counts[number] += _varints(p, start, start + <Py_ssize_t>length)
        elif 1 <= number <= 7 and wire_type == UNPACKED[number]:
            t.counts[number] += 1
        pos = _skip(p, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            return 0
    return 1


cdef inline void _keep(Tensor* t, uint64_t dim, long long max_dims) noexcept:
    if t.kept <= max_dims and t.kept < MAX_KEPT_DIMS:
        t.dims[t.kept] = <int64_t>dim  # (two's complement: a negative dim is sent as 10 bytes)
        t.kept += 1


cdef int _tensor(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, long long max_dims, Tensor* t) except -1:
    cdef uint64_t key, length, dim
    cdef uint64_t number
    cdef int wire_type
    cdef Py_ssize_t start, stop, at, after
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos == -1:
            return 0
        number, wire_type = key >> 3, <int>(key & 7)
        if wire_type == 2 and (number == NAME or number == DATATYPE or number == SHAPE or number == CONTENTS):
            start = _varint(p, pos, end, &length)
            if start == -1 or length > <uint64_t>(end - start):
                return 0
            stop = start + <Py_ssize_t>length
            if number == NAME:
                t.name_at, t.name_len = start, <Py_ssize_t>length
            elif number == DATATYPE:
                t.datatype_at, t.datatype_len = start, <Py_ssize_t>length
            elif number == SHAPE:
                at = start
                while at < stop and t.kept <= max_dims and t.kept < MAX_KEPT_DIMS:
                    at = _varint(p, at, stop, &dim)
                    if at == -1:
                        break
                    _keep(t, dim, max_dims)
                    t.ndims += 1
                if at != -1 and at < stop:
                    t.ndims += _varints(p, at, stop)
            elif not _contents(p, start, stop, t):
                return 0
            pos = stop
            continue
        if number == SHAPE and wire_type == 0:
            after = _varint(p, pos, end, &dim)
            if after != -1:
                _keep(t, dim, max_dims)
                t.ndims += 1
        pos = _skip(p, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            return 0
    return 1


cdef int _narrow(const uint8_t* p, Tensor* t) noexcept:
    # The element size of INT8/UINT8/INT16/UINT16, whose int_contents/uint_contents are wider (reference: _NARROW).
    cdef const uint8_t* d = p + t.datatype_at
    cdef Py_ssize_t n = t.datatype_len
    if (n == 4 and memcmp(d, b"INT8", 4) == 0) or (n == 5 and memcmp(d, b"UINT8", 5) == 0):
        return 1
    if (n == 5 and memcmp(d, b"INT16", 5) == 0) or (n == 6 and memcmp(d, b"UINT16", 6) == 0):
        return 2
    return 0


cpdef object scan(bytes data, long long max_strings, long long max_typed, long long max_dims):
    cdef const uint8_t* p = <const uint8_t*> data
    cdef Py_ssize_t end = len(data)
    cdef Py_ssize_t pos = 0, start, stop
    cdef uint64_t key, length
    cdef uint64_t number
    cdef int wire_type, field, narrow, width
    cdef long long strings = 0, typed = 0, index = 0
    cdef int whole
    cdef list dims, counts
    cdef Tensor t
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos == -1:
            return None
        number, wire_type = key >> 3, <int>(key & 7)
        if number == INPUTS and wire_type == 2:
            start = _varint(p, pos, end, &length)
            if start == -1 or length > <uint64_t>(end - start):
                return None
            stop = start + <Py_ssize_t>length
            pos = stop
            t.name_at = t.name_len = t.datatype_at = t.datatype_len = 0
            t.ndims = 0
            t.kept = 0
            for field in range(9):
                t.counts[field] = 0
            whole = _tensor(p, start, stop, max_dims, &t)
            strings += t.counts[BYTES_FIELD]
            narrow = _narrow(p, &t)
            for field in range(1, 8):
                width = narrow if narrow and (field == 2 or field == 4) else WIDTH[field]
                typed += t.counts[field] * width
            if strings > max_strings or typed > max_typed or t.ndims > max_dims:
                dims, counts = [], []
                for field in range(t.kept):
                    dims.append(t.dims[field])
                for field in range(9):
                    counts.append(t.counts[field])
                return (index, data[t.name_at:t.name_at + t.name_len],
                        data[t.datatype_at:t.datatype_at + t.datatype_len], dims, t.ndims, counts, strings, typed)
            if not whole:
                return None
            index += 1
            continue
        pos = _skip(p, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            return None
    return None


cdef long long _count_field(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint64_t wanted) except -2:
    cdef uint64_t key, number
    cdef int wire_type
    cdef long long count = 0
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos == -1:
            break
        number, wire_type = key >> 3, <int>(key & 7)
        if wire_type == 2 and number == wanted:
            count += 1
        pos = _skip(p, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            break
    return count


cpdef tuple entries(bytes data):
    cdef const uint8_t* p = <const uint8_t*> data
    cdef Py_ssize_t end = len(data)
    parameters = (_count_field(p, 0, end, PARAMETERS) + field_count(data, PARAMETERS, INPUTS)
                  + field_count(data, OUTPUT_PARAMETERS, INPUTS + 1))
    return (_count_field(p, 0, end, INPUTS), _count_field(p, 0, end, INPUTS + 1), _count_field(p, 0, end, RAW),
            parameters)


cpdef long long field_count(bytes data, uint64_t wanted, uint64_t within=0) except -2:
    cdef const uint8_t* p = <const uint8_t*> data
    cdef Py_ssize_t end = len(data)
    cdef Py_ssize_t pos = 0, start
    cdef uint64_t key, number, length
    cdef int wire_type
    cdef long long count = 0
    if within == 0:
        return _count_field(p, 0, end, wanted)
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos == -1:
            break
        number, wire_type = key >> 3, <int>(key & 7)
        if wire_type == 2 and number == within:
            start = _varint(p, pos, end, &length)
            if start == -1 or length > <uint64_t>(end - start):
                break
            count += _count_field(p, start, start + <Py_ssize_t>length, wanted)
        pos = _skip(p, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            break
    return count
