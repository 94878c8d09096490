# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of ``kernel/decision_wire.py`` (the reference and its docstring say what and why).

Two passes in C: the exact size, then the bytes, into one new ``bytes``.
Fields in field-number order, empty strings left out as upb leaves them out;
doubles written as their IEEE 754 bits, little-endian (this module refuses to
import on a big-endian machine, and the reference runs instead).
tests/test_decision_wire.py merges both into Decisions and compares them.
"""

import sys

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, strlen

if sys.byteorder != "little":
    raise ImportError("decision_wire writes doubles little-endian; this machine is big-endian")

DEF ESCALATED = 2
# Decision: request_id 1, action 2, outcome 4 (varint), model 5, input_hash 6, phase_timings_ns 10,
# tenant 15, idempotency_key 16, escalation_reasons 19; ModelProvenance: confidence 4 (double),
# class_scores 5; map entries: key 1, value 2.
cdef const char* TIMING_KEYS[4]
TIMING_KEYS[:] = [b"validate", b"queue", b"model", b"policy"]  # kernel/decision_wire.py's TIMING_NAMES
cdef Py_ssize_t TIMING_LENGTHS[4]
for _i in range(4):
    TIMING_LENGTHS[_i] = strlen(TIMING_KEYS[_i])


cdef inline Py_ssize_t _varint_size(uint64_t value) noexcept:
    cdef Py_ssize_t size = 1
    while value > 0x7F:
        value >>= 7
        size += 1
    return size


cdef inline char* _varint(char* p, uint64_t value) noexcept:
    while value > 0x7F:
        p[0] = <char>((value & 0x7F) | 0x80)
        p += 1
        value >>= 7
    p[0] = <char>value
    return p + 1


cdef inline Py_ssize_t _field_size(Py_ssize_t tag_size, Py_ssize_t length) noexcept:
    return tag_size + _varint_size(length) + length


cdef inline char* _field(char* p, const char* tag, Py_ssize_t tag_size, const char* data, Py_ssize_t length) noexcept:
    memcpy(p, tag, tag_size)
    p = _varint(p + tag_size, length)
    memcpy(p, data, length)
    return p + length


cdef inline char* _double(char* p, double value) noexcept:
    memcpy(p, &value, 8)
    return p + 8


cdef inline Py_ssize_t _score_entry_size(Py_ssize_t key_size) noexcept:
    return 1 + _varint_size(key_size) + key_size + 9  # key field, then the double value field


cdef inline Py_ssize_t _timing_entry_size(Py_ssize_t key_size, uint64_t value) noexcept:
    return 1 + 1 + key_size + 1 + _varint_size(value)


cpdef bytes decision_fields(str request_id, str action, str input_hash, str tenant, str idempotency_key,
                            bytes reasons, bint escalated, double confidence, tuple labels, list scores,
                            list why, unsigned long long validate_ns, unsigned long long queue_ns,
                            unsigned long long model_ns, unsigned long long policy_ns):
    cdef Py_ssize_t n_rid, n_act, n_hash, n_ten, n_key, n_why, n_label, n, i, size, model_size, entry
    cdef const char* rid = PyUnicode_AsUTF8AndSize(request_id, &n_rid)
    cdef const char* act = PyUnicode_AsUTF8AndSize(action, &n_act)
    cdef const char* hsh = PyUnicode_AsUTF8AndSize(input_hash, &n_hash)
    cdef const char* ten = PyUnicode_AsUTF8AndSize(tenant, &n_ten)
    cdef const char* key = PyUnicode_AsUTF8AndSize(idempotency_key, &n_key)
    cdef const char* text
    cdef uint64_t timings[4]
    timings[0], timings[1], timings[2], timings[3] = validate_ns, queue_ns, model_ns, policy_ns
    n = len(labels)
    if len(scores) != n:
        raise ValueError(f"{n} labels but {len(scores)} scores")

    # Pass 1: the exact size.
    size = len(reasons)
    if n_rid:
        size += _field_size(1, n_rid)
    if n_act:
        size += _field_size(1, n_act)
    if escalated:
        size += 2
    model_size = 9  # confidence: tag and 8 bytes (written even when 0: merging 0 leaves the template's 0)
    for i in range(n):
        text = PyUnicode_AsUTF8AndSize(<str>labels[i], &n_label)
        entry = _score_entry_size(n_label)
        model_size += 1 + _varint_size(entry) + entry
    size += 1 + _varint_size(model_size) + model_size
    if n_hash:
        size += _field_size(1, n_hash)
    for i in range(4):
        entry = _timing_entry_size(TIMING_LENGTHS[i], timings[i])
        size += 1 + _varint_size(entry) + entry
    if n_ten:
        size += _field_size(1, n_ten)
    if n_key:
        size += _field_size(2, n_key)
    for item in why:
        PyUnicode_AsUTF8AndSize(<str>item, &n_why)
        size += _field_size(2, n_why)

    # Pass 2: the bytes.
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef char* start = p
    if n_rid:
        p = _field(p, b"\x0a", 1, rid, n_rid)
    if n_act:
        p = _field(p, b"\x12", 1, act, n_act)
    memcpy(p, PyBytes_AS_STRING(reasons), len(reasons))
    p += len(reasons)
    if escalated:
        p[0] = 0x20
        p[1] = ESCALATED
        p += 2
    p[0] = 0x2a
    p = _varint(p + 1, model_size)
    p[0] = 0x21
    p = _double(p + 1, confidence)
    for i in range(n):
        text = PyUnicode_AsUTF8AndSize(<str>labels[i], &n_label)
        entry = _score_entry_size(n_label)
        p[0] = 0x2a
        p = _varint(p + 1, entry)
        p = _field(p, b"\x0a", 1, text, n_label)
        p[0] = 0x11
        p = _double(p + 1, <double>scores[i])
    if n_hash:
        p = _field(p, b"\x32", 1, hsh, n_hash)
    for i in range(4):
        entry = _timing_entry_size(TIMING_LENGTHS[i], timings[i])
        p[0] = 0x52
        p = _varint(p + 1, entry)
        p = _field(p, b"\x0a", 1, TIMING_KEYS[i], TIMING_LENGTHS[i])
        p[0] = 0x10
        p = _varint(p + 1, timings[i])
    if n_ten:
        p = _field(p, b"\x7a", 1, ten, n_ten)
    if n_key:
        p = _field(p, b"\x82\x01", 2, key, n_key)
    for item in why:
        text = PyUnicode_AsUTF8AndSize(<str>item, &n_why)
        p = _field(p, b"\x9a\x01", 2, text, n_why)
    if p - start != size:  # (a bug in the size pass: never return bytes with garbage at the end)
        raise AssertionError(f"decision_fields wrote {p - start} bytes of {size}")
    return out
