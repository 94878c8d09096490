"""Type-check a parsed condition against the schema and put it in normal form.

Normal form, which both evaluators and the analysis rely on: every
comparison has a field on its left (``5 < x`` becomes ``x > 5``), and only
the pairs below survive. Everything else is a ``CheckError`` at the
offending node's position:

* numbers (``number``/``integer`` fields, ``confidence``, ``score.*``): all six
  comparisons, against a number or another numeric field; intervals; sets of numbers;
* strings (``string`` fields, ``label``): ``==`` ``!=`` and sets of strings, against
  literals only; a ``label`` literal must be one of the declared classes;
* bools: a bare field, ``not``, ``==``/``!=`` against true/false;
* ``is null`` on inputs only (model outputs are never missing).
"""

from __future__ import annotations

from .syntax import (
    BOOL, FLIPPED, NUMBER, STRING, And, Compare, Field, IsNull, Literal, Member, Node, Not, Or, Range, Truth,
)
from .types import LABEL, Schema, shown
from .types import BOOL as T_BOOL
from .types import STRING as T_STRING

_KIND_OF_TYPE = {"number": NUMBER, "integer": NUMBER, T_STRING: STRING, T_BOOL: BOOL}
_NOUN = {NUMBER: "a number", STRING: "a string", BOOL: "a bool"}


class CheckError(ValueError):
    def __init__(self, message: str, pos: int):
        super().__init__(message)
        self.message, self.pos = message, pos


def check_condition(node: Node, schema: Schema) -> tuple[Node | None, list[CheckError]]:
    """The normalized condition and every type error in it (node is None when there are errors)."""
    checker = _Checker(schema)
    result = checker.visit(node)
    return (None if checker.errors else result), checker.errors


class _Checker:
    __slots__ = ("schema", "errors")

    def __init__(self, schema: Schema):
        self.schema = schema
        self.errors: list[CheckError] = []

    def error(self, message: str, pos: int) -> None:
        self.errors.append(CheckError(message, pos))

    def kind(self, field: Field) -> str | None:
        ftype = self.schema.type_of(field.name)
        if ftype is None:
            if field.name in self.schema.broken:
                self.errors.append(CheckError("", -1))  # reported where it is declared
                return None
            self.error(self.schema.unknown_field_message(field.name), field.pos)
            return None
        return _KIND_OF_TYPE[ftype]

    def visit(self, node: Node) -> Node:
        if isinstance(node, (And, Or)):
            return type(node)(tuple(self.visit(n) for n in node.operands), node.pos)
        if isinstance(node, Not):
            return Not(self.visit(node.operand), node.pos)
        if isinstance(node, Truth):
            return self.truth(node)
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, Range):
            return self.range_(node)
        if isinstance(node, Member):
            return self.member(node)
        if isinstance(node, IsNull):
            if self.kind(node.field) is not None and self.schema.is_model_output(node.field.name):
                self.error(f"'{node.field.name}' is a model output and is never missing", node.pos)
            return node
        raise AssertionError(f"unexpected node {node!r}")

    def truth(self, node: Truth) -> Node:
        operand = node.operand
        if isinstance(operand, Literal):
            if operand.kind != BOOL:
                self.error(f"{_NOUN[operand.kind]} is not a condition", node.pos)
            return node
        if not isinstance(operand, Field):
            self.error("expected a condition", node.pos)
            return node
        kind = self.kind(operand)
        if kind is not None and kind != BOOL:
            example = f"{operand.name} > 0" if kind == NUMBER else f"{operand.name} == \"...\""
            self.error(f"'{operand.name}' is {_NOUN[kind]}, not a condition; compare it (e.g. {example})", node.pos)
        return node

    def compare(self, node: Compare) -> Node:
        left, right, op = node.left, node.right, node.op
        if not isinstance(left, (Field, Literal)) or not isinstance(right, (Field, Literal)):
            bad = left if not isinstance(left, (Field, Literal)) else right
            self.error("only fields and values can be compared, not conditions", bad.pos)
            return node
        if isinstance(left, Literal) and isinstance(right, Literal):
            self.error("compares two constants; one side must be a field", node.pos)
            return node
        if isinstance(left, Literal):
            left, right, op = right, left, FLIPPED[op]
        kind = self.kind(left)
        if isinstance(right, Field):
            other = self.kind(right)
            if kind is None or other is None:
                return node
            if kind != NUMBER or other != NUMBER:
                self.error(f"only numbers can be compared field to field ('{left.name}' is {_NOUN[kind]}, "
                           f"'{right.name}' is {_NOUN[other]})", node.pos)
            return Compare(op, left, right, node.pos)
        if kind is None:
            return node
        if right.kind != kind:
            self.error(f"'{left.name}' is {_NOUN[kind]} but is compared with {_NOUN[right.kind]} "
                       f"({_show(right)})", right.pos)
        elif kind != NUMBER and op not in ("==", "!="):
            self.error(f"{_NOUN[kind]} can only be compared with == or != (not {op})", node.pos)
        else:
            self.label_literal(left, right)
        return Compare(op, left, right, node.pos)

    def range_(self, node: Range) -> Node:
        kind = self.kind(node.field)
        if kind is not None and kind != NUMBER:
            self.error(f"'{node.field.name}' is {_NOUN[kind]}; intervals need a number field", node.pos)
        for bound in (node.lo, node.hi):
            if bound.kind != NUMBER:
                self.error(f"interval bounds must be numbers, not {_NOUN[bound.kind]}", bound.pos)
                return node
        lo, hi = node.lo.value, node.hi.value
        if lo > hi or (lo == hi and not (node.lo_closed and node.hi_closed)):
            self.error(f"empty interval: no number lies between {_show(node.lo)} and {_show(node.hi)} "
                       "with these ends", node.pos)
        return node

    def member(self, node: Member) -> Node:
        kind = self.kind(node.field)
        if kind is None:
            return node
        for value in node.values:
            if value.kind != kind:
                self.error(f"'{node.field.name}' is {_NOUN[kind]} but the set holds {_NOUN[value.kind]} "
                           f"({_show(value)})", value.pos)
            else:
                self.label_literal(node.field, value)
        return node

    def label_literal(self, field: Field, literal: Literal) -> None:
        classes = self.schema.class_set
        if field.name == LABEL and classes is not None and literal.value not in classes:
            self.error(f"'{literal.value}' is not one of the model's classes ({shown(self.schema.classes)})",
                       literal.pos)


def _show(literal: Literal) -> str:
    if literal.kind == STRING:
        return repr(literal.value)
    if literal.kind == BOOL:
        return "true" if literal.value else "false"
    value = literal.value
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
