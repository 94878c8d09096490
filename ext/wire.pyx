# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of ``kernel/wire.py`` (the reference and its docstring say what and why).

One pass over the bytes in C; errors are the reference's, message for message
(tests/test_wire.py compares both on random bytes).
"""

from libc.stdint cimport uint8_t, uint64_t

DEF LENGTH_DELIMITED = 2


cdef inline Py_ssize_t _varint(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint64_t* value) except -1:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef bint too_big = False
    cdef uint8_t byte
    while True:
        if pos >= end:
            raise ValueError(f"a varint runs past the end of the message at byte {pos}")
        byte = p[pos]
        pos += 1
        if shift == 63 and byte & 0x7E:  # bits past the 64th: only the 10th byte can carry them
            too_big = True
        if shift < 64:
            result |= (<uint64_t>(byte & 0x7F)) << shift
        if not byte & 0x80:
            if too_big:
                raise ValueError(f"a varint longer than 64 bits ends at byte {pos}")
            value[0] = result
            return pos
        shift += 7
        if shift >= 70:
            raise ValueError(f"a varint longer than 10 bytes ends at byte {pos}")


cdef inline int _put_varint(bytearray out, uint64_t value) except -1:
    while value > 0x7F:
        out.append(<int>((value & 0x7F) | 0x80))
        value >>= 7
    out.append(<int>value)
    return 0


cpdef bytes retag(bytes data, long long field, long long new_field):
    if not (1 <= field < (1 << 29)) or not (1 <= new_field < (1 << 29)):
        raise ValueError(f"field numbers must be 1..{(1 << 29) - 1}, got {field} and {new_field}")
    cdef const uint8_t* p = <const uint8_t*> data
    cdef Py_ssize_t end = len(data)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t start, before
    cdef uint64_t key, length, ignored
    cdef long long number
    cdef int wire_type
    cdef bytearray tag = bytearray()
    _put_varint(tag, (<uint64_t>new_field << 3) | LENGTH_DELIMITED)
    cdef bytes tag_bytes = bytes(tag)
    cdef list parts = []
    cdef list groups = []  # the field numbers of the groups being skipped, innermost last
    while pos < end:
        pos = _varint(p, pos, end, &key)
        number = <long long>(key >> 3)
        wire_type = <int>(key & 7)
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire_type == 0:
            pos = _varint(p, pos, end, &ignored)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == LENGTH_DELIMITED:
            before = pos
            start = _varint(p, pos, end, &length)
            if length > <uint64_t>(end - start):
                raise ValueError(f"a field runs past the end of the message (byte {start + <object>length} of {end})")
            if number == field and not groups:
                parts.append(tag_bytes)
                parts.append(data[before:start + <Py_ssize_t>length])
            pos = start + <Py_ssize_t>length
        elif wire_type == 3:  # a group: skipped to its end (rare: a Python list is fast enough)
            groups.append(number)
        elif wire_type == 4:
            if not groups or groups.pop() != number:
                raise ValueError(f"the end of a group {number} that is not open, at byte {pos}")
        else:
            raise ValueError(f"wire type {wire_type} at byte {pos}")
        if pos > end:
            raise ValueError(f"a field runs past the end of the message (byte {pos} of {end})")
    if groups:
        raise ValueError(f"group {groups.pop()} is not closed at the end of the message")  # (no [-1]: wraparound is off)
    return b"".join(parts)
