"""The table analysis counts floats, not reals: bounds one float apart, open ends, -0.0 (found by
``test_policy_analysis_brute.py``).

The evaluators compare 64-bit floats. Over the reals ``x > 0.5 and x < 0.5000000000000001`` holds rows,
over the floats none: the analysis refused a correct UNIQUE table for that "overlap", let
``x in (0.5, 0.5000000000000001)`` pass as a rule that can match, called rules reachable and the default
needed through that gap only.
"""

from __future__ import annotations

import pytest

from kernel.policy import PolicyError, parse_policy

NEXT = "0.5000000000000001"  # the float right after 0.5


def table(hit: str, *whens: str) -> str:
    rules = "".join(f'\n[[rule]]\nid = "R{i}"\nwhen = "{when}"\naction = "a{i % 2}"\n' for i, when in enumerate(whens))
    return (f'[policy]\nname = "floats"\nversion = "1"\nhit_policy = "{hit}"\n[inputs]\nx = "number"\n'
            f'[outputs]\nactions = ["a0", "a1", "d"]\n{rules}\n[[rule]]\nid = "D"\ndefault = true\naction = "d"\n')


def messages(policy) -> list[str]:
    return [w.message for w in policy.warnings]


def test_rules_one_float_apart_do_not_overlap_under_unique():
    policy = parse_policy(table("UNIQUE", "x > 0.5", f"x < {NEXT}"))  # refused before: "both match every row
    # with x in (0.5, 0.5000000000000001)", where no float lies
    result = policy.evaluate_reference([{"x": 0.5}, {"x": float(NEXT)}])
    assert result.error.tolist() == [None, None]


def test_an_open_interval_with_no_float_inside_can_never_match():
    with pytest.raises(PolicyError) as info:
        parse_policy(table("FIRST", f"x in (0.5, {NEXT})"))
    assert "can never match" in str(info.value)


def test_a_rule_reachable_only_between_two_neighbouring_floats_is_unreachable():
    with pytest.raises(PolicyError) as info:
        parse_policy(table("FIRST", "x <= 0.5", f"x >= {NEXT}", "x > 0.4"))
    assert "rule 'R2'" in str(info.value) and "is unreachable" in str(info.value)


def test_rules_that_leave_no_float_out_make_the_default_dead():
    policy = parse_policy(table("FIRST", "x <= 0.5", f"x >= {NEXT}", "x is null"))
    assert any("default rule never applies" in m for m in messages(policy))


def test_minus_zero_and_zero_overlap_and_are_shown_as_written():
    with pytest.raises(PolicyError) as info:
        parse_policy(table("UNIQUE", "x <= -0.0", "x >= 0"))
    assert "both match e.g. x=0" in str(info.value)
    with pytest.raises(PolicyError) as info:  # a witness inside, not the float next to a bound
        parse_policy(table("UNIQUE", "x > 0.5", "x < 0.75"))
    assert NEXT not in str(info.value) and "0.4999" not in str(info.value)


@pytest.mark.parametrize("when, says", [
    ("x == nan", "unknown field 'nan' (numbers in conditions are finite;"),
    ("x < inf", "unknown field 'inf' (numbers in conditions are finite;"),
    ("x > -inf", "'inf' is not a value here: numbers in conditions are finite;"),  # was: found '-'
    ("x in [0, Infinity)", "'Infinity' is not a value here:"),  # was: expected the interval's upper bound
    ("x in {1, NaN}", "'NaN' is not a value here:"),
])
def test_nan_and_inf_written_as_values_are_refused_saying_how_to_write_the_test(when, says):
    with pytest.raises(PolicyError) as info:
        parse_policy(table("FIRST", when))
    assert says in str(info.value) and "is tested with `x is null`" in str(info.value)


def test_an_input_named_inf_is_still_a_field():
    text = table("FIRST", "x < inf").replace('x = "number"\n', 'x = "number"\ninf = "number"\n')
    assert parse_policy(text).evaluate_reference([{"x": 1.0, "inf": 2.0}]).fired == [("R0",)]
