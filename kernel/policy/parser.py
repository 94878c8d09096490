"""Tokenizer and recursive-descent parser for rule conditions (``when = "..."``).

The language is deliberately small, and nothing in it can run code: the
parser builds a tree of the node types in ``syntax.py`` and nothing else is
ever evaluated (no ``eval``/``exec``, no attribute access, no calls).

Grammar (lowest precedence first)::

    condition  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | test
    test       := operand [ CMP operand [ CMP operand ]      # a < b, or a range lo <= x < hi
                          | ["not"] "in" (set | interval)
                          | "is" ["not"] "null" ]
    operand    := NUMBER | "-" NUMBER | STRING | "true" | "false" | field | "(" condition ")"
    field      := NAME ("." NAME)* | NAME "[" STRING "]"     # score.deny, score["high risk"]
    set        := "{" literal ("," literal)* [","] "}"
    interval   := ("[" | "(") number "," number ("]" | ")")  # [1000, 5000): closed/open ends (not FEEL's [1..10))
    CMP        := "==" | "!=" | "<" | "<=" | ">" | ">="

Strings are '...' or "..." with the escapes \\ \' \" \n \t. Keywords are
lower case. Anything else (``=``, ``&&``, calls, arithmetic) is refused
with a ``ParseError`` carrying the offset of the offending character.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .syntax import BOOL, NUMBER, STRING, And, Compare, Field, IsNull, Literal, Member, Node, Not, Or, Range, Truth

MAX_LENGTH = 10_000  # characters in one condition
MAX_DEPTH = 64       # nesting of parentheses/not: bounds the parser's recursion on untrusted text

KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})
# Words people write for the floats that are not finite numbers. Numbers in conditions are finite literals: the
# tests these would make are written another way (an input may be named so: then it is a field, where one may be).
NONFINITE = frozenset({"nan", "inf", "infinity"})
NONFINITE_HINT = ("numbers in conditions are finite; for no bound leave the test out (`x > 0`, not `x in (0, inf)`), "
                  "and a missing value (NaN in a float column) is tested with `x is null`")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t"}
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>==|!=|<=|>=|<|>)
      | (?P<punct>[()\[\]{},.\-])
      | (?P<quote>['"])
    """,
    re.VERBOSE,
)
# Helpful words for things people type out of habit.
_MISTAKES = {
    "=": "use '==' to compare",
    "&": "use 'and'",
    "|": "use 'or'",
    "!": "use 'not' (or '!=')",
    "+": "arithmetic is not part of the policy language",
    "*": "arithmetic is not part of the policy language",
    "/": "arithmetic is not part of the policy language",
    "%": "arithmetic is not part of the policy language",
}


class ParseError(ValueError):
    def __init__(self, message: str, pos: int):
        super().__init__(message)
        self.message, self.pos = message, pos


class Token:
    __slots__ = ("kind", "value", "pos")

    def __init__(self, kind: str, value, pos: int):
        self.kind, self.value, self.pos = kind, value, pos  # kind: num str name kw op punct end

    def __repr__(self) -> str:
        return f"Token({self.kind}, {self.value!r}, {self.pos})"


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_LENGTH:
        raise ParseError(f"condition is {len(text)} characters long; the limit is {MAX_LENGTH}", MAX_LENGTH)
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            hint = _MISTAKES.get(ch)
            raise ParseError(f"unexpected {ch!r}" + (f": {hint}" if hint else ""), pos)
        kind = m.lastgroup
        if kind == "ws":
            pass
        elif kind == "num":
            dots = text.find("..", max(0, pos - 1), m.end() + 1)
            if dots >= 0:  # FEEL's `[1..10)`: read as the numbers `1.` and `.10`, it failed as "found '0.1'"
                raise ParseError("'..' is not part of the policy language: write an interval with a comma "
                                 "between its bounds, as in [1000, 5000)", dots)
            tokens.append(Token("num", _number(m.group(), pos), pos))
        elif kind == "name":
            word = m.group()
            tokens.append(Token("kw" if word in KEYWORDS else "name", word, pos))
        elif kind == "op":
            tokens.append(Token("op", m.group(), pos))
        elif kind == "punct":
            tokens.append(Token("punct", m.group(), pos))
        else:
            value, end = _string(text, pos)
            tokens.append(Token("str", value, pos))
            pos = end
            continue
        pos = m.end()
    tokens.append(Token("end", None, len(text)))
    return tokens


# Numbers are compared as 64-bit floats. A literal that is not the number it says would silently test
# another one, so these are refused, not rounded:
MAX_EXACT_INTEGER = 2**53  # every whole number up to here is a float; past it, only some are


def _number(literal: str, pos: int) -> float:
    """The value of a number literal (ASCII digits only: the pattern takes no others, since ``float()``
    reads '١٢' as 12); ParseError for one too large, one that underflows to 0, or one written out in digits
    past 2**53 that no float holds (9007199254740993, also as 9007199254740993.0, would be compared as
    9007199254740992; past 2**53 a float has no fraction either). A literal with an exponent (1e23) states a
    magnitude and is taken as its nearest float."""
    value = float(literal)
    if value == float("inf"):
        raise ParseError(f"number {literal} is too large", pos)
    mantissa = literal.lower().split("e")[0]
    if value == 0.0 and mantissa.strip("0.") != "":
        raise ParseError(f"number {literal} is too small: it is not 0 but rounds to 0 as a 64-bit float", pos)
    # (Exact decimal arithmetic; a finite float has at most 309 whole digits, and a condition at most MAX_LENGTH.)
    if mantissa == literal.lower() and value >= MAX_EXACT_INTEGER and Decimal(literal) != Decimal(value):
        raise ParseError(f"number {literal} is not exactly representable: numbers are compared as 64-bit floats, "
                         f"where past 2**53 ({MAX_EXACT_INTEGER}) only some whole numbers are held (this one "
                         f"is compared as {int(value)})", pos)
    return value


def _string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out = []
    pos = start + 1
    while pos < len(text):
        ch = text[pos]
        if ch == quote:
            return "".join(out), pos + 1
        if ch == "\\":
            nxt = text[pos + 1] if pos + 1 < len(text) else ""
            if nxt not in _ESCAPES:
                raise ParseError(f"unknown escape '\\{nxt}' in string (allowed: \\\\ \\' \\\" \\n \\t)", pos)
            out.append(_ESCAPES[nxt])
            pos += 2
            continue
        out.append(ch)
        pos += 1
    raise ParseError("string is not closed", start)


def parse_condition(text: str) -> Node:
    """Parse one condition into a syntax tree, or raise ``ParseError``."""
    return _Parser(tokenize(text)).parse()


class _Parser:
    __slots__ = ("tokens", "index", "depth")

    def __init__(self, tokens: list[Token]):
        self.tokens, self.index, self.depth = tokens, 0, 0

    # -- token helpers
    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at(self, kind: str, value=None) -> bool:
        token = self.tokens[self.index]
        return token.kind == kind and (value is None or token.value == value)

    def expect(self, kind: str, value, what: str) -> Token:
        if not self.at(kind, value):
            self.fail(f"expected {what}")
        return self.advance()

    def fail(self, message: str, token: Token | None = None, hint: str = ""):
        token = token or self.peek()
        found = "end of condition" if token.kind == "end" else repr(_spelling(token))
        hint = hint or _case_hint(token)
        raise ParseError(f"{message}, found {found}" + (f" ({hint})" if hint else ""), token.pos)

    # -- grammar
    def parse(self) -> Node:
        if self.at("end"):
            raise ParseError("empty condition", 0)
        node = self.or_()
        if not self.at("end"):
            token = self.peek()
            if token.kind in ("num", "str", "name") or token.kind == "kw" and token.value in ("true", "false", "null"):
                # `a > 5 AND b < 3`, `NOT a`: a keyword in capitals reads as a field name
                hint = _case_hint(token) or _case_hint(self.tokens[self.index - 1])
                self.fail("expected 'and', 'or' or the end of the condition (a missing operator?)", hint=hint)
            self.fail("expected 'and', 'or' or the end of the condition")
        return node

    def or_(self) -> Node:
        first = self.and_()
        items = [first]
        while self.at("kw", "or"):
            self.advance()
            items.append(self.and_())
        return first if len(items) == 1 else Or(tuple(items), first.pos)

    def and_(self) -> Node:
        first = self.not_()
        items = [first]
        while self.at("kw", "and"):
            self.advance()
            items.append(self.not_())
        return first if len(items) == 1 else And(tuple(items), first.pos)

    def not_(self) -> Node:
        if self.at("kw", "not"):
            token = self.advance()
            self.enter(token)
            node = Not(self.not_(), token.pos)
            self.depth -= 1
            return node
        return self.test()

    def enter(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"condition nests deeper than {MAX_DEPTH} levels", token.pos)

    def test(self) -> Node:
        left = self.operand()
        token = self.peek()
        if token.kind == "op":
            self.advance()
            middle = self.operand()
            if not self.at("op"):
                return Compare(token.value, left, middle, left.pos)
            second = self.advance()
            right = self.operand()
            return _chained(left, token, middle, second, right)
        if token.kind == "kw" and token.value == "in":
            self.advance()
            return self.membership(left, False, token)
        if token.kind == "kw" and token.value == "not" and self.tokens[self.index + 1].kind == "kw" \
                and self.tokens[self.index + 1].value == "in":
            self.advance()
            self.advance()
            return self.membership(left, True, token)
        if token.kind == "kw" and token.value == "is":
            self.advance()
            negated = False
            if self.at("kw", "not"):
                self.advance()
                negated = True
            self.expect("kw", "null", "'null' after 'is'")
            return IsNull(_as_field(left, "'is null'"), negated, left.pos)
        if isinstance(left, (Field, Literal)):
            return Truth(left, left.pos)
        return left  # a parenthesized condition

    def operand(self) -> Node:
        token = self.peek()
        if token.kind == "punct" and token.value == "(":
            self.advance()
            self.enter(token)
            inner = self.or_()
            self.depth -= 1
            self.expect("punct", ")", "')'")
            return inner
        if token.kind == "name":
            return self.field()
        return self.literal("a field, a value or '('")

    def literal(self, what: str) -> Literal:
        token = self.peek()
        if token.kind == "num":
            self.advance()
            return Literal(token.value, NUMBER, token.pos)
        if token.kind == "punct" and token.value == "-" and self.tokens[self.index + 1].kind == "num":
            self.advance()
            return Literal(-self.advance().value, NUMBER, token.pos)
        if token.kind == "str":
            self.advance()
            return Literal(token.value, STRING, token.pos)
        if token.kind == "kw" and token.value in ("true", "false"):
            self.advance()
            return Literal(token.value == "true", BOOL, token.pos)
        if token.kind == "kw" and token.value == "null":
            raise ParseError("'null' can only be tested with 'is null' / 'is not null'", token.pos)
        after = self.tokens[self.index + 1] if token.kind == "punct" and token.value == "-" else token
        if after.kind == "name" and after.value.lower() in NONFINITE:  # (a bound or set value: never a field)
            raise ParseError(f"'{after.value}' is not a value here: {NONFINITE_HINT}", after.pos)
        self.fail(f"expected {what}")

    def field(self) -> Field:
        token = self.advance()
        name = token.value
        if self.at("punct", "("):
            raise ParseError(f"'{name}(' looks like a function call; calls are not part of the policy language",
                             self.peek().pos)
        if self.at("punct", "["):
            self.advance()
            key = self.expect("str", None, 'a quoted class name, as in score["deny"]')
            self.expect("punct", "]", "']'")
            return Field(f"{name}.{key.value}", token.pos)
        while self.at("punct", "."):
            self.advance()
            part = self.peek()
            if part.kind not in ("name", "kw"):
                self.fail("expected a name after '.'")
            self.advance()
            name += "." + part.value
        if self.at("punct", "("):
            raise ParseError(f"'{name}(' looks like a function call; calls are not part of the policy language",
                             self.peek().pos)
        return Field(name, token.pos)

    def membership(self, left: Node, negated: bool, token: Token) -> Node:
        field = _as_field(left, "'in'")
        if self.at("punct", "{"):
            self.advance()
            values = [self.literal("a value in the set")]
            while self.at("punct", ","):
                self.advance()
                if self.at("punct", "}"):
                    break
                values.append(self.literal("a value in the set"))
            self.expect("punct", "}", "',' or '}'")
            return Member(field, tuple(values), negated, left.pos)
        if self.at("punct", "[") or self.at("punct", "("):
            lo_closed = self.advance().value == "["
            lo = self.literal("the interval's lower bound")
            self.expect("punct", ",", "',' between the interval's bounds")
            hi = self.literal("the interval's upper bound")
            end = self.peek()
            if not (end.kind == "punct" and end.value in ("]", ")")):
                self.fail("expected ']' or ')' closing the interval")
            self.advance()
            node = Range(field, lo, lo_closed, hi, end.value == "]", left.pos)
            return Not(node, token.pos) if negated else node
        self.fail("expected a set {a, b} or an interval [lo, hi) after 'in'")


def _as_field(node: Node, what: str) -> Field:
    if not isinstance(node, Field):
        raise ParseError(f"{what} needs a field on its left", node.pos)
    return node


def _chained(left: Node, op1: Token, middle: Node, op2: Token, right: Node) -> Node:
    """``lo <= x < hi`` (or ``hi > x >= lo``) becomes a Range; other chains are refused."""
    lower = {"<": False, "<=": True}
    upper = {">": False, ">=": True}
    if not isinstance(middle, Field) or not isinstance(left, Literal) or not isinstance(right, Literal):
        raise ParseError("a chained comparison must read 'value < field < value'", op2.pos)
    if op1.value in lower and op2.value in lower:
        return Range(middle, left, lower[op1.value], right, lower[op2.value], left.pos)
    if op1.value in upper and op2.value in upper:
        return Range(middle, right, upper[op2.value], left, upper[op1.value], left.pos)
    raise ParseError(f"chained comparison '{op1.value} ... {op2.value}' must go one way ('<'/'<=' or '>'/'>=')",
                     op2.pos)


def _case_hint(token: Token) -> str:
    """A hint when ``token`` is a keyword spelled in upper or mixed case (then it was read as a name)."""
    if token.kind != "name" or token.value.lower() not in KEYWORDS:
        return ""
    return case_hint(token.value)


def case_hint(word: str) -> str:
    """"keywords are lower case: ..." for a keyword spelled ``word`` in upper or mixed case, else ""."""
    lower = word.lower()
    if lower == word or lower not in KEYWORDS:
        return ""
    return "keywords are lower case: and, or, not" if lower in ("and", "or", "not") else \
        f"keywords are lower case: {lower}"


def _spelling(token: Token) -> str:
    if token.kind == "str":
        return repr(token.value)
    if token.kind == "num":
        value = token.value
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(token.value)
