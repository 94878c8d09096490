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
  that exceeds ``MAX_BOXES``, is checked by sampling instead, with a warning;
* a table whose checks would exceed ``WORK_LIMIT`` work units (every meet, subtraction, sampled row and
  field swept is charged by its real cost: about a second in all) is checked up
  to the rule where the limit was reached; a warning names that rule and the
  loaded policy says ``analysis_complete = False`` (``policy check`` exits 3:
  usable, as the kernel would serve it, but not fully checked).

Only rules that can share a row are compared: ``sweep.py`` finds them along
the one field that keeps most rules apart (a sweep over intervals, or buckets
of string values), so large tables (rate tables of thousands of
``amount in [a, b)`` rules, tables keyed by a code) are checked fully, and only
truly combinatorial tables fall back to comparing every pair under the work
limit.

Witness rows are picked inside the values a field really takes where the
analysis knows them: the model's ``confidence`` and ``score.<class>`` are
probabilities, so their witnesses lie in [0, 1] whenever the common box
reaches into it (``domains.MODEL_OUTPUT_RANGE``). The analysis itself does not
assume that range: a verdict holds for any value a model may return.

Sampling is seeded, so the same file always gets the same verdict.
"""

from __future__ import annotations

import random
from bisect import bisect_left

from .domains import MODEL_OUTPUT_RANGE, NumSet, StrSet, TokenSet
from .reference import truth
from .sweep import near_rules, start_on
from .types import BOOL, LABEL, NUMERIC, Schema
from .witnesses import show_row, value_pool

MAX_TERMS = 256      # boxes per rule condition
MAX_BOXES = 20_000   # boxes alive while subtracting one rule's boxes from another's
WORK_LIMIT = 200_000  # work units for a whole table (about a second here): an upload cannot stall a load
# What a work unit is, by what really costs time (measured: a unit is a few microseconds here). Each operation
# is charged as it runs, so no shape of table (sets of thousands of intervals, conditions of thousands of
# tests sampled hundreds of times, thousands of fields to sweep) gets far past the limit uncharged:
STEPS_PER_UNIT = 16  # steps of set algebra (an interval or string merged when two sets meet or are subtracted)
NODES_PER_UNIT = 16  # condition nodes evaluated when a sampled row is tried against the rules
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
    """The full set of each analysis key: a field, or ("pair", f, g) for field-to-field comparisons.

    It also meters the work: every meet and subtraction charges its set-algebra steps to ``steps``, and
    past ``limit`` steps raises ``Exhausted`` (a callable, ``on_limit``, builds it: the analyzer knows
    which rule was being checked)."""

    __slots__ = ("schema", "_full", "steps", "limit", "on_limit", "domains")

    def __init__(self, schema: Schema, limit: float = float("inf"), on_limit=None, domains=None):
        self.schema = schema
        # Fields whose values are known narrower than their type (a pipeline's ranges, values, never missing):
        # each is the field's full set, and every test's set is cut to it, so verdicts are about those rows only.
        self.domains = dict(domains or {})
        self._full: dict = dict(self.domains)
        self.steps = 0
        self.limit = limit
        self.on_limit = on_limit

    def charge(self, steps: int) -> None:
        self.steps += steps
        if self.steps > self.limit:
            raise self.on_limit() if self.on_limit is not None else Exhausted("table analysis work limit reached")

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
        """(key, set of values) where a normal-form test is true (within the field's domain, when it has one)."""
        key, values = self._test_set(term)
        domain = self.domains.get(key)
        return (key, values & domain) if domain is not None else (key, values)

    def _test_set(self, term: tuple):
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

    def likely(self, key, values):
        """The part of ``values`` a witness should come from: for a model output (a probability), the part
        inside ``MODEL_OUTPUT_RANGE`` when there is one; otherwise ``values`` itself."""
        if isinstance(values, NumSet) and not isinstance(key, tuple) and Schema.is_model_output(key):
            inside = values & NumSet([MODEL_OUTPUT_RANGE], False, False)
            if not inside.empty:
                return inside
        return values


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
            out = [b for x in out for y in parts if (b := meet(x, y, universe)) is not None]  # (meet charges)
            if len(out) > MAX_TERMS:
                raise Undecided
        return out
    key, values = universe.test_set(term)
    universe.charge(values.weight)  # building the set: a string test's values, a number test's intervals
    return [{key: values}] if not values.empty else []


def meet(a: dict, b: dict, universe: Universe) -> dict | None:
    """The intersection of two boxes, or None when it is empty."""
    out = dict(a)
    steps = 1
    try:
        for key, values in b.items():
            mine = out.get(key)
            if mine is None:
                both = values
            else:
                steps += mine.weight + values.weight
                both = mine & values
            if both.empty:
                return None
            out[key] = both
        return out
    finally:
        universe.charge(steps)


def subtract(box: dict, other: dict, universe: Universe) -> list[dict]:
    """``box`` minus ``other`` as disjoint boxes."""
    if meet(box, other, universe) is None:
        return [box]
    out, current = [], dict(box)
    for key, values in other.items():
        mine = current.get(key) or universe.full(key)
        universe.charge(2 * (mine.weight + values.weight) + 16)  # a difference, an intersection, new boxes
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


def size_of(node) -> int:
    """How many nodes a condition has (the cost of evaluating it once); iterative, as conditions nest."""
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        operands = getattr(current, "operands", None)
        if operands is not None:
            stack.extend(operands)
        for name in ("operand", "left", "right"):
            child = getattr(current, name, None)
            if child is not None and not isinstance(child, (str, int, float, bool)):
                stack.append(child)
    return count


def _show_box(box: dict) -> str:
    return ", ".join(f"{key} {values.describe()}" for key, values in sorted(box.items(), key=lambda kv: str(kv[0])))


def approximate(box: dict) -> bool:
    return any(isinstance(key, tuple) for key in box)


class Finding:
    __slots__ = ("rule", "severity", "message")

    def __init__(self, rule, severity: str, message: str):
        self.rule, self.severity, self.message = rule, severity, message


class Analyzer:
    """Runs every check for one policy; ``findings`` holds the results."""

    def __init__(self, rules, hit_policy: str, ranks: dict[str, int], schema: Schema, domains=None):
        self.rules = rules            # non-default Rule objects with .term (normal form) and .node (checked)
        self.hit_policy = hit_policy
        self.ranks = ranks
        self.universe = Universe(schema, WORK_LIMIT * STEPS_PER_UNIT, self._stopped, domains)
        self.size = {rule.id: size_of(rule.node) for rule in rules}  # condition nodes: the cost of one try
        self.schema = schema
        self.rng = random.Random(SEED)
        self.findings: list[Finding] = []
        self.shapes: dict[str, list[dict] | None] = {}
        self.pool = value_pool(rules, schema)
        self.current = None  # the rule being checked, for the message when the work limit stops us
        self.complete = True  # False when a limit stopped the analysis before every check ran
        self.shapes_live: list = []   # boxes of the rules that can match, in file order
        self.near: list[list[int]] | None = None  # per such rule, the rules that may share a row (None: all)
        self.sweep_key = None  # a numeric field that keeps rules apart: boxes are subtracted in order along it

    @property
    def work(self) -> float:
        """Work units spent so far (all of it is charged to the universe's meter, in steps)."""
        return self.universe.steps / STEPS_PER_UNIT

    def spend(self, units: float) -> None:
        self.universe.charge(units * STEPS_PER_UNIT)

    def _stopped(self) -> Exhausted:
        if self.current is None:
            return Exhausted(f"table analysis stopped at its work limit ({WORK_LIMIT:,} units, about a second) "
                             "before it compared the rules; the table is not checked for overlaps or "
                             "unreachable rules")
        return Exhausted(f"table analysis stopped at its work limit ({WORK_LIMIT:,} units, about a second) while "
                         "checking this rule; it and the rules after it are not fully checked")

    def run(self) -> list[Finding]:
        try:
            self.check_all()
        except Exhausted as stop:
            self.complete = False
            self.findings.append(Finding(self.current, "warning", str(stop)))
        return self.findings

    def neighbours(self, index: int, below: bool = False):
        """Positions (ascending) of the live rules that may share a row with live rule ``index``;
        only those before it with ``below``."""
        if self.near is None:
            return range(index) if below else (i for i in range(len(self.shapes_live)) if i != index)
        near = self.near[index]
        return near[:bisect_left(near, index)] if below else near

    def check_all(self) -> None:
        for rule in self.rules:
            self.current = rule
            try:
                self.shapes[rule.id] = boxes_of(rule.term, self.universe)
            except Undecided:
                self.shapes[rule.id] = None
                self.note(rule, "warning", f"condition too complex to analyse exactly (over {MAX_TERMS} "
                                           "terms); overlap and reachability checked by sampling only")
            else:
                if not self.shapes[rule.id]:
                    self.note(rule, "error", "can never match: its condition is false for every row")
        self.current = None
        live = [r for r in self.rules if self.shapes[r.id] != []]
        self.shapes_live = [self.shapes[r.id] for r in live]
        budget = WORK_LIMIT - self.work if self.hit_policy != "COLLECT" else 0  # COLLECT compares no rules
        self.near, self.sweep_key = near_rules(self.shapes_live, budget, self.spend)
        if self.hit_policy == "UNIQUE":
            self.check_overlaps(live)
        elif self.hit_policy == "FIRST":
            for index, rule in enumerate(live):
                before = [live[i] for i in self.neighbours(index, below=True)]
                self.check_reachable(rule, before, "error", "is unreachable: every row it matches is matched "
                                                            "first by")
        elif self.hit_policy == "PRIORITY":
            for index, rule in enumerate(live):
                rank = self.ranks[rule.action]
                better = [live[j] for j in self.neighbours(index)
                          if self.ranks[live[j].action] < rank or (self.ranks[live[j].action] == rank and j < index)]
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
            for i in self.neighbours(j, below=True):
                earlier = rules[i]
                a, b = self.shapes[earlier.id], self.shapes[later.id]
                if a is None or b is None:  # (sample_witness charges each row it tries)
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
                exact = next((box for box in common if not approximate(box)), None)
                if witness is not None:
                    self.overlap_error(earlier, later, witness)
                elif exact is not None:
                    # An exact box is a set of rows both rules match, whether or not a sample landed in it
                    # (integers past 2**53, where a sample may round off the set): still an overlap, shown as that set.
                    self.note(later, "error", f"overlaps rule '{earlier.id}' (line {earlier.line}) under hit "
                                              f"policy UNIQUE: both match every row with {_show_box(exact)}")
                else:
                    self.note(later, "warning", f"could not prove it disjoint from rule '{earlier.id}' "
                                                "(field-to-field comparisons); a row matching both is an error "
                                                "for that row at run time")

    def overlap_error(self, earlier, later, witness: dict) -> None:
        self.note(later, "error", f"overlaps rule '{earlier.id}' (line {earlier.line}) under hit policy UNIQUE: "
                                  f"both match e.g. {show_row(witness)}")

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
        cover = [box for s in shapes for box in s]
        if self.sweep_key is not None:  # in order along one field, what is left stays a few intervals
            cover.sort(key=lambda box: start_on(box, self.sweep_key))
        try:
            everything = covered([{}], cover, self.universe, self.spend)
        except (Undecided, Exhausted):
            return  # a warning, when it can be had cheaply; nothing to report otherwise
        if everything:
            self.note(None, "warning", "the default rule never applies: the rules cover every possible row")

    def sample_witness(self, rules, box: dict | None) -> dict | None:
        """A row every rule in ``rules`` matches, drawn from ``box`` (or the value pool), or None."""
        fields = sorted({name for r in rules for name in r.reads})
        exact = box is not None and not approximate(box)
        tries = 5 if exact else SAMPLES
        sources = {}
        for name in fields:
            values = box.get(name) if box is not None else None
            sources[name] = self.universe.likely(name, values) if values is not None else self.pool[name]
        # Each try evaluates every rule's whole condition: charged as such (conditions of thousands of tests,
        # sampled SAMPLES times for each of hundreds of pairs, took minutes when a try cost one unit).
        cost = (sum(self.size[r.id] for r in rules) + len(fields)) / NODES_PER_UNIT
        for _ in range(tries):
            self.spend(cost)
            row = {}
            for name in fields:
                source = sources[name]
                row[name] = source[self.rng.randrange(len(source))] if isinstance(source, list) \
                    else source.sample(self.rng)
            if all(truth(r.node, row) is True for r in rules):
                shown = [n for n in fields if box is None or n in box] if exact else fields
                return {n: row[n] for n in shown}
        return None
