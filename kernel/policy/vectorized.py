"""Run a rule ``Program`` with numpy, one call per instruction over the whole batch.

The pure-Python (numpy) twin of ``ext/rules.pyx``: the same ``Kernel`` and
``encode_rows`` interface, picked through ``kernel.accel`` when the
extension is not built or ``AIOS_PURE_PYTHON=1``.
"""

from __future__ import annotations

import numpy as np

from .program import (
    AND, CODE_EQ, CODE_LUT, CODE_NE, CONST, IS_NAN, NOT_NAN, NUM_EQ, NUM_GE, NUM_GT, NUM_LE, NUM_LT, NUM_NE, OR,
    PAIR_EQ, PAIR_GE, PAIR_GT, PAIR_LE, PAIR_LT, PAIR_NE,
)

_NUMERIC = {NUM_LT: np.less, NUM_LE: np.less_equal, NUM_GT: np.greater, NUM_GE: np.greater_equal,
            NUM_EQ: np.equal, PAIR_LT: np.less, PAIR_LE: np.less_equal, PAIR_GT: np.greater,
            PAIR_GE: np.greater_equal, PAIR_EQ: np.equal}


class Kernel:
    """Executes one program; ``run`` returns the winning rule per row and, if asked, every rule's mask."""

    __slots__ = ("instructions", "luts", "rule_registers", "order", "rules")

    def __init__(self, instructions, luts: np.ndarray, rule_registers, order, n_numeric: int = 0, n_coded: int = 0):
        self.instructions = tuple(instructions)
        self.luts = luts.astype(bool)
        self.rule_registers = tuple(rule_registers)
        self.order = tuple(order)  # rule indices, best first: the first of them that matches wins
        self.rules = len(self.rule_registers)

    def run(self, numeric: list, coded: list, n: int, want_masks: bool):
        regs: list = [None] * len(self.instructions)
        luts = self.luts
        for op, dst, a, b, c in self.instructions:
            if op <= NUM_NE:
                x = numeric[a]
                if op == NUM_NE:
                    out = np.less(x, c)
                    regs[dst] = np.logical_or(out, np.greater(x, c), out=out)
                else:
                    regs[dst] = _NUMERIC[op](x, c)
            elif op <= PAIR_NE:
                x, y = numeric[a], numeric[b]
                if op == PAIR_NE:
                    out = np.less(x, y)
                    regs[dst] = np.logical_or(out, np.greater(x, y), out=out)
                else:
                    regs[dst] = _NUMERIC[op](x, y)
            elif op == CODE_EQ:
                regs[dst] = coded[a] == int(c)
            elif op == CODE_NE:
                regs[dst] = coded[a] != int(c)
            elif op == CODE_LUT:
                regs[dst] = luts[b:][coded[a]]
            elif op == IS_NAN:
                regs[dst] = np.isnan(numeric[a])
            elif op == NOT_NAN:
                regs[dst] = ~np.isnan(numeric[a])
            elif op == CONST:
                regs[dst] = np.full(n, c != 0.0, dtype=bool)
            elif op == AND:
                regs[dst] = np.logical_and(regs[a], regs[b])
            elif op == OR:
                regs[dst] = np.logical_or(regs[a], regs[b])
            else:
                raise AssertionError(f"unknown opcode {op}")
        masks = [regs[r] for r in self.rule_registers]
        winner = np.full(n, self.rules, dtype=np.intp)
        for k in reversed(self.order):
            np.copyto(winner, k, where=masks[k])
        return winner, (np.array(masks, dtype=bool).reshape(self.rules, n) if want_masks else None)


# No single-pass row encoder here: CompiledTable then reads request dicts column by column (encode.py).
encode_rows = None
FLAGS: dict[str, int] = {}
