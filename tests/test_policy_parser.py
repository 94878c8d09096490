"""The condition language: what parses (and into what), what is refused, and where the error points."""

from __future__ import annotations

import pytest

from kernel.policy.parser import MAX_DEPTH, MAX_LENGTH, ParseError, parse_condition, tokenize
from kernel.policy.syntax import And, Compare, Field, IsNull, Literal, Member, Not, Or, Range, Truth


def test_comparison_and_precedence():
    node = parse_condition("fraud_score >= 0.9 and amount > 1000 or not flag")
    assert isinstance(node, Or)
    left, right = node.operands
    assert isinstance(left, And) and len(left.operands) == 2
    first = left.operands[0]
    assert isinstance(first, Compare) and first.op == ">=" and first.left.name == "fraud_score"
    assert first.right.value == 0.9 and first.right.kind == "number"
    assert isinstance(right, Not) and isinstance(right.operand, Truth) and right.operand.operand.name == "flag"


def test_parentheses_override_precedence():
    node = parse_condition("(a > 1 or b > 2) and c > 3")
    assert isinstance(node, And) and isinstance(node.operands[0], Or)


@pytest.mark.parametrize("text, lo, lo_closed, hi, hi_closed", [
    ("amount in [1000, 5000)", 1000.0, True, 5000.0, False),
    ("amount in (1000, 5000]", 1000.0, False, 5000.0, True),
    ("1000 <= amount < 5000", 1000.0, True, 5000.0, False),
    ("1000 < amount <= 5000", 1000.0, False, 5000.0, True),
    ("5000 > amount >= 1000", 1000.0, True, 5000.0, False),
    ("amount in [-5, -1]", -5.0, True, -1.0, True),
])
def test_ranges(text, lo, lo_closed, hi, hi_closed):
    node = parse_condition(text)
    assert isinstance(node, Range) and node.field.name == "amount"
    assert (node.lo.value, node.lo_closed, node.hi.value, node.hi_closed) == (lo, lo_closed, hi, hi_closed)


def test_negated_range_is_not_of_range():
    node = parse_condition("amount not in [1, 2]")
    assert isinstance(node, Not) and isinstance(node.operand, Range)


def test_sets_strings_and_escapes():
    node = parse_condition("""tier in {"gold", 'plat\\'inum', "a\\"b\\n",}""")
    assert isinstance(node, Member) and not node.negated
    assert [v.value for v in node.values] == ["gold", "plat'inum", 'a"b\n']
    assert parse_condition("tier not in {'x'}").negated


def test_fields_with_classes_and_null_tests():
    node = parse_condition('score["high risk"] > score.deny and x is not null and y is null')
    compare, not_null, null = node.operands
    assert compare.left.name == "score.high risk" and compare.right.name == "score.deny"
    assert isinstance(not_null, IsNull) and not_null.negated and not null.negated


def test_literals():
    node = parse_condition("a == -2.5e3 and b == true and c == 'x' and d == 7")
    values = [(n.right.value, n.right.kind) for n in node.operands]
    assert values == [(-2500.0, "number"), (True, "bool"), ("x", "string"), (7.0, "number")]
    assert isinstance(parse_condition("true"), Truth)
    literal = parse_condition("false").operand
    assert isinstance(literal, Literal) and literal.value is False


def test_positions_are_character_offsets():
    node = parse_condition("a > 1 and   bb == 'x'")
    assert node.operands[1].pos == 12
    assert isinstance(node.operands[1].left, Field) and node.operands[1].left.pos == 12


@pytest.mark.parametrize("text, message, pos", [
    ("a = 3", "use '==' to compare", 2),
    ("a > 1 && b", "use 'and'", 6),
    ("a > 1 || b", "use 'or'", 6),
    ("!a", "use 'not'", 0),
    ("a + 1 > 2", "arithmetic is not part", 2),
    ("__import__('os').system('x')", "calls are not part of the policy language", 10),
    ("a.b(1)", "calls are not part", 3),
    ("a > ", "found end of condition", 4),
    ("a b", "a missing operator?", 2),
    ("amount > 5 AND age < 3", "a missing operator?), found 'AND' (keywords are lower case: and, or, not)", 11),
    ("NOT a > 5", "found 'a' (keywords are lower case: and, or, not)", 4),
    ("a > 5 Or b", "found 'Or' (keywords are lower case: and, or, not)", 6),
    ("a IN [1, 2)", "found 'IN' (keywords are lower case: in)", 2),
    ("a is NULL", "expected 'null' after 'is', found 'NULL' (keywords are lower case: null)", 5),
    ("'open", "string is not closed", 0),
    ("a == 'x\\q'", "unknown escape", 7),
    ("a in 3", "expected a set {a, b} or an interval", 5),
    ("a in [1 2]", "expected ',' between the interval's bounds", 8),
    ("a in [1..10)", "'..' is not part of the policy language: write an interval with a comma", 7),  # FEEL's range
    ("a in [1.5..10]", "write an interval with a comma between its bounds, as in [1000, 5000)", 9),
    ("a in [-1 ..10]", "'..' is not part", 9),
    ("a in [1, 2}", "expected ']' or ')'", 10),
    ("null == a", "'null' can only be tested with 'is null'", 0),
    ("a is 3", "expected 'null' after 'is'", 5),
    ("3 is null", "'is null' needs a field on its left", 0),
    ("1 < a > 2", "must go one way", 6),
    ("a < b < c", "must read 'value < field < value'", 6),
    ("", "empty condition", 0),
    ("(a > 1", "expected ')'", 6),
    ("a > 1e999", "too large", 4),
    ("a == $x", "unexpected '$'", 5),
    ("a in {1, 2", "expected ',' or '}'", 10),
    ("score[deny] > 1", "a quoted class name", 6),
])
def test_refusals_name_the_position(text, message, pos):
    with pytest.raises(ParseError) as info:
        parse_condition(text)
    assert message in info.value.message
    assert info.value.pos == pos
    if text == "a b":
        assert "keywords" not in info.value.message  # the hint is for keywords in capitals only


def test_limits_bound_untrusted_input():
    with pytest.raises(ParseError, match="limit"):
        parse_condition("a > 1 or " * (MAX_LENGTH // 9) + "a > 1")
    with pytest.raises(ParseError, match="nests deeper"):
        parse_condition("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(ParseError, match="nests deeper"):
        parse_condition("not " * (MAX_DEPTH + 1) + "a")
    parse_condition("(" * (MAX_DEPTH - 1) + "a" + ")" * (MAX_DEPTH - 1))  # just inside the limit


def test_keywords_are_not_fields_and_tokens_keep_positions():
    tokens = tokenize("a and not b")
    assert [(t.kind, t.value, t.pos) for t in tokens] == [
        ("name", "a", 0), ("kw", "and", 2), ("kw", "not", 6), ("name", "b", 10), ("end", None, 11)]
    with pytest.raises(ParseError):
        parse_condition("and > 1")
