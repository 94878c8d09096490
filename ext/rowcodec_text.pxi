# Included by rowcodec.pyx: the canonical text of provenance.input_hash, built in a C buffer
# (on the stack up to HASH_STACK_BYTES, then on the heap) with the reprs Python would write.

cdef struct Text:
    char* data
    Py_ssize_t size
    Py_ssize_t capacity
    bint heap
    char stack[HASH_STACK_BYTES]


cdef int _put(Text* t, const char* s, Py_ssize_t n) except -1:
    cdef Py_ssize_t want = t.size + n
    cdef char* grown
    if want > t.capacity:
        while t.capacity < want:
            t.capacity *= 2
        if t.heap:
            grown = <char*>PyMem_Realloc(t.data, t.capacity)
        else:
            grown = <char*>PyMem_Malloc(t.capacity)
            if grown != NULL:
                memcpy(grown, t.data, t.size)
        if grown == NULL:
            raise MemoryError()
        t.data, t.heap = grown, True
    memcpy(t.data + t.size, s, n)
    t.size = want
    return 0


cdef int _put_str(Text* t, str s) except -1:
    cdef Py_ssize_t n
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(s, &n)
    return _put(t, utf8, n)


cdef inline bint _repr_is_quoted(const char* s, Py_ssize_t n) noexcept nogil:
    # repr(str) is the text in single quotes exactly when every character is printable
    # ASCII other than the quote and the backslash.
    cdef Py_ssize_t k
    cdef unsigned char c
    for k in range(n):
        c = <unsigned char>s[k]
        if c < 0x20 or c > 0x7E or c == 0x27 or c == 0x5C:
            return False
    return True


cdef int _put_repr(Text* t, Slot* slot) except -1:
    cdef char number[32]
    cdef char* text
    cdef int n
    if slot.kind == SLOT_FLOAT:
        # float.__repr__ itself: the shortest string that round-trips; -0.0 as 0.0 (+ 0.0 clears only
        # the sign of a zero), as provenance.input_hash writes it.
        text = PyOS_double_to_string(slot.x + 0.0, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
        try:
            _put(t, text, len(text))
        finally:
            PyMem_Free(text)
    elif slot.kind == SLOT_INT:
        n = snprintf(number, sizeof(number), "%lld", slot.i)
        _put(t, number, n)
    elif slot.kind == SLOT_BOOL:
        if slot.i:
            _put(t, "True", 4)
        else:
            _put(t, "False", 5)
    elif slot.kind == SLOT_STR and _repr_is_quoted(slot.s, slot.slen):
        _put(t, "'", 1)
        _put(t, slot.s, slot.slen)
        _put(t, "'", 1)
    else:
        _put_str(t, repr(<object>slot.obj))
    return 0
