"""The table analysis again, over only the rows one pipeline can send its policy.

A policy is checked at load for every value its inputs' types allow (it may
serve several pipelines, and ``policy check`` knows none). A pipeline narrows
that: each input it feeds is never missing (required, or its default fills
it in), a number lies within the field's ``min``/``max`` (and is finite), a
string with declared ``values`` is one of them (or the default), and
``label`` is one of the model's classes. A rule that matches only rows
outside that can never fire when this pipeline serves the policy (``fraud_score
> 1`` with ``max = 1.0``; ``fraud_score is null`` was the one case warned
about); a rule reached only through such rows is unreachable there (FIRST:
``x >= 0.5``, ``x < 0.5``, then any rule on ``x``: the gap was the missing
``x``); rules may leave no row to the default there. ``findings`` says so,
as warnings the pipeline's binding reports: the policy still serves other
pipelines, where those rows can occur.

Overlaps need no second look: a UNIQUE table is disjoint over every row, so
over these rows too. Model scores and ``confidence`` keep every value: a
model may return any number (``binding.unlike_probabilities`` warns when
they are not probabilities).
"""

from __future__ import annotations

from .analysis import Analyzer
from .domains import NumSet, StrSet, TokenSet
from .types import BOOL, INTEGER, NUMERIC, Schema

# The verdicts that are about rows (what other findings say, sampling and work limits, the policy's own check
# already said).
VERDICTS = ("can never match", "is unreachable", "never decides", "the default rule never applies")
_FINITE = 1.7976931348623157e308  # a pipeline's number is finite (``FieldSpec.check_number``)


def input_domain(ftype: str, lo: float | None, hi: float | None, values) -> object:
    """The set of values a pipeline field feeds a policy input of type ``ftype``: present, within [lo, hi]
    (numbers), one of ``values`` when given (strings)."""
    if ftype in NUMERIC:
        low = -_FINITE if lo is None else max(float(lo), -_FINITE)
        high = _FINITE if hi is None else min(float(hi), _FINITE)
        return NumSet([(low, True, high, True)], False, ftype == INTEGER)
    if ftype == BOOL:
        return TokenSet({True, False})
    return StrSet(True, values, False) if values else StrSet(False, (), False)


def findings(policy, domains: dict) -> list[tuple[object, str]]:
    """(rule or None for the default, message) for each verdict that holds over ``domains`` (field -> set of
    the values it takes) but that the policy's own check did not give."""
    schema = Schema(dict(policy.inputs), policy.classes)
    ranks = {a: i for i, a in enumerate(policy.actions)}
    # (A UNIQUE table is disjoint over every row already: compared again, as COLLECT, it is not.)
    hit = "COLLECT" if policy.hit_policy == "UNIQUE" else policy.hit_policy
    analyzer = Analyzer([r for r in policy.rules if not r.default], hit, ranks, schema, domains)
    said = {(w.subject, verdict) for w in policy.warnings for verdict in VERDICTS if verdict in w.message}
    out = []
    for finding in analyzer.run():
        verdict = next((v for v in VERDICTS if v in finding.message), None)
        if verdict is None:
            continue
        subject = f"rule '{finding.rule.id}'" if finding.rule is not None else f"rule '{policy.default.id}' (default)"
        if (subject, verdict) not in said:
            out.append((finding.rule, finding.message))
    return out
