"""The reference evaluator: one row at a time, in plain Python, straight from the syntax tree.

It is deliberately the obvious implementation (three-valued logic on the
checked tree, then the hit policy by its DMN definition) so the compiled
evaluator can be tested against it; it is also what the load-time analysis
uses to confirm witness rows. It never sees the normal form the compiler
uses, so a mistake in ``normal.py`` shows up as a difference.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from .errors import PolicyInputError
from .result import PolicyResult
from .syntax import And, Compare, Field, IsNull, Literal, Member, Node, Not, Or, Range, Truth
from .types import BOOL, INTEGER, NUMBER, Schema

_BOOLS = {True: True, False: False}
# Numbers are compared as 64-bit floats (``parser.py`` refuses a literal no float holds). Every whole number up
# to here is one; past it only some are, and a value that is not would be compared as another number: a rule
# `n > 9007199254740992` did not fire for 9007199254740993, whose record showed it exactly.
MAX_EXACT_INTEGER = 2**53


def _an(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def coerce(name: str, ftype: str, value, classes=None, model_output: bool = False):
    """A row's value for field ``name`` as the evaluators compare it: float, str-like, bool or None (missing).

    Raises ``PolicyInputError`` for a value the field's type cannot hold. The
    compiled encoder applies exactly these rules (``encode.py``).
    """
    if value is not None:
        if ftype in (NUMBER, INTEGER):
            if isinstance(value, Real):
                try:
                    number = float(value)
                except OverflowError:
                    raise PolicyInputError(name, f"is {_an(ftype)} field, got a number too large for a float") from None
                if isinstance(value, Integral) and not -MAX_EXACT_INTEGER <= value <= MAX_EXACT_INTEGER \
                        and number != int(value):
                    raise PolicyInputError(name, inexact_integer(ftype, int(value), number))
                if math.isnan(number):
                    value = None
                elif ftype == INTEGER and not number.is_integer():
                    raise PolicyInputError(name, f"is an integer field, got {value!r}")
                else:
                    return number
            else:
                raise PolicyInputError(name, f"is {_an(ftype)} field, got {type(value).__name__} {value!r}")
        elif ftype == BOOL:
            try:
                return _BOOLS[value]
            except (KeyError, TypeError):
                raise PolicyInputError(name, f"is a bool field, got {type(value).__name__} {value!r}") from None
        else:
            try:
                hash(value)
            except TypeError:
                raise PolicyInputError(name, f"is a string field, got {type(value).__name__}") from None
            if classes is not None and value not in classes:
                raise PolicyInputError(name, f"{value!r} is not one of the model's classes ({', '.join(classes)})")
            return value
    if model_output:
        raise PolicyInputError(name, "is a model output and must be present in every row")
    return None


def inexact_integer(ftype: str, value: int, number: float) -> str:
    """Why a whole number no 64-bit float holds is refused (it would be compared as ``number``)."""
    return (f"is {_an(ftype)} field, got {value}: numbers are compared as 64-bit floats, which hold every whole "
            f"number only up to 2**53 ({MAX_EXACT_INTEGER}), and this one would be compared as {int(number)}")


def truth(node: Node, values: dict):
    """Three-valued truth of a checked condition: True, False or None (unknown)."""
    if isinstance(node, And):
        result = True
        for operand in node.operands:
            value = truth(operand, values)
            if value is False:
                return False
            if value is None:
                result = None
        return result
    if isinstance(node, Or):
        result = False
        for operand in node.operands:
            value = truth(operand, values)
            if value is True:
                return True
            if value is None:
                result = None
        return result
    if isinstance(node, Not):
        value = truth(node.operand, values)
        return None if value is None else not value
    if isinstance(node, Truth):
        operand = node.operand
        return operand.value if isinstance(operand, Literal) else values.get(operand.name)
    if isinstance(node, IsNull):
        return (values.get(node.field.name) is None) != node.negated
    value = values.get(node.field.name if not isinstance(node, Compare) else node.left.name)
    if value is None:
        return None
    if isinstance(node, Compare):
        right = node.right
        other = values.get(right.name) if isinstance(right, Field) else right.value
        if other is None:
            return None
        return _compare(node.op, value, other)
    if isinstance(node, Range):
        low_ok = value >= node.lo.value if node.lo_closed else value > node.lo.value
        high_ok = value <= node.hi.value if node.hi_closed else value < node.hi.value
        return low_ok and high_ok
    if isinstance(node, Member):
        found = any(value == v.value for v in node.values)
        return found != node.negated
    raise AssertionError(f"unexpected node {node!r}")


def _compare(op: str, a, b) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


class ReferenceEvaluator:
    """Evaluates a policy's rules on each row in turn; see ``Policy.evaluate_reference``."""

    __slots__ = ("rules", "default", "hit_policy", "rank", "reads", "schema")

    def __init__(self, rules, default, hit_policy: str, actions: tuple[str, ...], schema: Schema):
        self.rules = rules            # Rule objects (not the default), in file order, with .node checked
        self.default = default
        self.hit_policy = hit_policy
        self.rank = {a: i for i, a in enumerate(actions)}  # 0 = highest priority
        self.schema = schema
        reads: dict[str, str] = {}
        for rule in rules:
            for name in rule.reads:
                reads[name] = schema.type_of(name)
        self.reads = reads            # field -> type, every field a condition reads

    def values(self, row: dict) -> dict:
        if not isinstance(row, dict):
            raise PolicyInputError("rows", "every row must be a dict of field values")
        out = {}
        for name, ftype in self.reads.items():
            model = Schema.is_model_output(name)
            classes = self.schema.classes if name == "label" else None
            out[name] = coerce(name, ftype, row.get(name), classes, model)
        return out

    def matches(self, row: dict) -> list:
        values = self.values(row)
        return [rule for rule in self.rules if truth(rule.node, values) is True]

    def evaluate(self, rows: list[dict]) -> PolicyResult:
        n = len(rows)
        action = np.empty(n, dtype=object)
        escalate = np.zeros(n, dtype=bool)
        adjust = np.zeros(n, dtype=np.float64)
        error = np.full(n, None, dtype=object)
        fired = []
        for i, row in enumerate(rows):
            hits = self.matches(row)
            chosen, err = self.choose(hits)
            action[i] = self.default.action if err else min(
                (r.action for r in chosen), key=self.rank.__getitem__)
            escalate[i] = True if err else any(r.escalate for r in chosen)
            total = 0.0
            if not err:
                for r in chosen:  # in rule order, as the compiled evaluator adds them
                    total += r.adjust
            adjust[i] = total
            error[i] = err
            fired.append(tuple(r.id for r in chosen))
        return PolicyResult(action, escalate, adjust, error, fired=fired)

    def choose(self, hits: list) -> tuple[list, str | None]:
        """The rules that decide, by the hit policy's DMN definition, and an error message or None."""
        if not hits:
            return [self.default], None
        policy = self.hit_policy
        if policy == "UNIQUE":
            if len(hits) > 1:
                ids = ", ".join(r.id for r in hits)
                return hits, f"hit policy UNIQUE but {len(hits)} rules match: {ids}"
            return hits, None
        if policy == "FIRST":
            return hits[:1], None
        if policy == "PRIORITY":
            best = min(self.rank[r.action] for r in hits)
            return [next(r for r in hits if self.rank[r.action] == best)], None
        return hits, None  # COLLECT: every match, in rule order
