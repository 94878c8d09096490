"""The condition language's syntax tree, as the parser builds it.

Nodes are plain immutable-by-convention objects with ``pos``: the character
offset of the node's first token inside the condition text, for errors.
Field names are canonical: ``score["deny"]`` and ``score.deny`` both become
``Field("score.deny")``. Number literals are floats (the evaluators compare
float64 values, so the literal must be one too).
"""

from __future__ import annotations

from collections.abc import Iterator

NUMBER, STRING, BOOL = "number", "string", "bool"
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
# a op b  <=>  b FLIPPED[op] a
FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


class Node:
    __slots__ = ("pos",)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Literal(Node):
    __slots__ = ("value", "kind")

    def __init__(self, value, kind: str, pos: int = 0):
        self.value, self.kind, self.pos = value, kind, pos


class Field(Node):
    __slots__ = ("name",)

    def __init__(self, name: str, pos: int = 0):
        self.name, self.pos = name, pos


class Compare(Node):
    """``left op right``; the checker normalizes it so a field is on the left."""

    __slots__ = ("op", "left", "right")

    def __init__(self, op: str, left: Node, right: Node, pos: int = 0):
        self.op, self.left, self.right, self.pos = op, left, right, pos


class Range(Node):
    """``field in [lo, hi)`` or ``lo <= field < hi``: lo and hi are number literals."""

    __slots__ = ("field", "lo", "lo_closed", "hi", "hi_closed")

    def __init__(self, field: Field, lo: Literal, lo_closed: bool, hi: Literal, hi_closed: bool, pos: int = 0):
        self.field, self.lo, self.lo_closed, self.pos = field, lo, lo_closed, pos
        self.hi, self.hi_closed = hi, hi_closed


class Member(Node):
    """``field in {a, b}`` (``negated``: ``not in``)."""

    __slots__ = ("field", "values", "negated")

    def __init__(self, field: Field, values: tuple, negated: bool, pos: int = 0):
        self.field, self.values, self.negated, self.pos = field, values, negated, pos


class IsNull(Node):
    """``field is null`` (``negated``: ``is not null``): the only test that is true on a missing value."""

    __slots__ = ("field", "negated")

    def __init__(self, field: Field, negated: bool, pos: int = 0):
        self.field, self.negated, self.pos = field, negated, pos


class Truth(Node):
    """A bare operand used as a condition: a bool field, or ``true``/``false``."""

    __slots__ = ("operand",)

    def __init__(self, operand: Node, pos: int = 0):
        self.operand, self.pos = operand, pos


class Not(Node):
    __slots__ = ("operand",)

    def __init__(self, operand: Node, pos: int = 0):
        self.operand, self.pos = operand, pos


class And(Node):
    __slots__ = ("operands",)

    def __init__(self, operands: tuple, pos: int = 0):
        self.operands, self.pos = tuple(operands), pos


class Or(Node):
    __slots__ = ("operands",)

    def __init__(self, operands: tuple, pos: int = 0):
        self.operands, self.pos = tuple(operands), pos


def tests_of(node: Node) -> Iterator[Node]:
    """The tests a condition is made of (comparisons, ranges, memberships, null tests, bare operands), in order of
    appearance, through its ``and``/``or``/``not``. Iterative: conditions nest as deep as the parser allows."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Not):
            stack.append(n.operand)
        elif isinstance(n, (And, Or)):
            stack += reversed(n.operands)
        else:
            yield n


def fields_of(node: Node) -> list[Field]:
    """Every field a condition reads, in order of appearance (with repeats)."""
    out: list[Field] = []
    for n in tests_of(node):
        if isinstance(n, Truth):
            n = n.operand
        if isinstance(n, Field):
            out.append(n)
        elif isinstance(n, Compare):
            out += [side for side in (n.left, n.right) if isinstance(side, Field)]
        elif isinstance(n, (Range, Member, IsNull)):
            out.append(n.field)
    return out


def string_literals(node: Node) -> list[tuple[str, str]]:
    """Every (field name, string) a condition compares a field with (``==``, ``!=``, ``in {...}``): what the
    pipeline checks against the field's declared values (a rule comparing with 'Gold' where the values are
    lower case can never match)."""
    out: list[tuple[str, str]] = []
    for n in tests_of(node):
        if isinstance(n, Compare):
            pair = (n.left, n.right) if isinstance(n.left, Field) else (n.right, n.left)
            if isinstance(pair[0], Field) and isinstance(pair[1], Literal) and pair[1].kind == "string":
                out.append((pair[0].name, pair[1].value))
        elif isinstance(n, Member):
            out += [(n.field.name, v.value) for v in n.values if isinstance(v, Literal) and v.kind == "string"]
    return out


def null_tests(node: Node) -> list[str]:
    """The names of the fields a condition tests with ``is null`` / ``is not null``."""
    return [n.field.name for n in tests_of(node) if isinstance(n, IsNull)]
