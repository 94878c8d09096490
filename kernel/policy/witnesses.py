"""Witness rows for the table analysis: which values to try per field, and how a row is shown.

A finding (two rules overlap) is shown with a row both rules match. Exact
boxes give one directly; where the analysis approximates (field-to-field
comparisons, conditions too complex to expand) rows are sampled from a pool
of values worth trying: every constant in the policy, nudged both ways, plus
missing. The model's outputs (``confidence``, ``score.<class>``) are
probabilities, so their pool holds only values in ``MODEL_OUTPUT_RANGE``: a
witness like ``score.deny=99.999999`` could never come from a model.
"""

from __future__ import annotations

from .domains import MODEL_OUTPUT_RANGE
from .types import BOOL, LABEL, NUMERIC, Schema


def value_pool(rules, schema: Schema) -> dict[str, list]:
    """Values worth trying per field: every constant in the policy, nudged both ways, plus missing."""
    numbers: set[float] = {0.0, 1.0}
    strings: dict[str, set] = {}
    for rule in rules:
        for name, value in _constants(rule.term):
            if isinstance(value, float):
                numbers.update((value, value - 1, value + 1, value - 0.5, value + 0.5, value - 1e-6, value + 1e-6))
            else:
                strings.setdefault(name, set()).add(value)
    ordered = sorted(numbers)
    whole = sorted({float(round(v)) for v in ordered})
    lo, hi = MODEL_OUTPUT_RANGE[0], MODEL_OUTPUT_RANGE[2]
    probabilities = [v for v in ordered if lo <= v <= hi]  # model outputs: witnesses a model can produce
    pool: dict[str, list] = {}
    for rule in rules:
        for name in rule.reads:
            if name in pool:
                continue
            ftype = schema.type_of(name)
            missing = [] if Schema.is_model_output(name) else [None]
            if ftype in NUMERIC:
                if Schema.is_model_output(name):
                    values = probabilities
                else:
                    values = whole if schema.is_integer(name) else ordered
            elif ftype == BOOL:
                values = [True, False]
            elif name == LABEL and schema.classes is not None:
                values = list(schema.classes)
            else:
                values = sorted(strings.get(name, ())) + ["other"]
            pool[name] = values + missing
    return pool


def _constants(term: tuple):
    tag = term[0]
    if tag in ("and", "or"):
        for t in term[1]:
            yield from _constants(t)
    elif tag == "num":
        yield term[1], float(term[3])
    elif tag == "str":
        for v in term[2]:
            yield term[1], v


def show_row(row: dict) -> str:
    def show(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
        return repr(v)
    return ", ".join(f"{k}={show(v)}" for k, v in row.items()) or "any row"
