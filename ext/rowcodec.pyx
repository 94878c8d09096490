# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
#
# The reference (kernel/pipelines/rowcodec.py) pays, per field of every
# decision, a map lookup, a WhichOneof call and an attribute read on upb's
# Python objects (~0.6 µs), a Python closure to encode, and a repr + f-string
# to hash. Here read_encode_hash serializes the request once (upb does it in
# C, ~0.4 µs for a claims request) and walks the wire bytes of its `fields`
# map in C, keeping each value as a C double / int64 / UTF-8 slice: the
# values dict, the float32 row and the hash text are all built from those.
#
# Only the plainly valid case stays here: a known name seen once, the kind
# its type expects, within bounds, nothing unusual on the wire. Anything else
# takes the object path (read), whose own fast path again accepts only the
# plain case and hands every other value to FieldSpec.read; encoding and
# hashing hand anything unusual to encode_one / provenance.input_hash. So
# every error and edge case keeps its one definition in Python, and
# tests/test_pipeline_codec.py runs the same suite against both codecs.

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_CheckExact, PyDict_GetItem
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.math cimport INFINITY, isfinite, log1p
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

import hashlib
import math

import numpy as np

from kernel._proto.aios.kernel.v1 import kernel_pb2 as _kpb
from kernel.errors import InvalidArgument, quote
from kernel.pipelines import provenance as _provenance
from kernel.pipelines.fields import FLOAT32_MAX as _FLOAT32_MAX
from kernel.pipelines.fields import encode_one as _encode_one

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags, int* type) except NULL
    int Py_DTSF_ADD_DOT_0
    bint PyBool_Check(object o)

# Field numbers from the generated descriptors, not copied by hand (a map entry is always key = 1, value = 2).
cdef object _DecisionRequest = _kpb.DecisionRequest
cdef unsigned long long FIELDS_NO = _kpb.DecisionRequest.DESCRIPTOR.fields_by_name["fields"].number
_value_fields = _kpb.Value.DESCRIPTOR.fields_by_name
cdef int V_STRING = _value_fields["string_value"].number
cdef int V_NUMBER = _value_fields["number_value"].number
cdef int V_INT = _value_fields["int_value"].number
cdef int V_BOOL = _value_fields["bool_value"].number

cdef double F32_MAX = _FLOAT32_MAX
cdef object _np_empty = np.empty
cdef object _float32 = np.dtype(np.float32)
cdef object _sha256 = hashlib.sha256
cdef object _NOT_PLAIN = object()
cdef object _MISSING = object()

_TYPES = {"number": TYPE_NUMBER, "integer": TYPE_INTEGER, "string": TYPE_STRING, "bool": TYPE_BOOL}
_ENCODINGS = {"none": ENC_NONE, "standardize": ENC_STANDARDIZE, "onehot": ENC_ONEHOT, "bool": ENC_NUMBER,
              "raw": ENC_NUMBER}


include "rowcodec_wire.pxi"
include "rowcodec_text.pxi"


# ---- the codec --------------------------------------------------------------------------------

cdef int _slot_of(object value, Slot* slot) except -1:
    """A Python value as a slot; what has no C form stays an object."""
    cdef int overflow = 0
    slot.obj = <void*>value
    if PyFloat_CheckExact(value):
        slot.kind, slot.x = SLOT_FLOAT, PyFloat_AS_DOUBLE(value)
    elif PyBool_Check(value):
        slot.kind, slot.i = SLOT_BOOL, (1 if value is True else 0)
    elif PyLong_CheckExact(value):
        slot.i = PyLong_AsLongLongAndOverflow(value, &overflow)
        slot.kind = SLOT_OBJECT if overflow else SLOT_INT
    elif PyUnicode_CheckExact(value):
        try:
            slot.s = PyUnicode_AsUTF8AndSize(value, &slot.slen)
            slot.kind = SLOT_STR
        except UnicodeError:  # lone surrogates: Python's own repr and comparisons handle them
            slot.kind = SLOT_OBJECT
    else:
        slot.kind = SLOT_OBJECT
    return 0


def _integer_bounds(spec):
    """(fast, ilo, ihi): the int64 range an integer field accepts, exactly (ints compare exactly with float bounds)."""
    lo, hi = -(2**63), 2**63 - 1
    for bound, is_min in ((spec.min, True), (spec.max, False)):
        if bound is None:
            continue
        if isinstance(bound, float) and (math.isnan(bound) or (bound == math.inf if is_min else bound == -math.inf)):
            return False, 0, 0
        if isinstance(bound, float) and math.isinf(bound):
            continue
        if is_min:
            lo = max(lo, math.ceil(bound))
        else:
            hi = min(hi, math.floor(bound))
    if spec.transform == "log1p":
        lo = max(lo, 0)  # an integer is > -1 exactly when it is >= 0
    return (lo <= hi), (lo if lo <= hi else 0), (hi if lo <= hi else 0)


def _as_exact_double(bound, default: float):
    """``bound`` as a float when that float compares exactly as ``bound`` does, else None."""
    if bound is None:
        return default
    try:
        x = float(bound)
    except OverflowError:
        return None
    if isinstance(bound, int) and not math.isinf(x) and int(x) != bound:
        return None
    return x


cdef class RowCodec:
    def __cinit__(self):
        self.plan = NULL
        self.hash_order = NULL

    def __init__(self, str pipeline, tuple fields, Py_ssize_t width):
        cdef Py_ssize_t k
        cdef Field* f
        self.pipeline, self.fields, self.width = pipeline, fields, width
        self.n = len(fields)
        self.sorted_names = tuple(sorted(spec.name for spec in fields))
        self._names = tuple(spec.name for spec in fields)
        self._wire_names = tuple(name.encode("utf-8") for name in self._names)
        self._hash_prefixes = tuple(("\x1f" + name + "=").encode("utf-8") for name in self.sorted_names)
        self._slow = tuple(spec.read for spec in fields)
        self._defaults = tuple(spec.default for spec in fields)
        self._allowed = tuple(frozenset(spec.values) for spec in fields)
        self._values = tuple(tuple(spec.values) for spec in fields)
        self._values_utf8 = tuple(tuple(v.encode("utf-8") for v in spec.values) for spec in fields)
        self._known = frozenset(self._names)
        self._field_list = ", ".join(self._names)
        self._head = pipeline.encode("utf-8")
        self.plan = <Field*>malloc(max(self.n, 1) * sizeof(Field))
        self.hash_order = <int*>malloc(max(self.n, 1) * sizeof(int))
        if self.plan == NULL or self.hash_order == NULL:
            raise MemoryError()
        position = {name: k for k, name in enumerate(self._names)}
        for k in range(self.n):
            self.hash_order[k] = position[self.sorted_names[k]]
        columns = 0
        for k, spec in enumerate(fields):
            f = &self.plan[k]
            f.type = _TYPES[spec.type]
            f.encode = _ENCODINGS[spec.encode]
            f.required = spec.required
            f.log1p = spec.transform == "log1p"
            lo, hi = _as_exact_double(spec.min, -INFINITY), _as_exact_double(spec.max, INFINITY)
            f.number_fast = lo is not None and hi is not None
            f.lo, f.hi = (lo, hi) if f.number_fast else (0.0, 0.0)
            f.lo_open = -1.0 if f.log1p else -INFINITY
            f.integer_fast, f.ilo, f.ihi = _integer_bounds(spec)
            mean, std = _as_exact_double(spec.mean, 0.0), _as_exact_double(spec.std, 1.0)
            f.encode_fast = mean is not None and std is not None
            f.mean, f.std = (mean, std) if f.encode_fast else (0.0, 1.0)
            f.name = PyBytes_AS_STRING(self._wire_names[k])
            f.name_len = PyBytes_GET_SIZE(self._wire_names[k])
            columns += spec.width
        if columns != width:
            # encode_one's reshape refuses such a width; never let the C loop write past the row.
            for k in range(self.n):
                self.plan[k].encode_fast = False
                if self.plan[k].encode == ENC_ONEHOT:
                    self.plan[k].encode = ENC_NUMBER

    def __dealloc__(self):
        free(self.plan)
        free(self.hash_order)

    def __reduce__(self):
        return (RowCodec, (self.pipeline, self.fields, self.width))

    # -- reading through upb's Python objects (a field map on its own) ---------------------------

    cpdef dict read(self, object given):
        cdef dict values = {}
        cdef Py_ssize_t found = 0
        cdef Py_ssize_t k
        get = given.get
        for k in range(self.n):
            name = <object>PyTuple_GET_ITEM(self._names, k)
            value = get(name, _MISSING)
            if value is _MISSING:
                if self.plan[k].required:
                    self._refuse_unknown(given)  # an unknown name is the better message when both apply
                    raise InvalidArgument(f"field '{name}' is required by pipeline '{self.pipeline}'")
                values[name] = <object>PyTuple_GET_ITEM(self._defaults, k)
                continue
            found += 1
            result = self._plain(k, value)
            if result is _NOT_PLAIN:
                try:
                    result = (<object>PyTuple_GET_ITEM(self._slow, k))(value)
                except InvalidArgument:
                    self._refuse_unknown(given)  # as above: unknown names are reported first
                    raise
            values[name] = result
        if found != len(given):
            self._refuse_unknown(given)
        return values

    cdef object _plain(self, Py_ssize_t k, object value):
        cdef Field* f = &self.plan[k]
        cdef double x
        cdef long long i
        cdef int overflow = 0
        kind = value.WhichOneof("kind")
        if f.type == TYPE_NUMBER:
            if kind == "number_value":
                number = value.number_value
                x = PyFloat_AS_DOUBLE(number)
                if f.number_fast and f.lo <= x <= f.hi and x > f.lo_open and isfinite(x):
                    return number
        elif f.type == TYPE_INTEGER:
            if kind == "int_value":
                integer = value.int_value
                i = PyLong_AsLongLongAndOverflow(integer, &overflow)
                if f.integer_fast and not overflow and f.ilo <= i <= f.ihi:
                    return integer
        elif f.type == TYPE_STRING:
            if kind == "string_value":
                text = value.string_value
                allowed = <frozenset>PyTuple_GET_ITEM(self._allowed, k)
                if not allowed or text in allowed:
                    return text
        elif kind == "bool_value":
            return value.bool_value
        return _NOT_PLAIN

    cdef int _refuse_unknown(self, object given) except -1:
        for name in given:
            if name not in self._known:
                raise InvalidArgument(f"field {quote(name)} is not a field of pipeline '{self.pipeline}' "
                                      f"(fields: {self._field_list})")
        return 0

    # -- encoding and hashing ---------------------------------------------------------------------

    cpdef object encode(self, object values):
        cdef Slot stack[MAX_STACK_FIELDS]
        cdef Slot* slots = &stack[0] if self.n <= MAX_STACK_FIELDS else <Slot*>PyMem_Malloc(self.n * sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        try:
            row = self._encode_slots(slots) if self._slots_of(values, slots) else None
        finally:
            if slots != &stack[0]:
                PyMem_Free(slots)
        return _encode_one(self.fields, values, self.width) if row is None else row

    cpdef str input_hash(self, object values, object digests):
        """``provenance.input_hash(pipeline, values, digests, sorted_names)``, byte for byte."""
        cdef Slot stack[MAX_STACK_FIELDS]
        cdef Slot* slots = &stack[0] if self.n <= MAX_STACK_FIELDS else <Slot*>PyMem_Malloc(self.n * sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        try:
            digest = self._hash_slots(slots, digests) if self._slots_of(values, slots) else None
        finally:
            if slots != &stack[0]:
                PyMem_Free(slots)
        if digest is None:
            return _provenance.input_hash(self.pipeline, values, digests, self.sorted_names)
        return digest

    cdef int _slots_of(self, object values, Slot* slots) except -1:
        """Fills the slots from a values dict; 0 when a field is missing (or not a dict): the reference decides."""
        cdef Py_ssize_t k
        cdef PyObject* found
        if not PyDict_CheckExact(values):
            return 0
        for k in range(self.n):
            found = PyDict_GetItem(values, <object>PyTuple_GET_ITEM(self._names, k))
            if found == NULL:
                return 0
            _slot_of(<object>found, &slots[k])
        return 1

    cdef object _encode_slots(self, Slot* slots):
        """The (1, width) float32 row; None when some column is not plain (encode_one then decides)."""
        cdef Py_buffer view
        cdef float* out
        cdef Py_ssize_t k, j, col = 0
        cdef Field* f
        cdef Slot* slot
        cdef double x
        cdef tuple categories
        cdef bytes category
        row = _np_empty((1, self.width), _float32)
        PyObject_GetBuffer(row, &view, PyBUF_WRITABLE)
        out = <float*>view.buf
        try:
            for k in range(self.n):
                f, slot = &self.plan[k], &slots[k]
                if f.encode == ENC_NONE:
                    continue
                if f.encode == ENC_ONEHOT:
                    if slot.kind != SLOT_STR:
                        return None
                    categories = <tuple>PyTuple_GET_ITEM(self._values_utf8, k)
                    for j in range(PyTuple_GET_SIZE(categories)):
                        category = <bytes>PyTuple_GET_ITEM(categories, j)
                        out[col + j] = 1.0 if (PyBytes_GET_SIZE(category) == slot.slen and
                                               memcmp(PyBytes_AS_STRING(category), slot.s, slot.slen) == 0) else 0.0
                    col += PyTuple_GET_SIZE(categories)
                    continue
                if not f.encode_fast:
                    return None
                if slot.kind == SLOT_FLOAT:
                    x = slot.x
                elif slot.kind == SLOT_INT or slot.kind == SLOT_BOOL:
                    x = <double>slot.i  # rounds to nearest, as float(int) does
                else:
                    return None
                if f.encode == ENC_STANDARDIZE:
                    if f.log1p:
                        if not x > -1.0:  # math.log1p raises there (and NaN is out of range anyway)
                            return None
                        x = x if x == 0.0 else log1p(x)  # what math.log1p computes (it keeps -0.0)
                    x = (x - f.mean) / f.std
                if not -F32_MAX <= x <= F32_MAX:
                    return None  # encode_one refuses it by name
                out[col] = <float>x  # numpy's float64 -> float32 cast: round to nearest even
                col += 1
        finally:
            PyBuffer_Release(&view)
        return row

    cdef object _hash_slots(self, Slot* slots, object digests):
        """The input hash from the slots; None when the text needs Python's own rules (the reference decides)."""
        cdef Text text
        cdef Py_ssize_t pos
        text.data, text.size, text.capacity, text.heap = text.stack, 0, HASH_STACK_BYTES, False
        try:
            _put(&text, PyBytes_AS_STRING(self._head), PyBytes_GET_SIZE(self._head))
            for pos in range(self.n):
                prefix = <bytes>PyTuple_GET_ITEM(self._hash_prefixes, pos)
                _put(&text, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix))
                _put_repr(&text, &slots[self.hash_order[pos]])
            if digests:
                for name in sorted(digests):
                    digest = digests[name]
                    if not (PyUnicode_CheckExact(name) and PyUnicode_CheckExact(digest)):
                        return None
                    _put(&text, "\x1ftext:", 6)
                    _put_str(&text, name)
                    _put(&text, "=", 1)
                    _put_str(&text, digest)
            data = PyBytes_FromStringAndSize(text.data, text.size)
        except Exception:  # e.g. a text that does not encode as UTF-8: the reference raises its own error
            return None
        finally:
            if text.heap:
                PyMem_Free(text.data)
        return _sha256(data).hexdigest()

    # -- the fused path: straight from the request's wire bytes -----------------------------------

    cpdef tuple read_encode_hash(self, object request, object digests):
        """``(values, row, input_hash)``: ``read(request.fields)``, ``encode`` and ``input_hash`` in one pass."""
        cdef Slot stack[MAX_STACK_FIELDS]
        cdef Slot* slots = &stack[0] if self.n <= MAX_STACK_FIELDS else <Slot*>PyMem_Malloc(self.n * sizeof(Slot))
        cdef Py_ssize_t k
        if slots == NULL:
            raise MemoryError()
        try:
            values = None
            if type(request) is _DecisionRequest:
                data = request.SerializeToString()  # keeps the wire slices alive until the hash is done
                for k in range(self.n):
                    slots[k].kind = SLOT_MISSING
                if self._parse(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), slots):
                    values = self._values_of(slots)
            if values is None:  # not plain: the object path decides, errors included
                values = self.read(request.fields)
                self._slots_of(values, slots)
            row = self._encode_slots(slots)
            if row is None:
                row = _encode_one(self.fields, values, self.width)
            digest = self._hash_slots(slots, digests)
            if digest is None:
                digest = _provenance.input_hash(self.pipeline, values, digests, self.sorted_names)
        finally:
            if slots != &stack[0]:
                PyMem_Free(slots)
        return values, row, digest

    cdef int _parse(self, const char* data, Py_ssize_t size, Slot* slots) except -1:
        """1 when every entry of the request's `fields` map is plainly valid (slots filled), else 0."""
        cdef const char* p = data
        cdef const char* end = data + size
        cdef unsigned long long tag, length
        while p < end:
            p = _varint(p, end, &tag)
            if p == NULL:
                return 0
            if (tag >> 3) != FIELDS_NO:
                p = _skip(p, end, <int>(tag & 7))
                if p == NULL:
                    return 0
                continue
            if (tag & 7) != 2:
                return 0
            p = _varint(p, end, &length)
            if p == NULL or length > <unsigned long long>(end - p):
                return 0
            if not self._entry(p, p + length, slots):
                return 0
            p += length
        return 1

    cdef int _entry(self, const char* p, const char* end, Slot* slots) except -1:
        """One map entry (key = 1, value = 2) into its field's slot; 0 when it is not plain."""
        cdef unsigned long long tag, length, raw
        cdef const char* key = NULL
        cdef const char* value = NULL
        cdef const char* value_end = NULL
        cdef Py_ssize_t key_len = 0, k, j, index = -1
        cdef Field* f
        cdef Slot* slot
        cdef int kind = 0
        cdef tuple choices
        cdef bytes choice
        while p < end:
            p = _varint(p, end, &tag)
            if p == NULL or (tag != 0x0A and tag != 0x12):
                return 0
            p = _varint(p, end, &length)
            if p == NULL or length > <unsigned long long>(end - p):
                return 0
            if tag == 0x0A:
                key, key_len = p, <Py_ssize_t>length
            else:
                value, value_end = p, p + length
            p += length
        if key == NULL or value == NULL:
            return 0
        for k in range(self.n):
            if self.plan[k].name_len == key_len and memcmp(self.plan[k].name, key, key_len) == 0:
                index = k
                break
        if index < 0:
            return 0  # an unknown name: the object path words the error
        f, slot = &self.plan[index], &slots[index]
        if slot.kind != SLOT_MISSING:
            return 0
        # The Value: exactly one member of its oneof, the one the field's type reads plainly.
        while value < value_end:
            value = _varint(value, value_end, &tag)
            if value == NULL or kind != 0:
                return 0
            kind = <int>(tag >> 3)
            if kind == V_STRING and (tag & 7) == 2:
                value = _varint(value, value_end, &length)
                if value == NULL or length > <unsigned long long>(value_end - value):
                    return 0
                slot.s, slot.slen = value, <Py_ssize_t>length
                value += length
            elif kind == V_NUMBER and (tag & 7) == 1:
                if value_end - value < 8:
                    return 0
                slot.x = _le_double(value)
                value += 8
            elif (kind == V_INT or kind == V_BOOL) and (tag & 7) == 0:
                value = _varint(value, value_end, &raw)
                if value == NULL:
                    return 0
                slot.i = <long long>raw if kind == V_INT else (raw != 0)
            else:
                return 0
        slot.obj = NULL
        if f.type == TYPE_NUMBER:
            if not (kind == V_NUMBER and f.number_fast and f.lo <= slot.x <= f.hi and slot.x > f.lo_open
                    and isfinite(slot.x)):
                return 0
            slot.kind = SLOT_FLOAT
        elif f.type == TYPE_INTEGER:
            if not (kind == V_INT and f.integer_fast and f.ilo <= slot.i <= f.ihi):
                return 0
            slot.kind = SLOT_INT
        elif f.type == TYPE_STRING:
            if kind != V_STRING:
                return 0
            choices = <tuple>PyTuple_GET_ITEM(self._values_utf8, index)
            if PyTuple_GET_SIZE(choices):
                for j in range(PyTuple_GET_SIZE(choices)):
                    choice = <bytes>PyTuple_GET_ITEM(choices, j)
                    if PyBytes_GET_SIZE(choice) == slot.slen and memcmp(PyBytes_AS_STRING(choice), slot.s, slot.slen) == 0:
                        slot.obj = PyTuple_GET_ITEM(<tuple>PyTuple_GET_ITEM(self._values, index), j)
                        break
                if slot.obj == NULL:
                    return 0
            slot.kind = SLOT_STR
        else:
            if kind != V_BOOL:
                return 0
            slot.kind = SLOT_BOOL
        return 1

    cdef dict _values_of(self, Slot* slots):
        """The values dict from parsed slots, defaults filled in; None when a required field is missing."""
        cdef dict values = {}
        cdef Py_ssize_t k
        cdef Slot* slot
        for k in range(self.n):
            name = <object>PyTuple_GET_ITEM(self._names, k)
            slot = &slots[k]
            if slot.kind == SLOT_MISSING:
                if self.plan[k].required:
                    return None
                value = <object>PyTuple_GET_ITEM(self._defaults, k)
                _slot_of(value, slot)
            elif slot.kind == SLOT_FLOAT:
                value = slot.x
            elif slot.kind == SLOT_INT:
                value = slot.i
            elif slot.kind == SLOT_BOOL:
                value = slot.i != 0
            elif slot.obj != NULL:
                value = <object>slot.obj
            else:
                try:
                    value = PyUnicode_DecodeUTF8(slot.s, slot.slen, NULL)
                except UnicodeDecodeError:  # upb validates strings; should it not have, Python's rules decide
                    return None
            values[name] = value
            if slot.kind == SLOT_STR:
                slot.obj = <void*>value  # the dict holds the reference
        return values
