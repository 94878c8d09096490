# Included by rowcodec.pyx: reading protobuf wire format (varints, skipping fields, doubles).
# Every reader returns NULL when the bytes run out or hold what our schema never writes.

cdef inline const char* _varint(const char* p, const char* end, unsigned long long* out) noexcept nogil:
    cdef unsigned long long v = 0
    cdef int shift = 0
    cdef unsigned char b
    while p < end and shift < 64:
        b = <unsigned char>p[0]
        p += 1
        v |= (<unsigned long long>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = v
            return p
        shift += 7
    return NULL


cdef inline const char* _skip(const char* p, const char* end, int wire_type) noexcept nogil:
    cdef unsigned long long length
    if wire_type == 0:
        return _varint(p, end, &length)
    if wire_type == 1:
        return p + 8 if end - p >= 8 else NULL
    if wire_type == 5:
        return p + 4 if end - p >= 4 else NULL
    if wire_type == 2:
        p = _varint(p, end, &length)
        if p == NULL or length > <unsigned long long>(end - p):
            return NULL
        return p + length
    return NULL  # groups: not in our schema


cdef inline double _le_double(const char* p) noexcept nogil:
    # Assemble little-endian explicitly: correct on any host byte order.
    cdef const unsigned char* b = <const unsigned char*>p
    cdef unsigned long long bits = 0
    cdef int k
    cdef double x
    for k in range(8):
        bits |= (<unsigned long long>b[k]) << (8 * k)
    memcpy(&x, &bits, 8)
    return x
