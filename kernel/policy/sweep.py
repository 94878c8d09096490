"""Which rules of a table can share a row, found without comparing every pair, for the table analysis.

Comparing every pair of rules is O(n²): a rate table of 3,000 rules
``amount in [i, i+1)`` is 4.5 million pairs, far past the analysis' work
limit, although each rule can only meet its neighbours. Two boxes
(``analysis.py``) share a row only if their sets meet on *every* field, so
one field that keeps them apart is enough to skip the pair. ``near_rules``
picks the field that keeps the most pairs apart:

* a numeric field: each box becomes spans on it (its set's intervals; a box
  that does not constrain the field spans everything; the missing value is
  a point below every number), sorted by start and swept, so only rules
  whose spans touch become neighbours;
* a string field: each box lands in a bucket per value it allows (missing
  included); a box that allows all but a few values, or does not constrain
  the field, is near every rule.

Both give a superset of the pairs that really meet (touching ends, the
missing point and the span of a set all count), so skipping the others is
exact: the analysis runs its usual box checks on neighbours only.

When no field separates the rules (every rule spans every field: a truly
combinatorial table) and the neighbours alone would exceed the work budget,
``near_rules`` says so and the caller compares every pair under its work
limit, as before.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left

from .domains import INF, NumSet, StrSet

_BOXES_PER_UNIT = 4  # boxes swept per work unit of the analysis (measured here)
_MISSING_AT = -INF  # where the missing value sits on a numeric sweep line (touches only spans open below)
_MISSING = object()  # the missing value's bucket on a string field


def near_rules(shapes: list, budget: float, spend=lambda units: None) -> tuple[list[list[int]] | None, object]:
    """``(near, order_key)``: for each rule (by position in ``shapes``), the ascending positions of the
    other rules that may share a row with it; ``near`` is None when no field leaves at most ``budget``
    candidate pairs (then every pair must be compared). ``order_key`` is the numeric field that best
    separates the rules (None when no box constrains one): sorting boxes along it keeps subtractions small.

    ``shapes`` holds each rule's boxes, or None for a rule analysed by sampling (near every rule).

    Each field tried costs a pass over every box, charged to ``spend`` (work units, as the analysis counts
    them): a table of thousands of fields, one per rule, would otherwise take minutes here uncharged. The
    fields are tried until a quarter of ``budget`` is spent; the best of those tried is used.
    """
    n = len(shapes)
    best = order_key = None  # best: (count, how to list the pairs)
    order_count = None
    boxes = sum(len(b) if b is not None else 1 for b in shapes)
    per_key = (boxes + n) / _BOXES_PER_UNIT
    spend(per_key)  # (_keys: one pass)
    scanned = 0
    for key, kind in _keys(shapes).items():
        if scanned > budget / 4:
            break
        scanned += per_key
        spend(per_key)
        if kind is NumSet:
            spans = _spans(shapes, key)
            count, pairs = _touching_pairs(spans), (_sweep, spans)
            if order_count is None or count < order_count:
                order_key, order_count = key, count
        else:
            buckets, wild = _buckets(shapes, key)
            count, pairs = _bucket_pairs(buckets, wild, n), (_share, (buckets, wild))
        if best is None or count < best[0]:
            best = (count, pairs)
    if n < 2:
        return [[] for _ in range(n)], order_key
    if best is None or best[0] > budget:
        return None, order_key
    near = [set() for _ in range(n)]
    lister, data = best[1]
    lister(data, near)
    return [sorted(s) for s in near], order_key


def start_on(box: dict, key) -> float:
    """Where ``box`` starts on numeric field ``key`` (-inf when it does not constrain it or allows missing)."""
    values = box.get(key)
    if values is None or values.missing or not values.intervals:
        return -INF
    return values.intervals[0][0]


def _keys(shapes: list) -> dict:
    """The fields some box constrains to numbers or strings -> NumSet / StrSet, in first-seen order."""
    keys: dict = {}
    for boxes in shapes:
        for box in boxes or ():
            for key, values in box.items():
                if not isinstance(key, tuple) and isinstance(values, (NumSet, StrSet)):
                    keys.setdefault(key, type(values))
    return keys


# -- numeric fields: a sweep over spans
def _spans(shapes: list, key) -> list[tuple[float, float, int]]:
    """(start, end, rule) on ``key`` for every box, sorted by start: a superset of where each box lies."""
    spans = []
    for rule, boxes in enumerate(shapes):
        mine = []
        for box in boxes if boxes is not None else [{}]:
            values = box.get(key)
            if values is None:
                mine = [(-INF, INF)]
                break
            mine.extend((lo, hi) for lo, _, hi, _ in values.intervals)
            if values.missing:
                mine.append((_MISSING_AT, _MISSING_AT))
        mine.sort()
        merged: list[list[float]] = []
        for lo, hi in mine:  # one span per stretch a rule covers, so counts are of rule pairs
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        spans.extend((lo, hi, rule) for lo, hi in merged)
    spans.sort(key=lambda s: (s[0], s[1]))
    return spans


def _touching_pairs(spans: list) -> int:
    """How many pairs of spans touch: all pairs less those where one ends before the other starts."""
    ends = sorted(s[1] for s in spans)
    apart = sum(bisect_left(ends, lo) for lo, _, _ in spans)
    m = len(spans)
    return m * (m - 1) // 2 - apart


def _sweep(spans: list, near: list[set]) -> None:
    active: list[tuple[float, int]] = []  # (end, rule) of the spans that may still touch the next ones
    for lo, hi, rule in spans:
        while active and active[0][0] < lo:
            heapq.heappop(active)
        for _, other in active:
            if other != rule:
                near[rule].add(other)
                near[other].add(rule)
        heapq.heappush(active, (hi, rule))


# -- string fields: buckets per value
def _buckets(shapes: list, key) -> tuple[dict, set]:
    """value -> rules whose boxes allow it (finite sets only), and the rules near every rule."""
    buckets: dict = {}
    wild: set = set()
    for rule, boxes in enumerate(shapes):
        for box in boxes if boxes is not None else [{}]:
            values = box.get(key)
            if values is None or not values.finite:
                wild.add(rule)
                continue
            for value in values.values:
                buckets.setdefault(value, set()).add(rule)
            if values.missing:
                buckets.setdefault(_MISSING, set()).add(rule)
    return buckets, wild


def _bucket_pairs(buckets: dict, wild: set, n: int) -> int:
    """At most how many pairs share a bucket or involve a rule near every rule."""
    return sum(len(b) * (len(b) - 1) // 2 for b in buckets.values()) + len(wild) * n


def _share(data: tuple, near: list[set]) -> None:
    buckets, wild = data
    for members in buckets.values():
        for rule in members:
            near[rule].update(members)
    everyone = set(range(len(near)))
    for rule in wild:
        near[rule].update(everyone)
        for other in everyone:
            near[other].add(rule)
    for rule, others in enumerate(near):
        others.discard(rule)
