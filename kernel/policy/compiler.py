"""The compiled evaluator: encode a batch, run the rule program, apply the hit policy with gathers.

The program (``program.py``) computes each distinct test once per batch and
each rule's condition from them; an executor (``ext/rules.pyx`` when built,
else ``vectorized.py`` with numpy) returns, per row, the first matching rule
in the hit policy's preference order, and every rule's mask when the policy
needs all matches. Then:

* FIRST: preference order = file order; PRIORITY: rules sorted by their
  action's rank, ties in file order (DMN: the match with the highest-priority
  output wins);
* UNIQUE: as FIRST, plus a per-row match count; rows matching more than one
  rule become error rows (see ``PolicyResult``);
* COLLECT: action as PRIORITY; escalate = any matching rule escalates;
  adjust = sum over matching rules, added in file order.

Outcome arrays are gathers from small per-rule tables (index ``len(rules)``
is the default rule). ``fired`` is built on first access, from the winner
(FIRST/PRIORITY) or from the rows' match patterns packed to bits.
"""

from __future__ import annotations

import numpy as np

from .encode import FieldCodec
from .errors import PolicyInputError
from .program import Program
from .result import PolicyResult
from .types import Schema


class CompiledTable:
    __slots__ = ("rules", "default", "hit_policy", "codecs", "program", "backend", "kernel", "ids", "action_of",
                 "escalate_of", "adjust_of", "single", "escalating", "adjusting", "_specs", "_row_encoder", "_fallback")

    def __init__(self, rules, default, hit_policy: str, actions: tuple[str, ...], schema: Schema, backend):
        self.rules = rules
        self.default = default
        self.hit_policy = hit_policy
        literals: dict[str, list] = {}
        for rule in rules:
            _collect_literals(rule.term, literals)
        reads: dict[str, str] = {}
        for rule in rules:
            for name in rule.reads:
                reads[name] = schema.type_of(name)
        self.codecs = {name: FieldCodec(name, ftype, literals.get(name, []), schema.classes)
                       for name, ftype in reads.items()}
        self.program = Program([r.term for r in rules], self.codecs)
        rank = {a: i for i, a in enumerate(actions)}
        order = list(range(len(rules)))
        if hit_policy in ("PRIORITY", "COLLECT"):
            order.sort(key=lambda k: (rank[rules[k].action], k))
        self.backend = backend  # module with Kernel (+ encode_rows when compiled)
        self.kernel = backend.Kernel(self.program.instructions, self.program.luts, self.program.rule_registers,
                                     order, len(self.program.numeric), len(self.program.coded))
        everything = [*rules, default]
        self.ids = tuple(r.id for r in everything)
        self.action_of = np.array([r.action for r in everything], dtype=object)
        self.escalate_of = np.array([r.escalate for r in everything], dtype=bool)
        self.adjust_of = np.array([r.adjust for r in everything], dtype=np.float64)
        self.single = tuple((i,) for i in self.ids)
        self.escalating = tuple(k for k, r in enumerate(rules) if r.escalate)
        self.adjusting = tuple(k for k, r in enumerate(rules) if r.adjust != 0.0)
        self._row_encoder = getattr(backend, "encode_rows", None)
        slots = self.program.numeric + self.program.coded
        self._specs = tuple((name, self.codecs[name].flags(backend.FLAGS) if backend.FLAGS else 0,
                             self.codecs[name].codes) for name in slots)
        slot_codecs = [self.codecs[name] for name in slots]
        self._fallback = lambda j, value: slot_codecs[j].scalar(value)

    # -- inputs: (numeric columns, code columns) in the program's slot order
    def encode(self, columns: dict, n: int) -> tuple[list, list]:
        def column(name):
            value = columns.get(name)
            if value is None:
                raise PolicyInputError(name, "column is missing from the batch")
            return self.codecs[name].encode_column(value, n)
        return ([np.ascontiguousarray(column(name)) for name in self.program.numeric],
                [np.ascontiguousarray(column(name)) for name in self.program.coded])

    def encode_rows(self, rows: list, extra: dict | None, n: int) -> tuple[list, list]:
        """Fields named in ``extra`` (columns) come from there, the rest from the row dicts."""
        if self._row_encoder is not None and not extra:  # the common case: one pass, slots already in order
            return self._row_encoder(rows if type(rows) is list else list(rows), self._specs, self._fallback)
        from_rows = [s for s in self._specs if extra is None or s[0] not in extra]
        found: dict[str, np.ndarray] = {}
        if self._row_encoder is not None and from_rows:
            codecs = [self.codecs[s[0]] for s in from_rows]
            numeric, coded = self._row_encoder(rows if type(rows) is list else list(rows), tuple(from_rows),
                                               lambda j, value: codecs[j].scalar(value))
            names = [s[0] for s in from_rows]
            found.update(zip([m for m in names if self.codecs[m].codes is None], numeric))
            found.update(zip([m for m in names if self.codecs[m].codes is not None], coded))

        def column(name):
            if name in found:
                return found[name]
            codec = self.codecs[name]
            if extra is not None and name in extra:
                return np.ascontiguousarray(codec.encode_column(extra[name], n))
            return codec.encode_rows(rows)
        return [column(name) for name in self.program.numeric], [column(name) for name in self.program.coded]

    # -- hit policy
    def evaluate(self, encoded: tuple[list, list], n: int) -> PolicyResult:
        policy = self.hit_policy
        want_masks = policy in ("UNIQUE", "COLLECT")
        winner, masks = self.kernel.run(encoded[0], encoded[1], n, want_masks)
        action = self.action_of[winner]
        error = np.full(n, None, dtype=object)
        if not want_masks:
            single = self.single
            return PolicyResult(action, self.escalate_of[winner], self.adjust_of[winner], error,
                                make_fired=lambda: [single[k] for k in winner.tolist()])
        default = len(self.rules)
        if policy == "UNIQUE":
            escalate, adjust = self.escalate_of[winner], self.adjust_of[winner]
            conflict = masks.sum(axis=0, dtype=np.int32) > 1 if default else np.zeros(n, dtype=bool)
            if conflict.any():
                rows = np.flatnonzero(conflict)
                action[rows] = self.default.action
                escalate[rows] = True
                adjust[rows] = 0.0
                for i in rows.tolist():
                    hits = [self.ids[k] for k in np.flatnonzero(masks[:, i]).tolist()]
                    error[i] = f"hit policy UNIQUE but {len(hits)} rules match: {', '.join(hits)}"
        else:  # COLLECT
            none = winner == default
            escalate = none & self.default.escalate
            for k in self.escalating:
                escalate |= masks[k]
            adjust = np.where(none, self.default.adjust, 0.0)
            for k in self.adjusting:
                np.add(adjust, self.adjust_of[k], out=adjust, where=masks[k])
        return PolicyResult(action, escalate, adjust, error, make_fired=lambda: self.all_fired(masks, n))

    def all_fired(self, masks: np.ndarray, n: int) -> list[tuple[str, ...]]:
        """Every matching rule per row (the default's id where none): via packed match patterns."""
        if not len(masks) or not n:
            return [self.single[-1]] * n
        packed = np.ascontiguousarray(np.packbits(masks, axis=0).T)
        patterns = packed.view(f"V{packed.shape[1]}").ravel()
        unique, inverse = np.unique(patterns, return_inverse=True)
        fired = []
        for pattern in unique:
            bits = np.unpackbits(np.frombuffer(pattern.tobytes(), dtype=np.uint8))[:len(masks)]
            hits = tuple(self.ids[k] for k in np.flatnonzero(bits).tolist())
            fired.append(hits or self.single[-1])
        return [fired[i] for i in inverse.ravel().tolist()]


def _collect_literals(term: tuple, out: dict[str, list]) -> None:
    tag = term[0]
    if tag in ("and", "or"):
        for t in term[1]:
            _collect_literals(t, out)
    elif tag == "str":
        out.setdefault(term[1], []).extend(term[2])
