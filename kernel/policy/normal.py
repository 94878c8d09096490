"""Negation normal form of a checked condition: the shape the compiler and the analysis work on.

Missing values follow three-valued (Kleene) logic, as in DMN/FEEL: a test
on a missing value is *unknown*, ``not unknown`` is unknown, and a rule
fires only when its condition is *true*. Pushing every ``not`` down to the
tests keeps that exact, because each test below is true only on present
values (except ``null``), and its negation is again such a test:

    ("num", field, op, value)        field op value; op in == != < <= > >=
    ("pair", f, op, g)               f op g, two numeric fields, f < g by name
    ("str", field, values, positive) field in values (positive) / present and not in values
    ("bool", field, value)           field is value
    ("null", field, is_null)         field is missing / is present (never unknown)
    ("known", field, value)          value when field is present, unknown when missing (what
                                     `b in {true, false}` or `x == x` reduce to; not a null test,
                                     whose negation would be true on a missing value)
    ("const", bool)
    ("and", (terms...)), ("or", (terms...))

Terms are tuples, so equal subconditions are equal keys: the compiler
computes each distinct test once per batch.
"""

from __future__ import annotations

from .syntax import BOOL, FLIPPED, STRING, And, Compare, Field, IsNull, Literal, Member, Node, Not, Or, Range, Truth

TRUE = ("const", True)
FALSE = ("const", False)
COMPLEMENT = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}


def normalize(node: Node, kinds: dict[str, str]) -> tuple:
    """NNF term of a checked condition; ``kinds`` maps each field to number/string/bool."""
    return _nnf(node, False, kinds)


def _nnf(node: Node, negate: bool, kinds: dict[str, str]) -> tuple:
    if isinstance(node, Not):
        return _nnf(node.operand, not negate, kinds)
    if isinstance(node, (And, Or)):
        is_and = isinstance(node, And) != negate  # De Morgan
        parts = [_nnf(n, negate, kinds) for n in node.operands]
        return conjoin(parts) if is_and else disjoin(parts)
    term = _test(node, kinds)
    return negated(term) if negate else term


def _test(node: Node, kinds: dict[str, str]) -> tuple:
    if isinstance(node, Truth):
        operand = node.operand
        if isinstance(operand, Literal):
            return TRUE if operand.value else FALSE
        return ("bool", operand.name, True)
    if isinstance(node, IsNull):
        return ("null", node.field.name, not node.negated)
    if isinstance(node, Range):
        name = node.field.name
        return conjoin([
            ("num", name, ">=" if node.lo_closed else ">", node.lo.value),
            ("num", name, "<=" if node.hi_closed else "<", node.hi.value),
        ])
    if isinstance(node, Member):
        name = node.field.name
        kind = kinds[name]
        values = [v.value for v in node.values]
        if kind == STRING:
            return ("str", name, frozenset(values), not node.negated)
        if kind == BOOL:
            present = set(values)
            if node.negated:
                present = {True, False} - present
            if present == {True, False}:
                return ("known", name, True)
            return ("bool", name, present.pop()) if present else ("known", name, False)
        unique = sorted(set(values))
        if node.negated:
            return conjoin([("num", name, "!=", v) for v in unique])
        return disjoin([("num", name, "==", v) for v in unique])
    if isinstance(node, Compare):
        left, right, op = node.left, node.right, node.op
        kind = kinds[left.name]
        if isinstance(right, Field):
            f, g = left.name, right.name
            if f == g:  # x op x: true or false by op when x is present, unknown when missing
                return ("known", f, op in ("==", "<=", ">="))
            if f > g:
                f, g, op = g, f, FLIPPED[op]
            return ("pair", f, op, g)
        if kind == STRING:
            return ("str", left.name, frozenset([right.value]), op == "==")
        if kind == BOOL:
            return ("bool", left.name, right.value == (op == "=="))
        return ("num", left.name, op, right.value)
    raise AssertionError(f"unexpected node {node!r}")


def negated(term: tuple) -> tuple:
    tag = term[0]
    if tag == "num":
        return ("num", term[1], COMPLEMENT[term[2]], term[3])
    if tag == "pair":
        return ("pair", term[1], COMPLEMENT[term[2]], term[3])
    if tag == "str":
        return ("str", term[1], term[2], not term[3])
    if tag in ("bool", "null", "known"):
        return (tag, term[1], not term[2])
    if tag == "const":
        return FALSE if term[1] else TRUE
    if tag == "and":
        return disjoin([negated(t) for t in term[1]])
    return conjoin([negated(t) for t in term[1]])


def conjoin(parts: list[tuple]) -> tuple:
    return _combine("and", parts, TRUE, FALSE)


def disjoin(parts: list[tuple]) -> tuple:
    return _combine("or", parts, FALSE, TRUE)


def _combine(tag: str, parts: list[tuple], unit: tuple, zero: tuple) -> tuple:
    out: dict[tuple, None] = {}  # (ordered and hashed: `not in` a list was quadratic in a 2,000-value set's tests)
    for part in parts:
        items = part[1] if part[0] == tag else (part,)  # flatten nested and/and, or/or
        for item in items:
            if item == zero:
                return zero
            if item != unit:
                out[item] = None
    if not out:
        return unit
    kept = tuple(out)
    return kept[0] if len(kept) == 1 else (tag, kept)


def atoms(term: tuple) -> list[tuple]:
    """The distinct tests of a term, in order."""
    if term[0] in ("and", "or"):
        out: dict[tuple, None] = {}
        for t in term[1]:
            out.update(dict.fromkeys(atoms(t)))
        return list(out)
    return [] if term[0] == "const" else [term]
