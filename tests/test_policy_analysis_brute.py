"""The table analysis' verdicts against brute force: every claim both ways, on every row that can tell.

For conditions that test fields against constants only (no field-to-field comparisons) the analysis is
meant to be exact, so each of its verdicts can be checked in both directions: "can never match",
"overlaps" (UNIQUE), "is unreachable" (FIRST), "never decides" (PRIORITY) and "the default rule never
applies" each hold exactly when rows say so. Rows are all combinations of the values that tell a table's
rules apart: per number field every constant, the floats just above and below it, -0.0, ±inf and missing;
per integer field the whole numbers around each constant; per string field each constant, the other
Unicode spelling of it (composed / decomposed), another string and missing. Between two of those values
every test of the table has one outcome, so a verdict the rows contradict, or one they support and the
analysis does not give, is a wrong verdict, not a missed sample. Which rules a row matches is read from the
table loaded under COLLECT (every matching rule fires), with both compiled evaluators and the reference.
"""

from __future__ import annotations

import itertools
import json
import math
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel.policy import parse_policy
from kernel.policy.backends import available
from kernel.policy.domains import NumSet, StrSet
from kernel.policy.within import findings, input_domain

BIG = 1.7976931348623157e308
NUMBERS = (0.0, -0.0, 0.5, math.nextafter(0.5, 1.0), math.nextafter(0.5, 0.0), 1.0, -1.0, 5e-324, -5e-324,
           0.1, 0.30000000000000004, 1e308, BIG, -BIG, 2.5)
WHOLES = (0.0, 1.0, -1.0, 0.5, 2.5, 3.0, -0.0)
STRINGS = ("\u00e9", "e\u0301", "a", "")  # é composed and decomposed
INPUTS = {"x": "number", "k": "integer", "s": "string", "b": "bool"}
CLASSES = ("\u00e9", "e\u0301", "a")  # a model's classes may be two spellings of one word: two classes
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
SETTINGS = settings(max_examples=examples(80), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
MAX_ROWS = 6_000

op = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


def text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def interval(field: str, a: float, b: float, left: str, right: str) -> str:
    lo, hi = min(a, b), max(a, b)
    if lo == hi and (left, right) != ("[", "]"):
        return f"{field} in [{lo!r}, {hi!r}]"  # (an interval empty as written is refused at load)
    return f"{field} in {left}{lo!r}, {hi!r}{right}"


def atoms(pool: list[float]):
    """Tests of single fields against constants; numbers from ``pool``, a few values one float apart, so that
    bounds meet, miss each other by one float and coincide as -0.0 and 0."""
    numeric = st.sampled_from(("x", "confidence"))
    number = st.sampled_from(pool)
    return st.one_of(
        st.builds(lambda f, o, v: f"{f} {o} {v!r}", numeric, op, number),
        st.builds(lambda o, v: f"k {o} {v!r}", op, st.sampled_from(WHOLES)),
        st.builds(lambda f, o, g: f"{f} {o} {g}", st.sampled_from(("x", "k")), op,
                  st.sampled_from(("confidence", "x"))),
        st.builds(interval, numeric, number, number, st.sampled_from("[("), st.sampled_from("])")),
        st.builds(interval, st.just("k"), st.sampled_from(WHOLES), st.sampled_from(WHOLES), st.sampled_from("[("),
                  st.sampled_from("])")),
        st.builds(lambda f, neg, vs: f"{f} {'not in' if neg else 'in'} {{{', '.join(map(repr, vs))}}}",
                  st.sampled_from(("x", "k")), st.booleans(), st.lists(number, min_size=1, max_size=3)),
        st.builds(lambda o, v: f"s {o} {text(v)}", st.sampled_from(["==", "!="]), st.sampled_from(STRINGS)),
        st.builds(lambda neg, vs: f"s {'not in' if neg else 'in'} {{{', '.join(map(text, vs))}}}",
                  st.booleans(), st.lists(st.sampled_from(STRINGS), min_size=1, max_size=2)),
        st.builds(lambda o, v: f"label {o} {text(v)}", st.sampled_from(["==", "!="]), st.sampled_from(CLASSES)),
        st.builds(lambda neg, vs: f"label {'not in' if neg else 'in'} {{{', '.join(map(text, vs))}}}",
                  st.booleans(), st.lists(st.sampled_from(CLASSES), min_size=1, max_size=2)),
        st.sampled_from(["b", "not b", "b == false", "b != true"]),
        st.builds(lambda f, neg: f"{f} is {'not ' if neg else ''}null", st.sampled_from(list(INPUTS)),
                  st.booleans()),
    )


def conditions(pool: list[float]):
    return st.recursive(atoms(pool), lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a}) and ({b})", inner, inner),
        st.builds(lambda a, b: f"({a}) or ({b})", inner, inner),
        st.builds(lambda a: f"not ({a})", inner),
    ), max_leaves=3)


@st.composite
def pools(draw) -> list[float]:
    base = draw(st.sampled_from(NUMBERS))
    near = [base, math.nextafter(base, math.inf), math.nextafter(base, -math.inf), -base]
    chosen = near[:draw(st.integers(1, 4))] + draw(st.lists(st.sampled_from(NUMBERS), max_size=2))
    return sorted({v for v in chosen if math.isfinite(v)}, key=repr)


def source(hit: str, whens: list[str], actions: list[str]) -> str:
    out = (f'[policy]\nname = "brute"\nversion = "1"\nhit_policy = "{hit}"\n\n[inputs]\n'
           + "".join(f'{k} = "{v}"\n' for k, v in INPUTS.items())
           + f'\n[model]\nclasses = {json.dumps(list(CLASSES), ensure_ascii=False)}\n'
           + '\n[outputs]\nactions = ["a1", "a2", "a3"]\n')
    for index, (when, action) in enumerate(zip(whens, actions)):
        out += f'\n[[rule]]\nid = "R{index}"\nwhen = {json.dumps(when, ensure_ascii=False)}\naction = "{action}"\n'
    return out + '\n[[rule]]\nid = "D"\ndefault = true\naction = "a3"\n'


@st.composite
def tables(draw):
    hit = draw(st.sampled_from(("UNIQUE", "FIRST", "PRIORITY", "COLLECT")))
    count = draw(st.integers(1, 4))
    pool = draw(pools())
    whens = [draw(conditions(pool)) for _ in range(count)]
    if count > 1 and draw(st.booleans()):  # a repeated condition: overlaps and shadowing for sure
        whens[-1] = whens[0]
    actions = [draw(st.sampled_from(("a1", "a2", "a3"))) for _ in range(count)]
    return hit, whens, actions


def around(values) -> list[float]:
    """Every float that tells tests on these constants apart: each, its neighbours, -0.0 and the infinities."""
    out = {-math.inf, math.inf, 0.0}
    for v in values:
        out.update((v, math.nextafter(v, math.inf), math.nextafter(v, -math.inf)))
    return sorted(out) + [-0.0]


def candidates(policy) -> dict[str, list]:
    """Per field the table reads, the values every row is built from (see the module's docstring)."""
    numbers = [float(v) for rule in policy.rules if rule.term is not None for v in _numbers(rule.term)]
    out = {}
    for name in policy.reads:
        if name == "x":
            out[name] = around(numbers) + [None]
        elif name == "confidence":
            out[name] = around(numbers)  # a model output is never missing
        elif name == "k":
            wholes = {float(w) for v in numbers if math.isfinite(v) for w in (math.floor(v) - 1, math.floor(v),
                                                                            math.ceil(v), math.ceil(v) + 1)}
            out[name] = sorted(wholes | {0.0}) + [None]
        elif name == "label":
            out[name] = list(CLASSES)  # a model output: one of the classes, never missing
        elif name == "s":
            spellings = {unicodedata.normalize(form, v) for v in STRINGS for form in ("NFC", "NFD")}
            out[name] = sorted(spellings | {"other"}) + [None]
        else:
            out[name] = [True, False, None]
    return out


def atoms_of(term):
    if term[0] in ("and", "or"):
        for t in term[1]:
            yield from atoms_of(t)
    else:
        yield term


def _numbers(term):
    if term[0] in ("and", "or"):
        for t in term[1]:
            yield from _numbers(t)
    elif term[0] == "num":
        yield term[3]


def flagged(policy, phrase: str) -> set[str]:
    return {w.subject.split("'")[1] for w in policy.warnings if phrase in w.message and w.subject.startswith("rule")}


def overlapping_pairs(policy) -> set[tuple[str, str]]:
    pairs = set()
    for w in policy.warnings:
        if "overlaps rule" in w.message:
            pairs.add((w.message.split("'")[1], w.subject.split("'")[1]))
    return pairs


def every_row(values: dict) -> list[dict]:
    """Every combination of ``values`` (input name -> its candidate values), the model's outputs fixed where the
    table does not read them."""
    names = list(values)
    rows = [dict(zip(names, combo)) for combo in itertools.product(*values.values())] or [{}]
    for row in rows:
        row.setdefault("label", CLASSES[0])
        row.setdefault("confidence", 0.5)
    return rows


def matches(collect, rows: list[dict]) -> np.ndarray:
    """rows x rules: which rules each row matches, read under COLLECT; every evaluator must agree."""
    ids = [r.id for r in collect.rules if not r.default]
    grids = []
    for backend in available():
        fired = collect.using(backend).evaluate_rows(rows).fired
        grids.append(np.array([[rid in f for rid in ids] for f in fired], dtype=bool).reshape(len(rows), len(ids)))
    step = max(1, len(rows) // 400)  # the reference row by row: a spread of the rows (the ends included)
    sample = rows[::step] + rows[-1:]
    ref = collect.evaluate_reference(sample).fired
    ref_grid = np.array([[rid in f for rid in ids] for f in ref], dtype=bool).reshape(len(sample), len(ids))
    for grid in grids[1:]:
        assert (grid == grids[0]).all(), "the compiled evaluators disagree"
    assert (np.vstack([grids[0][::step], grids[0][-1:]]) == ref_grid).all(), "compiled and reference disagree"
    return grids[0]


@SETTINGS
@given(table=tables())
def test_the_analysis_verdicts_are_exactly_what_brute_force_finds(table):
    hit, whens, actions = table
    policy = parse_policy(source(hit, whens, actions), source="brute.toml", strict=False)
    collect = parse_policy(source("COLLECT", whens, actions), source="brute.toml", strict=False)
    # Field-to-field comparisons are approximated (a yes/no fact per pair of fields): there the verdicts must
    # only hold (what it claims, rows do not contradict), not be complete.
    approximate = {"could not prove", "too complex", "work limit", "not decided", "sampling"}
    exact = not any(phrase in w.message for w in policy.warnings for phrase in approximate) and \
        not any(t[0] == "pair" for r in collect.rules if r.term is not None for t in atoms_of(r.term))
    agrees = (lambda claimed, found: claimed == found) if exact else (lambda claimed, found: claimed <= found)
    values = candidates(collect)
    size = math.prod(len(v) for v in values.values())
    assume(size <= MAX_ROWS)
    rows = every_row(values)
    grid = matches(collect, rows)
    ids = [r.id for r in collect.rules if not r.default]
    shown = list(zip(ids, whens))

    never = flagged(policy, "can never match")
    can = {rid for j, rid in enumerate(ids) if grid[:, j].any()}
    assert agrees(never, set(ids) - can), ("can never match", never, shown)

    default_dead = any("default rule never applies" in w.message for w in policy.warnings)
    assert agrees({default_dead} - {False}, {bool(grid.any(axis=1).all())} - {False}), ("default dead", shown)

    if hit == "UNIQUE":
        found = {(ids[i], ids[j]) for i, j in itertools.combinations(range(len(ids)), 2)
                 if ids[i] in can and ids[j] in can and (grid[:, i] & grid[:, j]).any()}
        if exact:
            assert overlapping_pairs(policy) == found, ("overlaps", shown)
        else:  # an overlap claimed shows a row; one not claimed is at least warned about
            unsure = {w.subject.split("'")[1] for w in policy.warnings if "could not prove" in w.message
                      or "sampling" in w.message or "work limit" in w.message}
            assert overlapping_pairs(policy) <= found, ("overlaps", shown)
            assert all(later in unsure or (earlier, later) in overlapping_pairs(policy) for earlier, later in found), \
                ("overlap not warned about", shown)
    if hit == "FIRST":
        hidden = {rid for j, rid in enumerate(ids)
                  if rid in can and not (grid[:, j] & ~grid[:, :j].any(axis=1)).any()}
        assert agrees(flagged(policy, "is unreachable"), hidden), ("unreachable", shown)
    if hit == "PRIORITY":
        rank = {"a1": 0, "a2": 1, "a3": 2}
        hidden = set()
        for j, rid in enumerate(ids):
            better = [i for i in range(len(ids)) if rank[actions[i]] < rank[actions[j]]
                      or (rank[actions[i]] == rank[actions[j]] and i < j)]
            if rid in can and not (grid[:, j] & ~grid[:, better].any(axis=1)).any():
                hidden.add(rid)
        assert agrees(flagged(policy, "never decides"), hidden), ("never decides", shown)


@st.composite
def narrowings(draw, pool):
    """What a pipeline may tell of its fields: x within [lo, hi] (either end open-ended), k within whole bounds,
    s one of a few values; none of them ever missing."""
    lo, hi = sorted(draw(st.lists(st.sampled_from(pool + [None]), min_size=2, max_size=2)), key=lambda v: (
        v is not None, v if v is not None else 0))
    lo = lo if draw(st.booleans()) else None
    k_lo, k_hi = sorted(draw(st.lists(st.integers(-2, 3), min_size=2, max_size=2)))
    values = tuple(draw(st.lists(st.sampled_from(STRINGS + ("other",)), max_size=3, unique=True)))
    return {"x": (lo, hi), "k": (float(k_lo), float(k_hi)), "s": values}


@SETTINGS
@given(table=tables(), data=st.data())
def test_the_verdicts_for_one_pipelines_rows_are_what_brute_force_finds_there(table, data):
    """``policy/within.py``: the same verdicts over only the rows a pipeline sends (ranges, values, nothing
    missing), with the policy's own verdicts (which hold there too) making up the rest."""
    hit, whens, actions = table
    policy = parse_policy(source(hit, whens, actions), source="brute.toml", strict=False)
    collect = parse_policy(source("COLLECT", whens, actions), source="brute.toml", strict=False)
    approximate = {"could not prove", "too complex", "work limit", "not decided", "sampling"}
    assume(not any(phrase in w.message for w in policy.warnings for phrase in approximate))
    assume(not any(t[0] == "pair" for r in collect.rules if r.term is not None for t in atoms_of(r.term)))
    pool = sorted({float(v) for r in collect.rules if r.term is not None for v in _numbers(r.term)})
    narrow = data.draw(narrowings(pool or [0.0]))
    types = {"x": "number", "k": "integer", "s": "string", "b": "bool"}
    domains = {name: input_domain(types[name], *narrow[name], ()) if name != "s" else input_domain("string", None, None,
                                                                                                narrow["s"])
               for name in ("x", "k", "s") if name in collect.reads}
    if "b" in collect.reads:
        domains["b"] = input_domain("bool", None, None, ())
    values = candidates(collect)
    for name, domain in domains.items():
        inside = [v for v in values[name] if v is not None and holds(domain, v)]
        if name in ("x", "k"):  # the domain's own bounds cut the line too
            ends = [e for e in narrow[name] if e is not None]
            near = around(ends) if name == "x" else [e + d for e in ends for d in (-1.0, 0.0, 1.0)]
            inside += [v for v in near if holds(domain, v)]
        values[name] = sorted(set(inside), key=repr) or [None]
    assume(all(v != [None] for v in values.values()))
    assume(math.prod(len(v) for v in values.values()) <= MAX_ROWS)
    rows = every_row(values)
    grid = matches(collect, rows)
    ids = [r.id for r in collect.rules if not r.default]
    shown = (list(zip(ids, whens)), narrow)
    said = [(rule.id if rule is not None else "D", message) for rule, message in findings(policy, domains)]
    said += [(w.subject.split("'")[1], w.message) for w in policy.warnings if w.subject.startswith("rule")]

    def claimed(phrase):
        return {rid for rid, message in said if phrase in message}

    can = {rid for j, rid in enumerate(ids) if grid[:, j].any()}
    assert claimed("can never match") == set(ids) - can, ("can never match", shown)
    assert ("D" in claimed("default rule never applies")) == bool(grid.any(axis=1).all()), ("default", shown)
    if hit == "FIRST":
        hidden = {rid for j, rid in enumerate(ids)
                  if rid in can and not (grid[:, j] & ~grid[:, :j].any(axis=1)).any()}
        assert claimed("is unreachable") & can == hidden, ("unreachable", shown)


def holds(domain, value) -> bool:
    if isinstance(domain, NumSet):
        return any(lo <= value <= hi for lo, _, hi, _ in domain.intervals)
    if isinstance(domain, StrSet):
        return (value in domain.values) == domain.finite
    return value in domain.tokens
