# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
#
# The numpy executor (kernel/policy/vectorized.py) pays a Python call and a
# temporary array per instruction, which dominates small batches, and reading
# request dicts column by column walks every dict once per field (a cache miss
# each time on large batches). Here:
#
# * Kernel.run executes the program block by block (BLOCK_ROWS rows): each
#   instruction is a tight C loop over the block into a register that stays in
#   L1, then the winner of each row is picked; no GIL is held while a large
#   batch runs (NOGIL_ROWS).
# * encode_rows reads every field of a row while the row is hot, straight
#   into typed buffers; anything unusual (a non-float number, an unknown code,
#   a value to refuse) goes to the Python fallback, so the value rules live in
#   one place (kernel/policy/encode.py).

from cpython.dict cimport PyDict_Check
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject
from libc.math cimport floor, isinf, isnan, NAN
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL
    double PyLong_AsDouble(object v) except? -1.0

# Every whole number up to 2**53 is a float; past it only some are (kernel/policy/reference.py, MAX_EXACT_INTEGER).
cdef double MAX_EXACT_INTEGER = 9007199254740992.0

OPCODES = {
    "NUM_LT": OP_NUM_LT, "NUM_LE": OP_NUM_LE, "NUM_GT": OP_NUM_GT, "NUM_GE": OP_NUM_GE, "NUM_EQ": OP_NUM_EQ,
    "NUM_NE": OP_NUM_NE, "PAIR_LT": OP_PAIR_LT, "PAIR_LE": OP_PAIR_LE, "PAIR_GT": OP_PAIR_GT,
    "PAIR_GE": OP_PAIR_GE, "PAIR_EQ": OP_PAIR_EQ, "PAIR_NE": OP_PAIR_NE, "CODE_EQ": OP_CODE_EQ,
    "CODE_NE": OP_CODE_NE, "CODE_LUT": OP_CODE_LUT, "IS_NAN": OP_IS_NAN, "NOT_NAN": OP_NOT_NAN,
    "CONST": OP_CONST, "AND": OP_AND, "OR": OP_OR,
}
FLAGS = {"CODED": FIELD_CODED, "INTEGER": FIELD_INTEGER, "REQUIRED": FIELD_REQUIRED, "OTHER_OK": FIELD_OTHER_OK}


cdef class Kernel:
    def __cinit__(self, instructions, luts, rule_registers, order, int n_numeric=0, int n_coded=0):
        cdef Py_ssize_t i
        self.n_instrs = len(instructions)
        self.n_rules = len(rule_registers)
        self.instrs = <Instr*>malloc(max(self.n_instrs, 1) * sizeof(Instr))
        self.rule_regs = <int*>malloc(max(self.n_rules, 1) * sizeof(int))
        self.order = <int*>malloc(max(self.n_rules, 1) * sizeof(int))
        if not self.instrs or not self.rule_regs or not self.order:
            raise MemoryError()
        for i, (op, dst, a, b, c) in enumerate(instructions):
            if not 0 <= op <= OP_OR or dst != i:
                raise ValueError(f"instruction {i}: bad opcode {op} or register {dst}")
            if op in (OP_AND, OP_OR) and not (0 <= a < i and 0 <= b < i):
                raise ValueError(f"instruction {i}: reads a register not yet written")
            self.instrs[i].op = op
            self.instrs[i].dst = dst
            self.instrs[i].a = a
            self.instrs[i].b = b
            self.instrs[i].c = c
            self.instrs[i].ci = <int>c if op in (OP_CODE_EQ, OP_CODE_NE) else 0
        for i in range(self.n_rules):
            self.rule_regs[i] = rule_registers[i]
            self.order[i] = order[i]
            if not 0 <= self.rule_regs[i] < self.n_instrs or not 0 <= self.order[i] < self.n_rules:
                raise ValueError("rule register or order out of range")
        self.luts_ref = np.ascontiguousarray(luts, dtype=np.uint8)
        cdef const unsigned char[::1] view = self.luts_ref
        self.luts = &view[0]
        self.n_numeric = n_numeric
        self.n_coded = n_coded

    def __dealloc__(self):
        free(self.instrs)
        free(self.rule_regs)
        free(self.order)

    def run(self, list numeric, list coded, Py_ssize_t n, bint want_masks):
        """(winner, masks): the deciding rule per row (n_rules = none matched), and every rule's
        mask as an (n_rules, n) bool array when ``want_masks``."""
        cdef Py_ssize_t j
        cdef const double** xs = <const double**>malloc((len(numeric) + 1) * sizeof(double*))
        cdef const int** ks = <const int**>malloc((len(coded) + 1) * sizeof(int*))
        cdef unsigned char* regs = <unsigned char*>malloc((self.n_instrs + 1) * BLOCK_ROWS)
        cdef const double[::1] dview
        cdef const int[::1] iview
        if not xs or not ks or not regs:
            free(xs); free(ks); free(regs)
            raise MemoryError()
        winner = np.empty(n, dtype=np.intp)
        masks = np.empty((self.n_rules, n), dtype=np.bool_) if want_masks else None
        cdef Py_ssize_t[::1] w = winner
        cdef unsigned char[:, ::1] mm
        if want_masks:
            mm = masks.view(np.uint8)
        try:
            for j in range(len(numeric)):
                dview = numeric[j]
                if dview.shape[0] != n:
                    raise ValueError(f"numeric column {j} has {dview.shape[0]} rows, expected {n}")
                xs[j] = &dview[0] if n else NULL
            for j in range(len(coded)):
                iview = coded[j]
                if iview.shape[0] != n:
                    raise ValueError(f"code column {j} has {iview.shape[0]} rows, expected {n}")
                ks[j] = &iview[0] if n else NULL
            if n >= NOGIL_ROWS:
                with nogil:
                    self._rows(xs, ks, regs, &w[0], &mm[0, 0] if want_masks else NULL, n)
            elif n:
                self._rows(xs, ks, regs, &w[0], &mm[0, 0] if want_masks else NULL, n)
        finally:
            free(xs)
            free(ks)
            free(regs)
        return winner, masks

    cdef void _rows(self, const double** xs, const int** ks, unsigned char* regs, Py_ssize_t* winner,
                    unsigned char* masks, Py_ssize_t n) noexcept nogil:
        """Every row's winner into ``winner``; with ``masks`` (n_rules x n, row-major) each rule's matches too."""
        cdef Py_ssize_t i, m, start = 0
        cdef int k, t
        while start < n:
            m = min(<Py_ssize_t>BLOCK_ROWS, n - start)
            self._block(xs, ks, regs, start, m)
            for i in range(m):
                k = self.n_rules
                for t in range(self.n_rules):
                    if regs[self.rule_regs[self.order[t]] * BLOCK_ROWS + i]:
                        k = self.order[t]
                        break
                winner[start + i] = k
            if masks != NULL:
                for t in range(self.n_rules):
                    memcpy(masks + t * n + start, regs + self.rule_regs[t] * BLOCK_ROWS, m)
            start += m

    cdef void _block(self, const double** xs, const int** ks, unsigned char* regs, Py_ssize_t start,
                     Py_ssize_t m) noexcept nogil:
        cdef int t
        cdef Py_ssize_t i
        cdef Instr ins
        cdef unsigned char* dst
        cdef const unsigned char* ra
        cdef const unsigned char* rb
        cdef const double* x
        cdef const double* y
        cdef const int* code
        cdef const unsigned char* lut
        cdef double c
        cdef int ci
        for t in range(self.n_instrs):
            ins = self.instrs[t]
            dst = regs + ins.dst * BLOCK_ROWS
            c = ins.c
            ci = ins.ci
            if ins.op <= OP_NUM_NE:
                x = xs[ins.a] + start
                if ins.op == OP_NUM_LT:
                    for i in range(m):
                        dst[i] = x[i] < c
                elif ins.op == OP_NUM_LE:
                    for i in range(m):
                        dst[i] = x[i] <= c
                elif ins.op == OP_NUM_GT:
                    for i in range(m):
                        dst[i] = x[i] > c
                elif ins.op == OP_NUM_GE:
                    for i in range(m):
                        dst[i] = x[i] >= c
                elif ins.op == OP_NUM_EQ:
                    for i in range(m):
                        dst[i] = x[i] == c
                else:  # != is false on a missing value (NaN), like the other comparisons
                    for i in range(m):
                        dst[i] = (x[i] < c) | (x[i] > c)
            elif ins.op <= OP_PAIR_NE:
                x = xs[ins.a] + start
                y = xs[ins.b] + start
                if ins.op == OP_PAIR_LT:
                    for i in range(m):
                        dst[i] = x[i] < y[i]
                elif ins.op == OP_PAIR_LE:
                    for i in range(m):
                        dst[i] = x[i] <= y[i]
                elif ins.op == OP_PAIR_GT:
                    for i in range(m):
                        dst[i] = x[i] > y[i]
                elif ins.op == OP_PAIR_GE:
                    for i in range(m):
                        dst[i] = x[i] >= y[i]
                elif ins.op == OP_PAIR_EQ:
                    for i in range(m):
                        dst[i] = x[i] == y[i]
                else:
                    for i in range(m):
                        dst[i] = (x[i] < y[i]) | (x[i] > y[i])
            elif ins.op == OP_CODE_EQ:
                code = ks[ins.a] + start
                for i in range(m):
                    dst[i] = code[i] == ci
            elif ins.op == OP_CODE_NE:
                code = ks[ins.a] + start
                for i in range(m):
                    dst[i] = code[i] != ci
            elif ins.op == OP_CODE_LUT:
                code = ks[ins.a] + start
                lut = self.luts + ins.b
                for i in range(m):
                    dst[i] = lut[code[i]]
            elif ins.op == OP_IS_NAN:
                x = xs[ins.a] + start
                for i in range(m):
                    dst[i] = x[i] != x[i]
            elif ins.op == OP_NOT_NAN:
                x = xs[ins.a] + start
                for i in range(m):
                    dst[i] = x[i] == x[i]
            elif ins.op == OP_CONST:
                memset(dst, 1 if c != 0.0 else 0, m)
            else:
                ra = regs + ins.a * BLOCK_ROWS
                rb = regs + ins.b * BLOCK_ROWS
                if ins.op == OP_AND:
                    for i in range(m):
                        dst[i] = ra[i] & rb[i]
                else:
                    for i in range(m):
                        dst[i] = ra[i] | rb[i]


def encode_rows(list rows, tuple specs, object fallback):
    """Read ``specs`` = ((name, flags, codes dict or None), ...) from every row (a dict) in one pass.

    Returns (numeric columns, code columns) in spec order: float64 arrays (NaN =
    missing) for numeric fields, int32 code arrays for coded ones. A value this
    loop does not handle itself goes to ``fallback(spec_index, value)``, which
    returns its float/code or raises.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(rows)
    cdef Py_ssize_t m = len(specs)
    cdef Py_ssize_t i, j
    cdef int f
    cdef bint hashable
    cdef double d
    cdef object row, value, name
    cdef PyObject* found
    cdef PyObject* code
    cdef list names = [s[0] for s in specs]
    cdef list dicts = [s[2] for s in specs]
    cdef int* flags = <int*>malloc((m + 1) * sizeof(int))
    cdef double** dout = <double**>malloc((m + 1) * sizeof(double*))
    cdef int** cout = <int**>malloc((m + 1) * sizeof(int*))
    cdef double[::1] dview
    cdef int[::1] iview
    numeric, coded = [], []
    if not flags or not dout or not cout:
        free(flags); free(dout); free(cout)
        raise MemoryError()
    try:
        for j in range(m):
            flags[j] = specs[j][1]
            if flags[j] & FIELD_CODED:
                arr = np.empty(n, dtype=np.int32)
                coded.append(arr)
                iview = arr
                cout[j] = &iview[0] if n else NULL
            else:
                arr = np.empty(n, dtype=np.float64)
                numeric.append(arr)
                dview = arr
                dout[j] = &dview[0] if n else NULL
        for i in range(n):
            row = <object>PyList_GET_ITEM(rows, i)
            if not PyDict_Check(row):
                raise TypeError(f"row {i} is a {type(row).__name__}, not a dict")
            for j in range(m):
                f = flags[j]
                name = <object>PyList_GET_ITEM(names, j)
                found = PyDict_GetItemWithError(row, name)
                if f & FIELD_CODED:
                    if found == NULL:
                        value = None
                    else:
                        value = <object>found
                    hashable = True
                    try:
                        code = PyDict_GetItemWithError(<object>PyList_GET_ITEM(dicts, j), value)
                    except TypeError:  # unhashable: the fallback refuses it with the field's name
                        code = NULL
                        hashable = False
                    if code != NULL and not ((f & FIELD_REQUIRED) and (<object>code) == 0):
                        cout[j][i] = <int>(<object>code)
                    elif code == NULL and hashable and (f & FIELD_OTHER_OK) and value is not None:
                        cout[j][i] = 1  # OTHER: a value no condition mentions
                    else:
                        cout[j][i] = fallback(j, value)
                    continue
                if found == NULL or <object>found is None:
                    d = NAN
                elif PyFloat_Check(<object>found):
                    d = PyFloat_AS_DOUBLE(<object>found)
                elif PyLong_CheckExact(<object>found):
                    try:
                        d = PyLong_AsDouble(<object>found)
                    except OverflowError:
                        d = fallback(j, <object>found)
                    if not -MAX_EXACT_INTEGER < d < MAX_EXACT_INTEGER:  # (2**53 + 1 reads as 2**53)
                        d = fallback(j, <object>found)  # past 2**53 not every int is a float: the rules decide
                else:
                    d = fallback(j, <object>found)
                if isnan(d):
                    if f & FIELD_REQUIRED:
                        d = fallback(j, None if found == NULL else <object>found)
                elif (f & FIELD_INTEGER) and (isinf(d) or floor(d) != d):
                    d = fallback(j, <object>found)
                dout[j][i] = d
    finally:
        free(flags)
        free(dout)
        free(cout)
    return numeric, coded
