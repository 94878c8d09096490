"""Random tables at the edges: the compiled evaluators agree with the reference there too, and so does the analysis.

``test_policy_differential.py`` draws its constants from a handful of small numbers. Here the constants and
the rows sit where floats and their readers go wrong: -0.0, the smallest subnormal, neighbours one float
apart, 2**53 and whole numbers past it (some no float holds, which every evaluator must refuse alike),
1e308, ±inf and NaN in number fields, numpy integers; strings that differ only in case, Unicode normalization
or a space, and the empty string. Tables have up to 25 rules, many of them the same few conditions (so
rules overlap and shadow each other under every hit policy), conditions nest up to a dozen tests deep with
runs of `not`, and batches are sometimes repeated past the compiled kernel's 256-row blocks and its
1,024-row GIL-free path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel.policy import HIT_POLICIES, PolicyInputError, parse_policy
from kernel.policy.backends import available

SUBNORMAL = 5e-324
NUMBERS = (0.0, -0.0, 1.0, -1.0, SUBNORMAL, -SUBNORMAL, 0.1, 0.30000000000000004, 2.0**53, -(2.0**53),
           2.0**53 + 2, 1e308, -1e308, 1.7976931348623157e308, 1.0000000000000002, 0.9999999999999999)
WHOLE = (0.0, 1.0, -1.0, 3.0, 2.0**53, -(2.0**53), 2.0**53 + 2, 2.0**62)
STRINGS = ("", "A", "a", "\u00c5", "A\u030a", " a")  # (Å composed and decomposed)
CLASSES = ("a", "b", "c")
INPUTS = {"x": "number", "y": "number", "k": "integer", "s": "string", "b": "bool"}
NUMERIC = ("x", "y", "k", "confidence", "score.a", "score.b")
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
SETTINGS = settings(max_examples=examples(60), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

op = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
number = st.sampled_from(NUMBERS)


def text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # (the condition language has no \u escapes)


def interval(field: str, a: float, b: float, left: str, right: str) -> str:
    lo, hi = min(a, b), max(a, b)
    if lo == hi and (left, right) != ("[", "]"):
        return f"{field} == {lo!r}"  # (an empty interval is refused at load)
    return f"{field} in {left}{lo!r}, {hi!r}{right}"


def atoms():
    return st.one_of(
        st.builds(lambda f, o, v: f"{f} {o} {v!r}", st.sampled_from(NUMERIC[:2] + NUMERIC[3:]), op, number),
        st.builds(lambda o, v: f"k {o} {v!r}", op, st.sampled_from(WHOLE)),
        st.builds(interval, st.sampled_from(NUMERIC), number, number, st.sampled_from("[("), st.sampled_from("])")),
        st.builds(lambda f, neg, vs: f"{f} {'not in' if neg else 'in'} {{{', '.join(map(repr, vs))}}}",
                  st.sampled_from(NUMERIC), st.booleans(), st.lists(number, min_size=1, max_size=4)),
        st.builds(lambda f, o, g: f"{f} {o} {g}", st.sampled_from(NUMERIC), op, st.sampled_from(NUMERIC)),
        st.builds(lambda o, v: f"s {o} {text(v)}", st.sampled_from(["==", "!="]), st.sampled_from(STRINGS)),
        st.builds(lambda neg, vs: f"s {'not in' if neg else 'in'} {{{', '.join(map(text, vs))}}}",
                  st.booleans(), st.lists(st.sampled_from(STRINGS), min_size=1, max_size=3)),
        st.builds(lambda neg, vs: f"label {'not in' if neg else 'in'} {{{', '.join(map(text, vs))}}}",
                  st.booleans(), st.lists(st.sampled_from(CLASSES), min_size=1, max_size=3)),
        st.sampled_from(["b", "not b", "b == false", "b != false", "b in {true, false}", "b not in {true, false}",
                         "true", "false"]),
        st.builds(lambda f, neg: f"{f} is {'not ' if neg else ''}null", st.sampled_from(list(INPUTS)),
                  st.booleans()),
    )


conditions = st.recursive(atoms(), lambda inner: st.one_of(
    st.builds(lambda a, b: f"({a}) and ({b})", inner, inner),
    st.builds(lambda a, b: f"({a}) or ({b})", inner, inner),
    st.builds(lambda a, n: "not " * n + f"({a})", inner, st.integers(1, 6)),
), max_leaves=12)


@st.composite
def tables(draw):
    hit = draw(st.sampled_from(HIT_POLICIES))
    source = (f'[policy]\nname = "edges"\nversion = "1"\nhit_policy = "{hit}"\n\n[inputs]\n'
              + "".join(f'{k} = "{v}"\n' for k, v in INPUTS.items())
              + f'\n[model]\nclasses = {json.dumps(list(CLASSES))}\n\n[outputs]\nactions = ["x1", "x2", "x3"]\n')
    shared = [draw(conditions) for _ in range(draw(st.integers(1, 4)))]  # rules that repeat: overlap, shadowing
    for index in range(draw(st.integers(1, 25))):
        when = draw(st.one_of(st.sampled_from(shared), conditions))
        source += (f'\n[[rule]]\nid = "R{index}"\nwhen = {json.dumps(when)}\n'
                   f'action = "{draw(st.sampled_from(["x1", "x2", "x3"]))}"\n'
                   f"escalate = {str(draw(st.booleans())).lower()}\n"
                   f"adjust = {draw(st.sampled_from([0.0, 0.1, -0.1, 1e6, -1e6, 1e-300, 0.5]))!r}\n")
    source += '\n[[rule]]\nid = "D"\ndefault = true\naction = "x3"\nescalate = true\nadjust = -0.5\n'
    return parse_policy(source, source="edges.toml", strict=False)


def neighbours(value: float) -> list[float]:
    return [value, math.nextafter(value, math.inf), math.nextafter(value, -math.inf)] if math.isfinite(value) \
        else [value]


def present_or_not(strategy, dense: bool):
    """A value, or (unless ``dense``: a column with no gap is read another way) None or no value at all."""
    return strategy if dense else st.one_of(strategy, st.just(None), st.just("<absent>"))


floats = st.one_of(number.flatmap(lambda v: st.sampled_from(neighbours(v))),
                   st.sampled_from([math.inf, -math.inf, math.nan]), st.floats(allow_nan=False))
wholes = st.one_of(st.sampled_from(WHOLE).map(int).flatmap(lambda v: st.sampled_from([v - 1, v, v + 1])),
                   st.integers(-(2**63), 2**63 - 1), st.integers(-100, 100).map(np.int64), st.booleans())
probabilities = st.one_of(st.floats(0, 1), st.sampled_from([0.0, -0.0, 1.0, SUBNORMAL, 0.1, 0.30000000000000004,
                                                           1.0000000000000002, 0.9999999999999999]))


@st.composite
def rows(draw, dense: bool = False):
    strings = st.sampled_from(STRINGS + ("zz",))
    row = {"x": draw(present_or_not(floats, dense)), "y": draw(present_or_not(st.one_of(floats, wholes), dense)),
           "k": draw(present_or_not(wholes, dense)), "s": draw(present_or_not(strings, dense)),
           "b": draw(present_or_not(st.booleans(), dense)), "label": draw(st.sampled_from(CLASSES)),
           "confidence": draw(probabilities), "score.a": draw(probabilities), "score.b": draw(probabilities)}
    return {k: v for k, v in row.items() if not (isinstance(v, str) and v == "<absent>")}


def outcome(evaluate):
    """The outcome arrays, or "refused" (which field a batch with several bad values names first may differ
    between a row-by-row and a column-by-column reader; that every reader refuses it may not)."""
    try:
        result = evaluate()
    except PolicyInputError:
        return "refused"
    return (result.action.tolist(), result.fired, result.escalate.tolist(), result.adjust.tolist(),
            result.error.tolist())


batches = st.booleans().flatmap(lambda dense: st.lists(rows(dense), min_size=1, max_size=30))


@SETTINGS
@given(policy=tables(), batch=batches, repeat=st.sampled_from([1, 1, 1, 9, 40]))
def test_compiled_evaluators_match_the_reference_at_the_edges(policy, batch, repeat):
    batch = (batch * repeat)[:max(len(batch), 1100)]
    expected = outcome(lambda: policy.evaluate_reference(batch))
    table = [(policy.hit_policy, r.id, r.when) for r in policy.rules]  # shown when an assertion fails
    for backend in available():
        compiled = policy.using(backend)
        assert outcome(lambda: compiled.evaluate_rows(batch)) == expected, (backend, table)
        if expected != "refused":
            assert outcome(lambda: compiled.evaluate(compiled.columns(batch), len(batch))) == expected, backend
            outputs = {"label": np.array([CLASSES.index(r["label"]) for r in batch]),  # class indices
                       "confidence": np.array([r["confidence"] for r in batch])}
            assert outcome(lambda: compiled.evaluate_rows(batch, outputs)) == expected, backend


def _flagged(policy, phrase: str) -> set[str]:
    return {w.subject.split("'")[1] for w in policy.warnings if phrase in w.message and w.subject.startswith("rule")}


@SETTINGS
@given(policy=tables(), batch=batches)
def test_the_analysis_never_claims_what_rows_at_the_edges_contradict(policy, batch):
    reference = policy._reference
    if outcome(lambda: policy.evaluate_reference(batch)) == "refused":
        batch = [row for row in batch if outcome(lambda: policy.evaluate_reference([row])) != "refused"]
    never = _flagged(policy, "can never match")
    unreachable = _flagged(policy, "is unreachable")
    undecided = {"overlaps rule", "could not prove", "too complex", "work limit"}
    overlapping = set().union(*(_flagged(policy, phrase) for phrase in undecided))
    default_dead = any("default rule never applies" in w.message for w in policy.warnings)
    result = policy.evaluate_reference(batch)
    for row, fired, error in zip(batch, result.fired, result.error):
        hits = [r.id for r in reference.matches(row)]
        assert not never & set(hits), (never, hits, row)
        assert not unreachable & set(fired), (unreachable, fired, row)
        if default_dead:
            assert hits, ("the analysis said the rules cover every row", row)
        if policy.hit_policy == "UNIQUE" and not overlapping and policy.analysis_complete:
            assert error is None, ("the analysis proved the rules disjoint", row)
