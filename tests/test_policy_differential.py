"""Random tables, random rows: the compiled evaluators agree with the reference, and the analysis is sound.

Hypothesis writes policies from the whole condition language (comparisons
both ways round, intervals, chained ranges, sets, null tests, bools, labels,
scores, field-to-field comparisons, and/or/not) under every hit policy, and
rows with missing and absent values drawn from the same constants so that
boundaries are hit often. Every evaluator must give the same action, fired
rules, escalation, adjustment and row error. Tables are loaded non-strictly
(analysis findings become warnings), so UNIQUE conflicts at run time and
unreachable rules occur and are compared too; a second test holds the
analysis to its claims on the same rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel.policy import HIT_POLICIES, parse_policy
from kernel.policy.backends import available

NUMBERS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 10.0)
STRINGS = ("p", "q", "r")
CLASSES = ("a", "b", "c")
ACTIONS = ("x1", "x2", "x3")
NUMERIC = ("x", "y", "k", "confidence", "score.a", "score.b")
INPUTS = {"x": "number", "y": "number", "k": "integer", "s": "string", "t": "string", "b": "bool"}
# Hypothesis warns that these recursive strategies have a long repr; that is all it is.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
# AIOS_FUZZ_SCALE=30 (tests/fuzz_budget.py) for a deeper run than the suite's default.
SETTINGS = settings(max_examples=examples(150), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

number = st.one_of(st.sampled_from(NUMBERS), st.floats(-5, 12, allow_nan=False).map(lambda v: round(v, 2)))
op = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


def show(v: float) -> str:
    return repr(float(v))


@st.composite
def interval(draw):
    lo, hi = sorted(draw(st.lists(number, min_size=2, max_size=2, unique=True)))
    field = draw(st.sampled_from(NUMERIC))
    left, right = draw(st.sampled_from("[(")), draw(st.sampled_from("])"))
    if draw(st.booleans()):
        negated = "not " if draw(st.booleans()) else ""
        return f"{field} {negated}in {left}{show(lo)}, {show(hi)}{right}"
    return f"{show(lo)} {'<=' if left == '[' else '<'} {field} {'<=' if right == ']' else '<'} {show(hi)}"


def atoms():
    numeric = st.builds(lambda f, o, v, flip: f"{show(v)} {o} {f}" if flip else f"{f} {o} {show(v)}",
                        st.sampled_from(NUMERIC), op, number, st.booleans())
    pair = st.builds(lambda f, o, g: f"{f} {o} {g}", st.sampled_from(NUMERIC), op, st.sampled_from(NUMERIC))
    numset = st.builds(lambda f, neg, vs: f"{f} {'not in' if neg else 'in'} {{{', '.join(map(show, vs))}}}",
                       st.sampled_from(NUMERIC), st.booleans(), st.lists(number, min_size=1, max_size=3))
    strings = st.builds(lambda f, o, v: f"{f} {o} '{v}'", st.sampled_from(("s", "t")), st.sampled_from(["==", "!="]),
                        st.sampled_from(STRINGS))
    strset = st.builds(lambda f, neg, vs: f"{f} {'not in' if neg else 'in'} {{{', '.join(repr(v) for v in vs)}}}",
                       st.sampled_from(("s", "t")), st.booleans(), st.lists(st.sampled_from(STRINGS), min_size=1,
                                                                             max_size=3))
    labelset = st.builds(lambda neg, vs: f"label {'not in' if neg else 'in'} {{{', '.join(repr(v) for v in vs)}}}",
                         st.booleans(), st.lists(st.sampled_from(CLASSES), min_size=1, max_size=3))
    labels = st.builds(lambda o, v: f"label {o} '{v}'", st.sampled_from(["==", "!="]), st.sampled_from(CLASSES))
    bools = st.sampled_from(["b", "not b", "b == true", "b != true", "b == false", "b in {true}", "b in {false, true}",
                             "b not in {true}", "true", "false"])
    nulls = st.builds(lambda f, neg: f"{f} is {'not ' if neg else ''}null", st.sampled_from(list(INPUTS)),
                      st.booleans())
    return st.one_of(numeric, pair, numset, interval(), strings, strset, labelset, labels, bools, nulls)


conditions = st.recursive(
    atoms(),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a}) and ({b})", inner, inner),
        st.builds(lambda a, b: f"({a}) or ({b})", inner, inner),
        st.builds(lambda a: f"not ({a})", inner),
    ),
    max_leaves=5,
)


@st.composite
def tables(draw):
    hit = draw(st.sampled_from(HIT_POLICIES))
    count = draw(st.integers(1, 6))
    text = (f'[policy]\nname = "random"\nversion = "1"\nhit_policy = "{hit}"\n\n[inputs]\n'
            + "".join(f'{k} = "{v}"\n' for k, v in INPUTS.items())
            + f"\n[model]\nclasses = {json.dumps(list(CLASSES))}\n\n[outputs]\nactions = {json.dumps(list(ACTIONS))}\n")
    adjusts = st.sampled_from([0.0, 0.5, -1.0, 0.25, 1e-3, 0.1])
    for index in range(count):
        text += (f'\n[[rule]]\nid = "R{index + 1}"\nwhen = {json.dumps(draw(conditions))}\n'
                 f'action = "{draw(st.sampled_from(ACTIONS))}"\nescalate = {str(draw(st.booleans())).lower()}\n'
                 f"adjust = {draw(adjusts)}\n")
    text += (f'\n[[rule]]\nid = "D"\ndefault = true\naction = "{draw(st.sampled_from(ACTIONS))}"\n'
             f"escalate = {str(draw(st.booleans())).lower()}\nadjust = {draw(adjusts)}\n")
    return parse_policy(text, source="random.toml", strict=False)


def value(strategy):
    """A field's value: present, None (missing) or absent from the row."""
    return st.one_of(strategy, st.just(None), st.just("<absent>"))


@st.composite
def rows(draw):
    scores = st.one_of(number, st.floats(0, 1, allow_nan=False))
    row = {
        "x": draw(value(number)), "y": draw(value(st.one_of(number, st.integers(-3, 12)))),
        "k": draw(value(st.integers(-2, 11))), "s": draw(value(st.sampled_from(STRINGS + ("zz",)))),
        "t": draw(value(st.sampled_from(STRINGS))), "b": draw(value(st.booleans())),
        "label": draw(st.sampled_from(CLASSES)), "confidence": draw(scores),
        "score.a": draw(scores), "score.b": draw(scores),
    }
    return {k: v for k, v in row.items() if v != "<absent>"}


def outcome(result):
    return (result.action.tolist(), result.fired, result.escalate.tolist(), result.adjust.tolist(),
            result.error.tolist())


@SETTINGS
@given(policy=tables(), batch=st.lists(rows(), min_size=1, max_size=40))
def test_compiled_evaluators_match_the_reference(policy, batch):
    expected = outcome(policy.evaluate_reference(batch))
    table = [(policy.hit_policy, r.id, r.when) for r in policy.rules]  # shown when an assertion fails
    for backend in available():
        compiled = policy.using(backend)
        assert outcome(compiled.evaluate_rows(batch)) == expected, (backend, table)
        assert outcome(compiled.evaluate(compiled.columns(batch), len(batch))) == expected, backend
        # Model outputs handed over as columns, as a pipeline does with a model's batch output.
        outputs = {"label": np.array([r["label"] for r in batch], dtype=object),
                   "confidence": np.array([r["confidence"] for r in batch])}
        assert outcome(compiled.evaluate_rows(batch, outputs)) == expected, backend


def _flagged(policy, phrase: str) -> set[str]:
    return {w.subject.split("'")[1] for w in policy.warnings if phrase in w.message and w.subject.startswith("rule")}


@SETTINGS
@given(policy=tables(), batch=st.lists(rows(), min_size=1, max_size=40))
def test_the_analysis_never_claims_what_rows_contradict(policy, batch):
    reference = policy._reference
    never = _flagged(policy, "can never match")
    unreachable = _flagged(policy, "is unreachable")
    overlapping = _flagged(policy, "overlaps rule") | _flagged(policy, "could not prove")
    default_dead = any("default rule never applies" in w.message for w in policy.warnings)
    result = policy.evaluate_reference(batch)
    for row, fired, error in zip(batch, result.fired, result.error):
        hits = [r.id for r in reference.matches(row)]
        assert not never & set(hits), (never, hits)
        assert not unreachable & set(fired), (unreachable, fired)
        if default_dead:
            assert hits, ("the analysis said the rules cover every row", [(r.id, r.when) for r in policy.rules])
        if policy.hit_policy == "UNIQUE" and not overlapping:
            assert error is None, "the analysis proved the rules disjoint"


def test_a_field_to_field_test_and_its_negation_do_not_cover_rows_with_a_missing_field():
    """Found by the random tables above: with `y` missing, neither `y != confidence` nor its negation is true."""

    policy = parse_policy('''
[policy]
name = "pair"
version = "1"
hit_policy = "UNIQUE"
[inputs]
y = "number"
[outputs]
actions = ["a", "b", "c"]
[[rule]]
id = "R1"
when = "y != confidence"
action = "a"
[[rule]]
id = "R2"
when = "not (y != confidence)"
action = "b"
[[rule]]
id = "D"
default = true
action = "c"
''')
    assert not any("default rule never applies" in w.message for w in policy.warnings)
    result = policy.evaluate_reference([{"y": None, "label": "x", "confidence": 0.5}])
    assert result.fired[0] == ("D",)
