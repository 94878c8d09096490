"""A loaded policy: its rules, its identity (name, version, content hash) and both evaluators."""

from __future__ import annotations

import numpy as np

from . import backends
from .compiler import CompiledTable
from .errors import Diagnostic, PolicyInputError
from .reference import ReferenceEvaluator
from .result import PolicyResult
from .types import Schema


class Rule:
    """One ``[[rule]]`` of the table."""

    __slots__ = ("id", "description", "when", "action", "escalate", "adjust", "default", "line", "index", "node",
                 "term", "reads")

    def __init__(self, id: str, description: str, when: str | None, action: str, escalate: bool, adjust: float,
                 default: bool, line: int):
        self.id = id
        self.description = description
        self.when = when            # the condition's source text; None for the default rule
        self.action = action
        self.escalate = escalate
        self.adjust = adjust        # score adjustment added when the rule fires
        self.default = default      # applies when no other rule matches
        self.line = line            # line of the rule's [[rule]] header
        self.index = 0              # position among the file's [[rule]] tables
        self.node = None            # checked syntax tree (reference evaluator)
        self.term = None            # normal form (compiler, analysis)
        self.reads: tuple[str, ...] = ()  # fields the condition reads, in order of first appearance

    def __repr__(self) -> str:
        return f"Rule({self.id!r}, action={self.action!r}{', default' if self.default else ''})"


class Policy:
    """A checked, compiled decision table. Build one with ``load_policy`` or ``parse_policy``."""

    __slots__ = ("name", "version", "hash", "hit_policy", "description", "inputs", "classes", "actions", "rules",
                 "default", "warnings", "source", "reads", "backend", "analysis_complete", "text", "_by_id",
                 "_compiled", "_reference", "_schema")

    def __init__(self, *, name: str, version: str, digest: str, hit_policy: str, description: str,
                 inputs: dict[str, str], classes: tuple[str, ...] | None, actions: tuple[str, ...],
                 rules: tuple[Rule, ...], warnings: tuple[Diagnostic, ...], source: str,
                 analysis_complete: bool = True, text: str = ""):
        self.name = name
        self.version = version
        self.hash = digest                # hex sha256 of the file's bytes
        self.hit_policy = hit_policy      # UNIQUE | FIRST | PRIORITY | COLLECT
        self.description = description
        self.inputs = inputs              # declared input fields: name -> number|integer|string|bool
        self.classes = classes            # the model's classes, when declared
        self.actions = actions            # in priority order, highest first
        self.rules = rules                # every rule in file order; the default rule is the last
        self.default = rules[-1]
        self.warnings = warnings
        self.source = source
        # False when the load-time analysis stopped at its work limit: rules from the one a warning names on
        # were not checked for overlaps / reachability (UNIQUE conflicts then show up as error rows).
        self.analysis_complete = analysis_complete
        # The file's text as loaded (``hash`` is the sha256 of its UTF-8 bytes): the POLICY_CHANGE record
        # carries it, so "what did rule R06 say that day" is answered by the audit log alone.
        self.text = text
        schema = Schema(inputs, classes)
        matching = [r for r in rules if not r.default]
        reads: dict[str, str] = {}
        for rule in matching:
            for field in rule.reads:
                reads[field] = schema.type_of(field)
        self.reads = reads                # every field a condition reads (inputs and model outputs) -> type
        self._by_id = {r.id: r for r in rules}
        self._schema = schema
        self.backend = backends.DEFAULT    # which executor runs evaluate: "cython" (ext/rules.pyx) or "numpy"
        self._compiled = CompiledTable(matching, self.default, hit_policy, actions, schema,
                                       backends.module(self.backend))
        self._reference = ReferenceEvaluator(matching, self.default, hit_policy, actions, schema)

    def using(self, backend: str) -> Policy:
        """This policy with its compiled evaluator run by ``backend`` (see ``backends.available()``)."""
        clone = object.__new__(Policy)
        for slot in Policy.__slots__:
            setattr(clone, slot, getattr(self, slot))
        clone.backend = backend
        clone._compiled = CompiledTable(self._compiled.rules, self.default, self.hit_policy, self.actions,
                                        self._schema, backends.module(backend))
        return clone

    def rule(self, rule_id: str) -> Rule:
        return self._by_id[rule_id]

    def evaluate(self, columns: dict, n: int | None = None) -> PolicyResult:
        """Evaluate a batch given as columns: ``{field: array of n values}``, compiled.

        Columns hold the inputs the conditions read and the model outputs:
        ``label`` (strings, or class indices when classes are declared),
        ``confidence`` and ``score.<class>`` (float64). Missing input values are
        None (NaN in float columns). Extra columns are ignored.
        """
        if n is None:
            n = _length(columns, self.reads)
        return self._compiled.evaluate(self._compiled.encode(columns, n), n)

    def evaluate_rows(self, rows: list[dict], outputs: dict | None = None) -> PolicyResult:
        """Evaluate request dicts, compiled: fields are read from each row, or from ``outputs``
        (columns, typically the model's label/confidence/scores for the batch) when named there."""
        n = len(rows)
        try:
            encoded = self._compiled.encode_rows(rows, outputs, n)
        except TypeError as exc:
            if any(not isinstance(r, dict) for r in rows):
                raise PolicyInputError("rows", "every row must be a dict of field values") from None
            raise exc
        return self._compiled.evaluate(encoded, n)

    def evaluate_reference(self, rows: list[dict]) -> PolicyResult:
        """The same outcome as ``evaluate_rows(rows)``, computed row by row in plain Python."""
        return self._reference.evaluate(rows)

    def columns(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """The columns ``evaluate`` takes, read from request dicts (absent keys are missing values)."""
        return {name: codec.column_from_rows(rows) for name, codec in self._compiled.codecs.items()}

    def __repr__(self) -> str:
        return (f"Policy({self.name!r}, version={self.version!r}, {self.hit_policy}, "
                f"{len(self.rules)} rules, sha256={self.hash[:12]})")


def _length(columns: dict, reads: dict) -> int:
    """Rows in a batch given as columns: the length of a column the policy reads (else of any column)."""
    for name in reads:
        if name in columns:
            return len(columns[name])
    for value in columns.values():
        return len(value)
    return 0
