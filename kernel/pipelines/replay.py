"""What-if replay: re-decide recorded cases under a candidate policy (and optionally a candidate model).

Each DECISION record keeps the validated, tokenized inputs and the raw
class scores the model produced, so a candidate policy can be evaluated
exactly as the kernel would have, without the model and without PII. With
a candidate ONNX model the inputs are re-encoded by the pipeline's field
spec and the model re-run. The report counts action and outcome
transitions, and cases whose deciding rules change under the same action
and outcome (``rules_changed``: the reasons an adverse-action notice cites
change). Each case names the policy (hash and declared version) it was
decided under, and the counts are broken down by that baseline, since a log
can span policy changes. With ``keep_cases`` it lists every changed case
(the ``--report`` file), otherwise only a sample. JSON-ready: the gate
before a policy change ships.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .fields import encode_rows
from .spec import Pipeline

CHUNK = 4096  # records evaluated per vectorized policy pass
_OUTCOMES = {kpb.AUTOMATED: "AUTOMATED", kpb.ESCALATED: "ESCALATED", kpb.FALLBACK: "FALLBACK"}


@dataclass
class ReplayReport:
    pipeline: str
    policy: str
    policy_hash: str
    examined: int = 0  # decision records of this pipeline in range
    changed: int = 0  # action or outcome differs
    rules_changed: int = 0  # same action and outcome, other deciding rules
    skipped: int = 0  # records that could not be re-evaluated (e.g. a field the candidate does not know)
    transitions: Counter = field(default_factory=Counter)  # (old action, new action) -> count
    outcome_transitions: Counter = field(default_factory=Counter)
    sample: list[dict] = field(default_factory=list)  # the first changed cases, for a person to read
    changed_cases: list[dict] = field(default_factory=list)  # every changed case (with keep_cases)
    rules_changed_cases: list[dict] = field(default_factory=list)  # every rules-only change (with keep_cases)
    rules_sample: list[dict] = field(default_factory=list)  # the first rules-only changes
    # (policy hash, policy version) decided under -> {"examined", "changed", "rules_changed"}
    baselines: dict = field(default_factory=dict)
    candidate_model: dict | None = None  # {"path", "onnx_sha256", "config_sha256"} when a model was re-run
    skipped_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def any_change(self) -> bool:
        return bool(self.changed or self.rules_changed)

    def as_json(self) -> dict:
        return {
            "pipeline": self.pipeline, "policy": self.policy, "policy_hash": self.policy_hash,
            "candidate_model": self.candidate_model,
            "examined": self.examined, "changed": self.changed, "rules_changed": self.rules_changed,
            "skipped": self.skipped,
            "transitions": [{"from": a, "to": b, "count": n} for (a, b), n in sorted(self.transitions.items())],
            "outcome_transitions": [{"from": a, "to": b, "count": n}
                                    for (a, b), n in sorted(self.outcome_transitions.items())],
            "baselines": [{"policy_hash": h, "policy_version": v, **counts}
                          for (h, v), counts in self.baselines.items()],
            "skipped_reasons": dict(self.skipped_reasons),
            "changed_cases": self.changed_cases, "rules_changed_cases": self.rules_changed_cases,
            "sample": self.sample, "seconds": round(self.seconds, 3),
        }

    def count_baseline(self, decision, what: str | None) -> None:
        counts = self.baselines.setdefault((decision.policy_hash, decision.policy_version),
                                           {"examined": 0, "changed": 0, "rules_changed": 0})
        counts["examined"] += 1
        if what is not None:
            counts[what] += 1


def _python(value: kpb.Value):
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind else None


class _Case:
    __slots__ = ("record", "values", "scores")

    def __init__(self, record, values, scores):
        self.record, self.values, self.scores = record, values, scores


def replay(records: Iterable[kpb.AuditRecord], pipeline: Pipeline, model=None, since_unix_ns: int = 0,
           sample_size: int = 20, keep_cases: bool = False) -> ReplayReport:
    """Re-decide every DECISION record of ``pipeline.name`` with ``pipeline.policy``.

    ``model``: an optional candidate ``(onnxruntime session, class labels in output order)``.
    ``keep_cases``: list every changed case in the report, not only the first ``sample_size``.
    """
    started = time.monotonic()
    report = ReplayReport(pipeline.name, f"{pipeline.policy.name} {pipeline.policy.version}", pipeline.policy.hash)
    chunk: list[_Case] = []
    for record in records:
        if record.kind != kpb.DECISION or record.pipeline != pipeline.name:
            continue
        if since_unix_ns and record.time_unix_ns < since_unix_ns:
            continue
        if record.decision.error_code:
            continue
        case = _case(record, pipeline, report)
        if case is None:
            continue
        chunk.append(case)
        if len(chunk) >= CHUNK:
            _evaluate(chunk, pipeline, model, report, sample_size, keep_cases)
            chunk = []
    if chunk:
        _evaluate(chunk, pipeline, model, report, sample_size, keep_cases)
    report.seconds = time.monotonic() - started
    return report


def _case(record, pipeline: Pipeline, report: ReplayReport) -> _Case | None:
    values = {}
    for spec in pipeline.fields:
        if spec.name in record.inputs:
            values[spec.name] = _python(record.inputs[spec.name])
        elif spec.required:
            report.skipped += 1
            report.skipped_reasons[f"missing required field '{spec.name}'"] += 1
            return None
        else:
            values[spec.name] = spec.default
    scores = dict(record.model_outputs) or dict(record.decision.model.class_scores)
    if not scores:
        report.skipped += 1
        report.skipped_reasons["no recorded model outputs"] += 1
        return None
    return _Case(record, values, scores)


def _evaluate(chunk: list[_Case], pipeline: Pipeline, model, report: ReplayReport, sample_size: int,
              keep_cases: bool) -> None:
    n = len(chunk)
    if model is not None:
        model_session, labels = model
        labels = list(labels)
        x = encode_rows(pipeline.fields, [c.values for c in chunk], pipeline.width)
        feeds = {model_session.get_inputs()[0].name: x}
        names = [o.name for o in model_session.get_outputs()]
        output = model_session.run(names, feeds)[names.index(pipeline.output) if pipeline.output in names else 0]
        scores = np.asarray(output, dtype=np.float64).reshape(n, -1)
        if scores.shape[1] != len(labels):
            raise ValueError(f"the candidate model gives {scores.shape[1]} classes; the records have {len(labels)}")
    else:
        labels = sorted(chunk[0].scores)  # protobuf maps have no order; ties then break alphabetically
        scores = np.array([[c.scores.get(name, 0.0) for name in labels] for c in chunk], dtype=np.float64)
    best = scores.argmax(axis=1)
    confidence = scores[np.arange(n), best]
    outputs = {"label": np.array([labels[i] for i in best], dtype=object), "confidence": confidence}
    for j, name in enumerate(labels):
        outputs["score." + name] = scores[:, j]
    result = pipeline.policy.evaluate_rows([c.values for c in chunk], outputs)  # as the live engine does
    minimum = pipeline.escalation.min_confidence
    for k, case in enumerate(chunk):
        old = case.record.decision
        new_action = str(result.action[k])
        escalated = bool(result.escalate[k]) or float(confidence[k]) < minimum
        new_outcome = "ESCALATED" if escalated else "AUTOMATED"
        old_outcome = _OUTCOMES.get(old.outcome, str(old.outcome))
        old_rules = [r.rule_id for r in old.reasons]
        new_rules = [str(rule) for rule in result.fired[k]]
        report.examined += 1
        report.transitions[(old.action, new_action)] += 1
        report.outcome_transitions[(old_outcome, new_outcome)] += 1
        if new_action != old.action or new_outcome != old_outcome:
            what, cases, sample = "changed", report.changed_cases, report.sample
        elif new_rules != old_rules:  # same answer for other reasons: what a notice to the customer cites
            what, cases, sample = "rules_changed", report.rules_changed_cases, report.rules_sample
        else:
            report.count_baseline(old, None)
            continue
        report.count_baseline(old, what)
        if what == "changed":
            report.changed += 1
        else:
            report.rules_changed += 1
        if keep_cases or len(sample) < sample_size:
            entry = _entry(case.record, old_outcome, old_rules, (new_action, new_outcome, new_rules))
            if keep_cases:
                cases.append(entry)
            if len(sample) < sample_size:
                sample.append(entry)


def _entry(record, old_outcome: str, old_rules: list[str], new: tuple[str, str, list[str]]) -> dict:
    """One case of the report: what was decided, under which policy, and what the candidate decides."""
    old = record.decision
    action, outcome, rules = new
    return {
        "sequence": record.sequence, "request_id": old.request_id, "time_unix_ns": record.time_unix_ns,
        "from": {"action": old.action, "outcome": old_outcome, "rules": old_rules,
                 "policy_hash": old.policy_hash, "policy_version": old.policy_version},
        "to": {"action": action, "outcome": outcome, "rules": rules},
    }
