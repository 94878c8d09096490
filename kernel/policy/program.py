"""A rule table as a flat instruction program, the form both compiled executors run.

Every distinct test of the normal form (``normal.py``) becomes one
instruction writing a boolean register; ``and``/``or`` become chains of
binary instructions; equal subterms share a register, so a test used by
several rules is computed once. Instructions are ``(op, dst, a, b, c)``:

    NUM_LT..NUM_NE   numeric column a  <op> constant c       (NaN: false, also for !=)
    PAIR_LT..PAIR_NE numeric column a  <op> numeric column b (NaN on either side: false)
    CODE_EQ/CODE_NE  code column a ==/!= int(c)
    CODE_LUT         luts[b + code] for code column a        (set membership)
    IS_NAN/NOT_NAN   numeric column a is / is not missing
    CONST            c != 0
    AND/OR           register a and/or register b

``vectorized.py`` runs the program with one numpy call per instruction over
the whole batch; ``ext/rules.pyx`` runs it block by block in C (the opcode
numbers are shared with ``ext/rules.pxd``; a test checks they agree).
"""

from __future__ import annotations

import numpy as np

from .encode import MISSING_CODE, OTHER_CODE

NUM_LT, NUM_LE, NUM_GT, NUM_GE, NUM_EQ, NUM_NE = range(6)
PAIR_LT, PAIR_LE, PAIR_GT, PAIR_GE, PAIR_EQ, PAIR_NE = range(6, 12)
CODE_EQ, CODE_NE, CODE_LUT, IS_NAN, NOT_NAN, CONST, AND, OR = range(12, 20)
OPCODES = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)
           and name.split("_")[0] in ("NUM", "PAIR", "CODE", "IS", "NOT", "CONST", "AND", "OR")}
_OFFSET = {"<": 0, "<=": 1, ">": 2, ">=": 3, "==": 4, "!=": 5}


class Program:
    """Instructions, lookup tables and the register of each rule's condition."""

    __slots__ = ("instructions", "luts", "rule_registers", "registers", "numeric", "coded", "_codecs", "_lut_parts")

    def __init__(self, terms: list[tuple], codecs: dict):
        self.numeric: list[str] = []   # numeric column slots: field names
        self.coded: list[str] = []     # code column slots (strings, bools): field names
        for name, codec in codecs.items():
            (self.coded if codec.codes is not None else self.numeric).append(name)
        self.instructions: list[tuple] = []
        lut_parts: list[np.ndarray] = []
        self._codecs = codecs
        self._lut_parts = lut_parts
        memo: dict = {}
        self.rule_registers = tuple(self._emit(term, memo) for term in terms)
        self.registers = len(self.instructions)
        self.luts = np.concatenate(lut_parts) if lut_parts else np.zeros(1, dtype=np.uint8)
        del self._codecs, self._lut_parts

    def _emit(self, term: tuple, memo: dict) -> int:
        found = memo.get(term)
        if found is not None:
            return found
        tag = term[0]
        if tag in ("and", "or"):
            op = AND if tag == "and" else OR
            register = self._emit(term[1][0], memo)
            for part in term[1][1:]:
                register = self._add(op, register, self._emit(part, memo), 0.0)
        elif tag == "num":
            register = self._add(NUM_LT + _OFFSET[term[2]], self.numeric.index(term[1]), 0, float(term[3]))
        elif tag == "pair":
            register = self._add(PAIR_LT + _OFFSET[term[2]], self.numeric.index(term[1]),
                                 self.numeric.index(term[3]), 0.0)
        elif tag == "str":
            register = self._string(term)
        elif tag == "bool":
            register = self._add(CODE_EQ, self.coded.index(term[1]), 0, 2.0 if term[2] else 1.0)
        elif tag == "known" and not term[2]:
            register = self._add(CONST, 0, 0, 0.0)  # never true: unknown or false on every row
        elif tag in ("null", "known"):
            name = term[1]
            term = ("null", name, False) if tag == "known" else term  # true exactly where the field is present
            if name in self.coded:
                register = self._add(CODE_EQ if term[2] else CODE_NE, self.coded.index(name), 0, float(MISSING_CODE))
            else:
                register = self._add(IS_NAN if term[2] else NOT_NAN, self.numeric.index(name), 0, 0.0)
        else:
            register = self._add(CONST, 0, 0, 1.0 if term[1] else 0.0)
        memo[term] = register
        return register

    def _string(self, term: tuple) -> int:
        _, name, values, positive = term
        codec = self._codecs[name]
        wanted = sorted(codec.code_of(v) for v in values)
        slot = self.coded.index(name)
        if positive and len(wanted) == 1:
            return self._add(CODE_EQ, slot, 0, float(wanted[0]))
        lut = np.zeros(max(codec.codes.values()) + 1, dtype=np.uint8)
        if positive:
            lut[wanted] = 1
        else:
            lut[OTHER_CODE:] = 1  # present values...
            lut[wanted] = 0      # ...except these
        offset = sum(len(part) for part in self._lut_parts)
        self._lut_parts.append(lut)
        return self._add(CODE_LUT, slot, offset, 0.0)

    def _add(self, op: int, a: int, b: int, c: float) -> int:
        self.instructions.append((op, len(self.instructions), a, b, c))
        return len(self.instructions) - 1
