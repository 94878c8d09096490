# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
#
# BYTES tensors travel as <uint32 little-endian length><bytes> per element.
# The reference (kernel/bytes_codec.py) pays a struct call and a slice per
# element; here the length is read straight from the buffer and each element
# becomes a str in one PyUnicode_DecodeUTF8 call.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint8_t
from libc.string cimport memcpy

include "consts.pxi"


cdef inline uint32_t _read_len(const uint8_t* p) noexcept nogil:
    # Assemble little-endian explicitly: correct on any host byte order.
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cpdef list decode(bytes buf, Py_ssize_t count):
    cdef const uint8_t* data = <const uint8_t*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t index
    cdef uint32_t length
    cdef list out = []
    for index in range(count):
        if pos + LEN_PREFIX_BYTES > end:
            raise ValueError(f"element {index}: buffer ends inside its 4-byte length prefix")
        length = _read_len(data + pos)
        pos += LEN_PREFIX_BYTES
        if pos + <Py_ssize_t>length > end:
            raise ValueError(f"element {index}: length {length} runs past the end of the buffer")
        try:
            out.append(PyUnicode_DecodeUTF8(<const char*>(data + pos), length, NULL))
        except UnicodeDecodeError:
            raise ValueError(f"element {index}: not valid UTF-8") from None
        pos += length
    if pos != end:
        raise ValueError(f"{end - pos} bytes left over after {count} elements")
    return out


cpdef bytes encode(object items):
    cdef list parts = []
    cdef Py_ssize_t total = 0
    cdef bytes data
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(data)
        total += LEN_PREFIX_BYTES + PyBytes_GET_SIZE(data)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = PyBytes_AS_STRING(out)
    cdef Py_ssize_t pos = 0
    cdef uint32_t length
    for data in parts:
        length = <uint32_t>PyBytes_GET_SIZE(data)
        dst[pos] = <char>(length & 0xFF)
        dst[pos + 1] = <char>((length >> 8) & 0xFF)
        dst[pos + 2] = <char>((length >> 16) & 0xFF)
        dst[pos + 3] = <char>((length >> 24) & 0xFF)
        pos += LEN_PREFIX_BYTES
        memcpy(dst + pos, PyBytes_AS_STRING(data), length)
        pos += length
    return out
