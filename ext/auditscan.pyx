# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of ``kernel/audit/scan.py`` (the reference and its docstring say what and why).

The frame walk in C; the checksum is zlib's own (``zlib.crc32`` on a view of the frame: no copy, and no C
library to build against), so both forms accept exactly the same frames (tests/test_audit_scan.py).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

from zlib import crc32

DEF HEADER_BYTES = 8
DEF HASH_BYTES = 32
DEF TRAILER_BYTES = 34
DEF MAX_PAYLOAD_BYTES = 1 << 30


cdef inline uint32_t _u32(const uint8_t* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cpdef tuple scan_sound(bytes data, Py_ssize_t start, long long sequence, long long index_mask, long long number,
                       bytearray leaves, list index):
    cdef const uint8_t* p = <const uint8_t*>(<char*>data)
    cdef Py_ssize_t limit = len(data)
    cdef Py_ssize_t offset = start, body, end, size
    cdef uint32_t length, checksum
    cdef object view = memoryview(data)
    while limit - offset >= HEADER_BYTES:
        length = _u32(p + offset)
        checksum = _u32(p + offset + 4)
        body = offset + HEADER_BYTES
        end = body + length
        if length < TRAILER_BYTES or length > MAX_PAYLOAD_BYTES or end > limit:
            break
        if crc32(view[body:end]) != checksum:
            break
        if p[end - TRAILER_BYTES] != 0x22 or p[end - TRAILER_BYTES + 1] != 0x20:
            break
        if not (sequence & index_mask):
            index.append((sequence, number, offset))
        size = PyByteArray_GET_SIZE(leaves)
        PyByteArray_Resize(leaves, size + HASH_BYTES)
        memcpy(PyByteArray_AS_STRING(leaves) + size, p + end - HASH_BYTES, HASH_BYTES)
        sequence += 1
        offset = end
    return offset, sequence

