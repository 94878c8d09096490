"""Sets of values of one field, for the load-time analysis (overlap, reachability, witnesses).

Each set knows whether it holds the *missing* value. Three kinds:

* ``NumSet``: a union of disjoint intervals of the values the evaluators
  compare: 64-bit floats, ±inf included (a number field takes inf; NaN is
  missing), with every bound closed at the float it names, so ``x > 0.5`` is
  ``[0.5000000000000001, inf]``, ``(0.5, 0.5000000000000001)`` is empty and
  ``x <= -0.0`` meets ``x >= 0`` in 0 (or of integers, for ``integer`` inputs:
  bounds are then whole and closed, so ``x > 2`` and ``x >= 3`` are the same
  set, and no integer field holds inf);
* ``StrSet``: a finite set of strings, or all strings except a finite set;
* ``TokenSet``: a subset of a small finite universe (bools; the outcome
  ``<``/``==``/``>`` of a field-to-field comparison).

All support ``&`` (intersection), ``-`` (difference), ``empty`` and
``sample(rng)`` (a member, for witness rows; ``None`` is the missing value).
"""

from __future__ import annotations

import math

INF = math.inf
MISSING = None
# The values the model's outputs (confidence, score.<class>) take: probabilities. Witness rows are drawn
# from here when they can be; the analysis does not assume it (a model may return any finite number).
MODEL_OUTPUT_RANGE = (0.0, True, 1.0, True)  # (lo, lo_closed, hi, hi_closed)


class NumSet:
    __slots__ = ("intervals", "missing", "integer")

    def __init__(self, intervals, missing: bool = False, integer: bool = False):
        self.integer = integer
        self.missing = missing
        self.intervals = _normalize(intervals, integer)  # ((lo, lo_closed, hi, hi_closed), ...)

    @classmethod
    def full(cls, integer: bool, missing: bool) -> NumSet:
        return cls([(-INF, True, INF, True)], missing, integer)

    @classmethod
    def compare(cls, op: str, value: float, integer: bool) -> NumSet:
        """The present values x with ``x op value``."""
        spans = {
            "==": [(value, True, value, True)],
            "!=": [(-INF, True, value, False), (value, False, INF, True)],
            "<": [(-INF, True, value, False)],
            "<=": [(-INF, True, value, True)],
            ">": [(value, False, INF, True)],
            ">=": [(value, True, INF, True)],
        }[op]
        return cls(spans, False, integer)

    @property
    def empty(self) -> bool:
        return not self.intervals and not self.missing

    @property
    def weight(self) -> int:
        """What an operation on this set costs (the analysis' work meter): its intervals, at least 1."""
        return len(self.intervals) + 1

    def complement_values(self) -> list:
        out, lo, lo_closed = [], -INF, True  # (the infinities are values: an integer set drops them itself)
        for a, a_closed, b, b_closed in self.intervals:
            out.append((lo, lo_closed, a, not a_closed))
            lo, lo_closed = b, not b_closed
        out.append((lo, lo_closed, INF, True))
        return out

    def __and__(self, other: NumSet) -> NumSet:
        # Both lists are sorted and disjoint (``_normalize``): one merge pass, not every pair (sets of
        # thousands of intervals arise when the analysis subtracts a large table's rules).
        spans = []
        mine, theirs = self.intervals, other.intervals
        i = j = 0
        while i < len(mine) and j < len(theirs):
            a, b = mine[i], theirs[j]
            lo, lo_open = max((a[0], not a[1]), (b[0], not b[1]))  # the larger lower bound; open wins ties
            hi, hi_closed = min((a[2], a[3]), (b[2], b[3]))        # the smaller upper bound; open wins ties
            spans.append((lo, not lo_open, hi, hi_closed))         # empty ones are dropped by _normalize
            if (a[2], a[3]) <= (b[2], b[3]):                       # the span that ends first meets nothing more
                i += 1
            else:
                j += 1
        if self.integer != other.integer:
            return NumSet(spans, self.missing and other.missing, self.integer)
        # The pieces are sorted, disjoint and apart already (each lies inside one span of each side), and whole
        # where both sides' bounds are: only the empty ones go. Re-normalizing (a sort and a merge pass) cost more
        # than the meet itself on sets of thousands of spans, which the work meter charges as one pass.
        return NumSet._of_normal(spans, self.missing and other.missing, self.integer)

    @classmethod
    def _of_normal(cls, spans, missing: bool, integer: bool) -> NumSet:
        made = cls.__new__(cls)
        made.integer, made.missing = integer, missing
        made.intervals = tuple(s for s in spans if s[0] < s[2] or (s[0] == s[2] and s[1] and s[3]))
        return made

    def __sub__(self, other: NumSet) -> NumSet:
        rest = NumSet(other.complement_values(), False, self.integer)
        both = self & rest
        return NumSet(both.intervals, self.missing and not other.missing, self.integer)

    def sample(self, rng) -> float | None:
        choices = list(self.intervals) + ([MISSING] if self.missing else [])
        pick = choices[rng.randrange(len(choices))]
        if pick is MISSING:
            return None
        lo, lo_closed, hi, hi_closed = pick
        if lo == hi:
            return lo
        if self.integer:
            lo_i = lo if lo != -INF else (hi - 1000 if hi != INF else -1000)
            hi_i = hi if hi != INF else lo_i + 1000
            return float(rng.randint(int(lo_i), int(hi_i)))
        # A float set's bounds are closed at floats; one that is only the neighbour of a rounder number (x > 0.5
        # starts at 0.5000000000000001) makes a witness nobody wrote: values well inside come first.
        lo_ok, hi_ok = _plain(lo, -INF), _plain(hi, INF)
        if lo == -INF and hi == INF:
            return rng.choice([0.0, 1.0, -1.0, rng.uniform(-1e6, 1e6)])
        if lo == -INF:
            below = hi - rng.choice([1.0, 0.5, 1e-3, abs(hi) + 1])
            return hi if (hi_ok and rng.random() < 0.5) or not below < hi else below
        if hi == INF:
            above = lo + rng.choice([1.0, 0.5, 1e-3, abs(lo) + 1])
            return lo if (lo_ok and rng.random() < 0.5) or not above > lo else above
        # Round values make readable witnesses; random ones find the rest when sampling.
        whole = math.floor(lo) + 1.0
        middle = lo + (hi - lo) / 2 if math.isfinite(hi - lo) else lo / 2 + hi / 2
        nice = [v for v in (lo if lo_ok else None, whole if whole < hi else None, middle)
                if v is not None and lo <= v <= hi]
        nice = nice or [lo]
        if rng.random() < 0.7:
            return nice[0]
        value = rng.uniform(lo, hi)
        return rng.choice(nice + ([hi] if hi_ok else []) + ([value] if lo <= value <= hi else []))

    def describe(self) -> str:
        parts = []
        for lo, lo_closed, hi, hi_closed in self.intervals:
            if not self.integer and lo != hi:  # (shown as written: `< 0.5`, not `<= 0.49999999999999994`)
                if lo_closed and not _plain(lo, -INF):
                    lo, lo_closed = math.nextafter(lo, -INF), False
                if hi_closed and not _plain(hi, INF):
                    hi, hi_closed = math.nextafter(hi, INF), False
            if lo == hi:
                parts.append(f"== {_num(lo)}")
            elif lo == -INF and hi == INF:
                parts.append("any number")
            elif lo == -INF:
                parts.append(f"{'<=' if hi_closed else '<'} {_num(hi)}")
            elif hi == INF:
                parts.append(f"{'>=' if lo_closed else '>'} {_num(lo)}")
            else:
                parts.append(f"in {'[' if lo_closed else '('}{_num(lo)}, {_num(hi)}{']' if hi_closed else ')'}")
        if self.missing:
            parts.append("null")
        return " or ".join(parts)


def _plain(bound: float, outward: float) -> bool:
    """Whether ``bound`` reads as the bound it is: not just the float next to a shorter one outside it
    (0.5000000000000001 is `> 0.5`); the infinities and whole numbers read as themselves."""
    if not math.isfinite(bound):
        return True
    beyond = math.nextafter(bound, outward)
    return len(_num(bound)) <= len(_num(beyond))


def _normalize(spans, integer: bool) -> tuple:
    out = []
    for lo, lo_closed, hi, hi_closed in spans:
        if integer:
            if lo == INF or hi == -INF:
                continue
            if lo != -INF:
                lo, lo_closed = _integer_at_or_above(lo, lo_closed), True
            if hi != INF:
                hi, hi_closed = -_integer_at_or_above(-hi, hi_closed), True
            if lo == -INF:
                lo_closed = False
            if hi == INF:
                hi_closed = False
        else:
            # The evaluators compare floats, not reals: an open bound is the next float inside, closed. Over the
            # reals `x > 0.6 and x < 0.6000000000000001` held rows (no float lies there: a UNIQUE table was
            # refused for it) and `x in (0.5, 0.5000000000000001)` could match.
            if not lo_closed:
                if lo == INF:
                    continue
                lo, lo_closed = math.nextafter(lo, INF), True
            if not hi_closed:
                if hi == -INF:
                    continue
                hi, hi_closed = math.nextafter(hi, -INF), True
        if lo < hi or (lo == hi and lo_closed and hi_closed):
            out.append((lo, lo_closed, hi, hi_closed))
    out.sort(key=lambda s: (s[0], not s[1]))
    # Merge spans that overlap or touch (floats: that are neighbours), so the intervals are disjoint and sorted
    # (``&`` relies on it).
    merged: list = []
    for span in out:
        if merged:
            lo, lo_closed, hi, hi_closed = merged[-1]
            if span[0] < hi or (span[0] == hi and (hi_closed or span[1])) or \
                    (not integer and span[0] == math.nextafter(hi, INF)):
                if (span[2], span[3]) > (hi, hi_closed):
                    merged[-1] = (lo, lo_closed, span[2], span[3])
                continue
        merged.append(span)
    return tuple(merged)


def _integer_at_or_above(bound: float, closed: bool) -> float:
    """The least integer (as the float the evaluators compare) ``>= bound`` (closed) or ``> bound`` (open).

    Exact at any magnitude: from 2**53 on every float is a whole number and ``float(bound + 1)`` rounds back
    to ``bound`` itself, so ``n > 2**53`` would wrongly keep 2**53; the next float up is the answer there."""
    whole = math.ceil(bound) if closed else math.floor(bound) + 1  # (Python ints: exact)
    value = float(whole)
    if value < bound or (value == bound and not closed):
        value = math.nextafter(bound, INF)
    return value


def _num(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class StrSet:
    __slots__ = ("finite", "values", "missing")

    def __init__(self, finite: bool, values, missing: bool = False):
        self.finite = finite          # True: exactly `values`; False: every string except `values`
        self.values = frozenset(values)
        self.missing = missing

    @classmethod
    def full(cls, universe, missing: bool) -> StrSet:
        return cls(True, universe, missing) if universe is not None else cls(False, (), missing)

    @property
    def empty(self) -> bool:
        return self.finite and not self.values and not self.missing

    @property
    def weight(self) -> int:
        return len(self.values) // 16 + 1  # (frozenset algebra runs in C: far cheaper per value than intervals)

    def __and__(self, other: StrSet) -> StrSet:
        missing = self.missing and other.missing
        if self.finite and other.finite:
            return StrSet(True, self.values & other.values, missing)
        if self.finite:
            return StrSet(True, self.values - other.values, missing)
        if other.finite:
            return StrSet(True, other.values - self.values, missing)
        return StrSet(False, self.values | other.values, missing)

    def __sub__(self, other: StrSet) -> StrSet:
        missing = self.missing and not other.missing
        if self.finite and other.finite:
            return StrSet(True, self.values - other.values, missing)
        if self.finite:
            return StrSet(True, self.values & other.values, missing)
        if other.finite:
            return StrSet(False, self.values | other.values, missing)
        return StrSet(True, other.values - self.values, missing)

    def sample(self, rng) -> str | None:
        if self.missing and (rng.random() < 0.3 or (self.finite and not self.values)):
            return None
        if self.finite:
            return sorted(self.values)[rng.randrange(len(self.values))]
        candidate = "other"
        while candidate in self.values:
            candidate += "_"
        return candidate

    def describe(self) -> str:
        listed = ", ".join(repr(v) for v in sorted(self.values))
        text = (f"in {{{listed}}}" if self.finite else (f"not in {{{listed}}}" if self.values else "any string"))
        if self.finite and not self.values:
            text = ""
        if self.missing:
            text = f"{text} or null" if text else "null"
        return text


class TokenSet:
    __slots__ = ("tokens",)

    def __init__(self, tokens):
        self.tokens = frozenset(tokens)

    @property
    def empty(self) -> bool:
        return not self.tokens

    weight = 1

    def __and__(self, other: TokenSet) -> TokenSet:
        return TokenSet(self.tokens & other.tokens)

    def __sub__(self, other: TokenSet) -> TokenSet:
        return TokenSet(self.tokens - other.tokens)

    def sample(self, rng):
        ordered = sorted(self.tokens, key=repr)
        return ordered[rng.randrange(len(ordered))]

    def describe(self) -> str:
        return " or ".join("null" if t is MISSING else ("true" if t is True else "false" if t is False else str(t))
                           for t in sorted(self.tokens, key=repr))
