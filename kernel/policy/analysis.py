"""Load-time analysis of a rule table: rules that can never match, overlaps, unreachable rules.

Each rule's condition (in normal form, ``normal.py``) becomes a union of
*boxes*: a box constrains each field to a set of values (``domains.py``) and
a row is in the box when every field's value is in its set. For conditions
built from tests of one field against constants this is exact, so:

* a rule with no box can never match (error);
* UNIQUE: two rules overlap when a box of one meets a box of the other; the
  error shows a witness row from the common box, confirmed by the reference
  evaluator;
* FIRST: a rule is unreachable when its boxes minus the earlier rules' boxes
  leave nothing (error); PRIORITY: the same against the rules that outrank
  it (warning, the rule still documents intent);
* the default never applies when the rules cover every row (warning).

What the analysis cannot decide, and what it does then (never a silent pass):

* field-to-field comparisons (``score.deny > score.approve``) are treated as a
  separate yes/no fact per pair of fields, ignoring how it relates to each
  field's own range. "Cannot match" and "unreachable" verdicts stay sound (the
  approximation only adds rows). An overlap found this way is confirmed by
  sampling rows from the common box; if no sample confirms it, the pair gets
  a *warning* ("could not prove these rules disjoint"), not an error, and at
  run time a row matching both is reported as an error for that row;
* a condition whose expansion exceeds ``MAX_TERMS`` boxes, or a subtraction
  that exceeds ``MAX_BOXES``, is checked by sampling instead, with a warning.

Sampling is seeded, so the same file always gets the same verdict.
"""

from __future__ import annotations

import random

from .domains import NumSet, StrSet, TokenSet
from .reference import truth
from .types import BOOL, LABEL, NUMERIC, Schema

MAX_TERMS = 256      # boxes per rule condition
MAX_BOXES = 20_000   # boxes alive while subtracting one rule's boxes from another's
WORK_LIMIT = 200_000  # box operations for a whole table (about a second here): an upload cannot stall a load
MAX_ERRORS = 50      # findings of errors before the analysis stops listing them
SAMPLES = 400        # rows tried when sampling for a witness
SEED = 20261125
LT, EQ, GT = "<", "==", ">"
_PAIR_SETS = {"<": {LT}, "<=": {LT, EQ}, "==": {EQ}, "!=": {LT, GT}, ">=": {EQ, GT}, ">": {GT}}


class Undecided(Exception):
    """The analysis would exceed its limits for one rule."""


class Exhausted(Exception):
    """The analysis used up its work limit (or listed enough errors) for the whole table."""


class Universe:
    """The full set of each analysis key: a field, or ("pair", f, g) for field-to-field comparisons."""

    __slots__ = ("schema", "_full")

    def __init__(self, schema: Schema):
        self.schema = schema
        self._full: dict = {}

    def full(self, key):
        found = self._full.get(key)
        if found is None:
            found = self._full[key] = self._make_full(key)
        return found

    def _make_full(self, key):
        if isinstance(key, tuple):
            # A comparison of two fields is unknown (None) when either may be missing: `f != g` and
            # `not (f != g)` then leave that row to the default, which a coverage claim must see.
            _, f, g = key
            missing = not (Schema.is_model_output(f) and Schema.is_model_output(g))
            return TokenSet({LT, EQ, GT, None} if missing else {LT, EQ, GT})
        ftype = self.schema.type_of(key)
        missing = not Schema.is_model_output(key)
        if ftype in NUMERIC:
            return NumSet.full(self.schema.is_integer(key), missing)
        if ftype == BOOL:
            return TokenSet({True, False, None} if missing else {True, False})
        return StrSet.full(self.schema.classes if key == LABEL else None, missing)

    def test_set(self, term: tuple):
        """(key, set of values) where a normal-form test is true."""
        tag, name = term[0], term[1]
        if tag == "pair":
            return ("pair", name, term[3]), TokenSet(_PAIR_SETS[term[2]])
        full = self.full(name)
        if tag == "num":
            return name, NumSet.compare(term[2], term[3], self.schema.is_integer(name))
        if tag == "str":
            values = StrSet(True, term[2])
            present = full - StrSet(True, (), True)
            return name, (present & values) if term[3] else (present - values)
        if tag == "bool":
            return name, TokenSet({term[2]})
        only_missing = _only_missing(full)
        if tag == "known":  # true on present values (or never)
            return name, (full - only_missing) if term[2] else (full - full)
        # null: missing only, or everything but missing
        return name, only_missing if term[2] else full - only_missing


def _only_missing(full):
    if isinstance(full, NumSet):
        return NumSet([], True, full.integer)
    if isinstance(full, StrSet):
        return StrSet(True, (), True)
    return TokenSet({None})


def boxes_of(term: tuple, universe: Universe) -> list[dict]:
    """The condition as a list of boxes (dict key -> set); raises Undecided past MAX_TERMS."""
    tag = term[0]
    if tag == "const":
        return [{}] if term[1] else []
    if tag == "or":
        out = []
        for t in term[1]:
            out += boxes_of(t, universe)
            if len(out) > MAX_TERMS:
                raise Undecided
        return out
    if tag == "and":
        out = [{}]
        for t in term[1]:
            parts = boxes_of(t, universe)
            out = [b for x in out for y in parts if (b := meet(x, y, universe)) is not None]
            if len(out) > MAX_TERMS:
                raise Undecided
        return out
    key, values = universe.test_set(term)
    return [{key: values}] if not values.empty else []


def meet(a: dict, b: dict, universe: Universe) -> dict | None:
    """The intersection of two boxes, or None when it is empty."""
    out = dict(a)
    for key, values in b.items():
        mine = out.get(key)
        both = values if mine is None else mine & values
        if both.empty:
            return None
        out[key] = both
    return out


def subtract(box: dict, other: dict, universe: Universe) -> list[dict]:
    """``box`` minus ``other`` as disjoint boxes."""
    if meet(box, other, universe) is None:
        return [box]
    out, current = [], dict(box)
    for key, values in other.items():
        mine = current.get(key) or universe.full(key)
        rest = mine - values
        if not rest.empty:
            out.append({**current, key: rest})
        current[key] = mine & values
    return out


def covered(boxes: list[dict], by: list[dict], universe: Universe, spend=lambda n: None) -> bool:
    """Whether the union of ``boxes`` lies inside the union of ``by``; raises Undecided past MAX_BOXES."""
    remaining = boxes
    for cover in by:
        spend(len(remaining))
        remaining = [piece for b in remaining for piece in subtract(b, cover, universe)]
        if not remaining:
            return True
        if len(remaining) > MAX_BOXES:
            raise Undecided
    return not remaining


def approximate(box: dict) -> bool:
    return any(isinstance(key, tuple) for key in box)


class Finding:
    __slots__ = ("rule", "severity", "message")

    def __init__(self, rule, severity: str, message: str):
        self.rule, self.severity, self.message = rule, severity, message


class Analyzer:
    """Runs every check for one policy; ``findings`` holds the results."""

    def __init__(self, rules, hit_policy: str, ranks: dict[str, int], schema: Schema):
        self.rules = rules            # non-default Rule objects with .term (normal form) and .node (checked)
        self.hit_policy = hit_policy
        self.ranks = ranks
        self.universe = Universe(schema)
        self.schema = schema
        self.rng = random.Random(SEED)
        self.findings: list[Finding] = []
        self.shapes: dict[str, list[dict] | None] = {}
        self.pool = _value_pool(rules, schema)
        self.work = 0
        self.current = None  # the rule being checked, for the message when the work limit stops us

    def spend(self, operations: int) -> None:
        self.work += operations
        if self.work > WORK_LIMIT:
            raise Exhausted(f"table analysis stopped at its work limit ({WORK_LIMIT:,} box operations) while "
                            "checking this rule; it and the rules after it are not fully checked")

    def run(self) -> list[Finding]:
        try:
            self.check_all()
        except Exhausted as stop:
            self.findings.append(Finding(self.current, "warning", str(stop)))
        return self.findings

    def check_all(self) -> None:
        for rule in self.rules:
            try:
                self.shapes[rule.id] = boxes_of(rule.term, self.universe)
            except Undecided:
                self.shapes[rule.id] = None
                self.note(rule, "warning", f"condition too complex to analyse exactly (over {MAX_TERMS} "
                                           "terms); overlap and reachability checked by sampling only")
            else:
                if not self.shapes[rule.id]:
                    self.note(rule, "error", "can never match: its condition is false for every row")
        live = [r for r in self.rules if self.shapes[r.id] != []]
        if self.hit_policy == "UNIQUE":
            self.check_overlaps(live)
        elif self.hit_policy == "FIRST":
            for index, rule in enumerate(live):
                self.check_reachable(rule, live[:index], "error", "is unreachable: every row it matches is "
                                                                  "matched first by")
        elif self.hit_policy == "PRIORITY":
            for index, rule in enumerate(live):
                rank = self.ranks[rule.action]
                better = [r for j, r in enumerate(live)
                          if self.ranks[r.action] < rank or (self.ranks[r.action] == rank and j < index)]
                self.check_reachable(rule, better, "warning", "never decides: every row it matches also "
                                                              "matches a rule that outranks it:")
        self.current = None
        self.check_default(live)

    def note(self, rule, severity: str, message: str) -> None:
        self.findings.append(Finding(rule, severity, message))
        if severity == "error" and sum(f.severity == "error" for f in self.findings) >= MAX_ERRORS:
            raise Exhausted(f"table analysis stopped after {MAX_ERRORS} errors; fix these and check again")

    def check_overlaps(self, rules) -> None:
        for j, later in enumerate(rules):
            self.current = later
            for earlier in rules[:j]:
                a, b = self.shapes[earlier.id], self.shapes[later.id]
                self.spend(len(a) * len(b) if a is not None and b is not None else SAMPLES)
                if a is None or b is None:
                    witness = self.sample_witness([earlier, later], None)
                    if witness is not None:
                        self.overlap_error(earlier, later, witness)
                    continue
                common = [m for x in a for y in b if (m := meet(x, y, self.universe)) is not None]
                if not common:
                    continue
                witness = None
                for box in common:
                    witness = self.sample_witness([earlier, later], box)
                    if witness is not None:
                        break
                if witness is not None:
                    self.overlap_error(earlier, later, witness)
                else:
                    self.note(later, "warning", f"could not prove it disjoint from rule '{earlier.id}' "
                                                "(field-to-field comparisons); a row matching both is an error "
                                                "for that row at run time")

    def overlap_error(self, earlier, later, witness: dict) -> None:
        self.note(later, "error", f"overlaps rule '{earlier.id}' (line {earlier.line}) under hit policy UNIQUE: "
                                  f"both match e.g. {_show_row(witness)}")

    def check_reachable(self, rule, before, severity: str, what: str) -> None:
        self.current = rule
        boxes = self.shapes[rule.id]
        shapes = [self.shapes[r.id] for r in before]
        if boxes is None or any(s is None for s in shapes):
            return  # sampling can show a rule reachable, never unreachable: no verdict
        cover = [box for s in shapes for box in s]
        self.spend(len(boxes) * len(cover))
        cover = [c for c in cover if any(meet(b, c, self.universe) is not None for b in boxes)]  # only these matter
        try:
            hidden = covered(boxes, cover, self.universe, self.spend)
        except Undecided:
            self.note(rule, "warning", "reachability not decided (analysis limit reached)")
            return
        if hidden:
            culprits = [r for r in before
                        if any(meet(x, y, self.universe) is not None for x in boxes for y in self.shapes[r.id])]
            shown = ", ".join(repr(r.id) for r in culprits[:8])
            more = f" and {len(culprits) - 8} more" if len(culprits) > 8 else ""
            self.note(rule, severity, f"{what} {shown}{more}")

    def check_default(self, rules) -> None:
        shapes = [self.shapes[r.id] for r in rules]
        if not rules or any(s is None for s in shapes):
            return
        try:
            everything = covered([{}], [box for s in shapes for box in s], self.universe, self.spend)
        except (Undecided, Exhausted):
            return  # a warning, when it can be had cheaply; nothing to report otherwise
        if everything:
            self.note(None, "warning", "the default rule never applies: the rules cover every possible row")

    def sample_witness(self, rules, box: dict | None) -> dict | None:
        """A row every rule in ``rules`` matches, drawn from ``box`` (or the value pool), or None."""
        fields = {name for r in rules for name in r.reads}
        exact = box is not None and not approximate(box)
        tries = 5 if exact else SAMPLES
        for _ in range(tries):
            row = {}
            for name in fields:
                values = box.get(name) if box is not None else None
                if values is not None:
                    row[name] = values.sample(self.rng)
                else:
                    pool = self.pool[name]
                    row[name] = pool[self.rng.randrange(len(pool))]
            if all(truth(r.node, row) is True for r in rules):
                shown = [n for n in sorted(fields) if box is None or n in box] if exact else sorted(fields)
                return {n: row[n] for n in shown}
        return None


def _value_pool(rules, schema: Schema) -> dict[str, list]:
    """Values worth trying per field: every constant in the policy, nudged both ways, plus missing."""
    numbers: set[float] = {0.0, 1.0}
    strings: dict[str, set] = {}
    for rule in rules:
        for name, value in _constants(rule.term):
            if isinstance(value, float):
                numbers.update((value, value - 1, value + 1, value - 0.5, value + 0.5, value - 1e-6, value + 1e-6))
            else:
                strings.setdefault(name, set()).add(value)
    pool: dict[str, list] = {}
    for rule in rules:
        for name in rule.reads:
            ftype = schema.type_of(name)
            missing = [] if Schema.is_model_output(name) else [None]
            if ftype in NUMERIC:
                values = sorted(numbers)
                if schema.is_integer(name):
                    values = sorted({float(round(v)) for v in values})
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


def _show_row(row: dict) -> str:
    def show(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
        return repr(v)
    return ", ".join(f"{k}={show(v)}" for k, v in row.items()) or "any row"
