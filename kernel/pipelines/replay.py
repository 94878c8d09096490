"""What-if replay: re-decide recorded cases under a candidate policy (and optionally a candidate model).

Each DECISION record keeps the validated, tokenized inputs and the raw
class scores the model produced, so a candidate policy can be evaluated
exactly as the kernel would have, without the model and without PII. With
a candidate ONNX model the inputs are re-encoded by the pipeline's field
spec and the model re-run. The report counts action and outcome
transitions, and cases whose deciding rules or score adjustment change under
the same action and outcome (``rules_changed``: the reasons an adverse-action
notice cites change). Each case names the policy (hash and declared version) it was
decided under, and the counts are broken down by that baseline, since a log
can span policy changes. With ``keep_cases`` it lists every changed case
(the ``--report`` file), otherwise only a sample. JSON-ready: the gate
before a policy change ships.

A candidate is held to what the kernel itself would accept before a single
case is re-decided (``ReplayError`` otherwise, with the kernel's own text): a
candidate model's ``model.toml`` is checked against its graph as a load
checks it, then bound to the pipeline as the registry binds one (input name
and width, output present with labels, the policy's classes and
``score.<class>`` reads against those labels); without a candidate model the
policy's classes and score reads are checked against the class labels each
recorded decision carries. With a candidate model, FALLBACK decisions (the
model failed, so no scores were recorded) are re-decided from their recorded
inputs too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from .fields import encode_rows
from ..policy.errors import PolicyInputError
from .binding import check_classes
from .registry import PipelineRegistry
from .spec import Pipeline, PipelineError

CHUNK = 4096  # records evaluated per vectorized policy pass
_OUTCOMES = {kpb.AUTOMATED: "AUTOMATED", kpb.ESCALATED: "ESCALATED", kpb.FALLBACK: "FALLBACK"}


class ReplayError(ValueError):
    """The replay cannot run as asked: a policy that does not fit the classes of the recorded decisions,
    or a candidate's output not of the shape its labels say. One line, in the kernel's words where it has
    them. (A candidate model the kernel would refuse raises the kernel's own error in ``load_candidate``.)"""


@dataclass(frozen=True)
class CandidateModel:
    """A candidate model version, checked as the kernel checks one before it decides with it."""

    session: object  # onnxruntime.InferenceSession (CPU)
    labels: tuple[str, ...]  # the class of each value of a row of ``output``
    input: str  # the graph input the pipeline's fields are encoded into
    output: str  # the graph output read as class scores
    identity: dict  # {"path", "onnx_sha256", "config_sha256"}: what was run


class _OneModel:
    """A stand-in for the model hub that holds only the candidate: the registry's binding checks ask it."""

    def __init__(self, version):
        self._version = version

    def get(self, name, version=None):
        return self._version


@dataclass(frozen=True)
class _Version:  # what the binding checks read of a loaded model version
    name: str
    version: str
    config: object


def load_candidate(folder: str | Path, pipeline: Pipeline) -> CandidateModel:
    """The candidate model version in ``folder`` (model.onnx, and model.toml or a config derived from the
    graph as the kernel derives one), refused as the kernel would refuse it: ``model.toml`` against the
    graph (``check_against_graph``, as a load), then the pipeline bound to it (``PipelineRegistry._bind``:
    input name and width, output and its labels, the policy's classes and score reads). Raises
    ``ModelConfigError`` (the folder, its files, the graph check) or ``PipelineError`` (the binding), each
    with the kernel's own text."""
    import onnxruntime as ort

    from ..models import config as model_config
    from ..models.errors import ModelConfigError
    from ..models.runtime import check_against_graph, derive_config, model_files, model_sha256

    path = Path(folder)
    name, version = path.resolve().parent.name, path.resolve().name
    toml, onnx_path = path / "model.toml", path / "model.onnx"
    if not path.is_dir():
        raise ModelConfigError(path, "", "is not a model version folder (model.onnx, and model.toml)")
    config, config_sha256 = (model_config.load_with_digest(toml, name, version) if toml.is_file() else (None, ""))
    try:
        onnx_sha256 = model_sha256(model_files(onnx_path))  # before the session reads it: names what was run
    except OSError as exc:
        raise ModelConfigError(onnx_path, "", f"cannot be read: {exc.strerror or exc}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a refusal is said once, by the caller
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several exception types for a bad file
        raise ModelConfigError(onnx_path, "", f"onnxruntime cannot load it: {exc}") from None
    if config is None:
        config = derive_config(session, name, version, onnx_path)
    else:
        check_against_graph(config, session, toml)
    registry = PipelineRegistry(path, _OneModel(_Version(name, version, config)), load_policy=None, poll_s=0)
    registry._bind(pipeline)  # the kernel's own binding checks, against this version alone
    labels = next(spec.labels for spec in config.outputs if spec.name == pipeline.output)
    identity = {"path": str(path.resolve()), "onnx_sha256": onnx_sha256, "config_sha256": config_sha256}
    return CandidateModel(session, tuple(labels), pipeline.input, pipeline.output, identity)


@dataclass
class ReplayReport:
    pipeline: str
    policy: str
    policy_hash: str
    examined: int = 0  # decision records of this pipeline in range
    changed: int = 0  # action or outcome differs
    rules_changed: int = 0  # same action and outcome, other deciding rules
    skipped: int = 0  # records that could not be re-evaluated (e.g. a field the candidate does not know)
    fallbacks: int = 0  # of examined: FALLBACK decisions (no recorded scores) re-decided by the candidate model
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
    # of examined, without a candidate model: cases that took a default the candidate changes for a field the
    # model reads; the policy sees the candidate's default, the scores are the recorded model's on the old one
    stale_scores: int = 0
    seconds: float = 0.0

    @property
    def any_change(self) -> bool:
        return bool(self.changed or self.rules_changed)

    def as_json(self) -> dict:
        return {
            "pipeline": self.pipeline, "policy": self.policy, "policy_hash": self.policy_hash,
            "candidate_model": self.candidate_model,
            "examined": self.examined, "changed": self.changed, "rules_changed": self.rules_changed,
            "skipped": self.skipped, "fallbacks_redecided": self.fallbacks,
            "transitions": [{"from": a, "to": b, "count": n} for (a, b), n in sorted(self.transitions.items())],
            "outcome_transitions": [{"from": a, "to": b, "count": n}
                                    for (a, b), n in sorted(self.outcome_transitions.items())],
            "baselines": [{"policy_hash": h, "policy_version": v, **counts}
                          for (h, v), counts in self.baselines.items()],
            "skipped_reasons": dict(self.skipped_reasons), "stale_scores": self.stale_scores,
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
    __slots__ = ("record", "values", "scores", "labels")

    def __init__(self, record, values, scores, labels):
        self.record, self.values, self.scores, self.labels = record, values, scores, labels


def replay(records: Iterable[kpb.AuditRecord], pipeline: Pipeline, model: CandidateModel | None = None,
           since_unix_ns: int = 0, sample_size: int = 20, keep_cases: bool = False) -> ReplayReport:
    """Re-decide every DECISION record of ``pipeline.name`` with ``pipeline.policy``.

    ``model``: an optional candidate from ``load_candidate`` (checked against ``pipeline`` there).
    ``keep_cases``: list every changed case in the report, not only the first ``sample_size``.
    Raises ``ReplayError`` when the policy does not fit the class labels a record carries.
    """
    if model is not None and not isinstance(model, CandidateModel):
        raise TypeError("model: a CandidateModel from load_candidate (checked against the pipeline)")
    started = time.monotonic()
    report = ReplayReport(pipeline.name, f"{pipeline.policy.name} {pipeline.policy.version}", pipeline.policy.hash)
    chunk: list[_Case] = []
    fitting: set[tuple[str, ...]] = set()  # recorded label sets the policy was checked against
    for record in records:
        if record.kind != kpb.DECISION or record.pipeline != pipeline.name:
            continue
        if since_unix_ns and record.time_unix_ns < since_unix_ns:
            continue
        if record.decision.error_code:
            continue
        case = _case(record, pipeline, report, model)
        if case is None:
            continue
        if model is None and case.labels not in fitting:
            _check_recorded_labels(pipeline, record, case.labels)
            fitting.add(case.labels)
        if chunk and case.labels != chunk[0].labels:  # a chunk is one score matrix: one set of classes
            _evaluate(chunk, pipeline, model, report, sample_size, keep_cases)
            chunk = []
        chunk.append(case)
        if len(chunk) >= CHUNK:
            _evaluate(chunk, pipeline, model, report, sample_size, keep_cases)
            chunk = []
    if chunk:
        _evaluate(chunk, pipeline, model, report, sample_size, keep_cases)
    report.seconds = time.monotonic() - started
    return report


def _check_recorded_labels(pipeline: Pipeline, record, labels: tuple[str, ...]) -> None:
    """The policy's classes and ``score.<class>`` reads against the class labels of a recorded decision,
    as the kernel checks them against a model's labels when it binds a pipeline (same text)."""
    model = record.decision.model
    which = f"model '{model.model_name}' version {model.model_version}" if model.model_name else "the model"
    try:
        check_classes(pipeline, f"decision #{record.sequence} as recorded (the scores of {which})", labels)
    except PipelineError as exc:
        raise ReplayError(f"{exc}; replay only decisions of a model the policy fits (--since), or give "
                          "--model") from None


def _case(record, pipeline: Pipeline, report: ReplayReport, model: CandidateModel | None = None) -> _Case | None:
    """The case of ``record`` as the candidate ``pipeline`` would have seen it: the fields the caller sent as
    recorded, and each field the caller left out (``defaulted_fields``) with the candidate's default, as the
    kernel serving the candidate would fill it in (an analyst's walk-through: a candidate that changed a
    default replayed the recorded one, 0 changed, where the served candidate decided otherwise). None (and
    counted as skipped) for a case the candidate would refuse."""
    values = {}
    defaulted = record.defaulted_fields  # (empty for a kernel from before it: its values as recorded)
    stale = False
    for spec in pipeline.fields:
        if spec.name in record.inputs and spec.name not in defaulted:
            values[spec.name] = _python(record.inputs[spec.name])
        elif spec.required:
            report.skipped += 1
            report.skipped_reasons[f"missing required field '{spec.name}'"] += 1
            return None
        else:
            values[spec.name] = spec.default
            if spec.encode != "none" and spec.name in record.inputs and \
                    _python(record.inputs[spec.name]) != spec.default:
                stale = True  # the model read the old default: its recorded scores are not the candidate's
    if model is not None:  # the candidate scores every case from its inputs: FALLBACKs (no scores) too
        return _Case(record, values, None, model.labels)
    scores = dict(record.model_outputs) or dict(record.decision.model.class_scores)
    if not scores:
        report.skipped += 1
        report.skipped_reasons["no recorded model outputs (the model failed: give --model to re-decide)"] += 1
        return None
    if stale:  # (counted of the cases examined: a skipped one has no recorded scores to be stale)
        report.stale_scores += 1
    return _Case(record, values, scores, tuple(sorted(scores)))  # (map order is none: ties break alphabetically)


def _evaluate(chunk: list[_Case], pipeline: Pipeline, model, report: ReplayReport, sample_size: int,
              keep_cases: bool) -> None:
    n = len(chunk)
    labels = list(chunk[0].labels)  # one set of classes per chunk (replay cuts chunks where it changes)
    if model is not None:
        x = encode_rows(pipeline.fields, [c.values for c in chunk], pipeline.width)
        (output,) = model.session.run([model.output], {model.input: x})  # by name, as bound: never another
        scores = np.asarray(output, dtype=np.float64)
        if scores.shape != (n, len(labels)):
            raise ReplayError(f"the candidate model's output '{model.output}' has shape {list(scores.shape)} "
                              f"for {n} rows; its labels say {len(labels)} values a row")
    else:
        scores = np.array([[c.scores[name] for name in labels] for c in chunk], dtype=np.float64)
    best = scores.argmax(axis=1)
    confidence = scores[np.arange(n), best]
    outputs = {"label": np.array([labels[i] for i in best], dtype=object), "confidence": confidence}
    for j, name in enumerate(labels):
        outputs["score." + name] = scores[:, j]
    try:
        result = pipeline.policy.evaluate_rows([c.values for c in chunk], outputs)  # as the live engine does
    except PolicyInputError as exc:
        # A recorded case the candidate's policy refuses (a whole number past 2**53, refused since 2026-11-28, in a
        # decision recorded before): the kernel serving the candidate would refuse that request, so it is skipped
        # and counted, as a case missing a required field is, not the whole replay stopped (exit 2).
        if n == 1:
            report.skipped += 1
            # (by field, not by message: one that quotes each value would list every such case on a line of its own)
            report.skipped_reasons[f"field '{exc.field}' refused by the candidate's policy, as the kernel serving "
                                   "it refuses such a request"] += 1
            return
        for case in chunk:  # (rare: each case alone, to skip only the refused ones)
            _evaluate([case], pipeline, model, report, sample_size, keep_cases)
        return
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
        report.fallbacks += old.outcome == kpb.FALLBACK
        report.transitions[(old.action, new_action)] += 1
        report.outcome_transitions[(old_outcome, new_outcome)] += 1
        new_adjust = float(result.adjust[k])
        if new_action != old.action or new_outcome != old_outcome:
            what, cases, sample = "changed", report.changed_cases, report.sample
        elif new_rules != old_rules or new_adjust != _recorded_adjust(old, new_rules, new_adjust, pipeline):
            # Same answer for other reasons (what a notice to the customer cites), or with another score
            # adjustment, a documented output (a pipeline author's walk-through: a changed `adjust` passed the gate).
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
            entry = _entry(case.record, old_outcome, old_rules, (new_action, new_outcome, new_rules), new_adjust)
            if keep_cases:
                cases.append(entry)
            if len(sample) < sample_size:
                sample.append(entry)


def _recorded_adjust(old: kpb.Decision, new_rules: list[str], new_adjust: float, pipeline: Pipeline) -> float:
    """The score adjustment ``old`` was decided with. A record of a kernel from before
    ``Decision.score_adjustment`` carries none (0): under the very policy it was decided by, with the same rules
    fired, its adjustment was the candidate's by construction, and is taken as such (an upgrade audit: every
    adjusted decision of an older kernel was listed as 'adjust 0 -> -0.1' under its unchanged policy, and
    --fail-on-change failed on it)."""
    if (old.score_adjustment == 0 and old.policy_hash == pipeline.policy.hash
            and [r.rule_id for r in old.reasons] == new_rules):
        return new_adjust
    return old.score_adjustment


def _entry(record, old_outcome: str, old_rules: list[str], new: tuple[str, str, list[str]], adjust: float) -> dict:
    """One case of the report: what was decided, under which policy, and what the candidate decides."""
    old = record.decision
    action, outcome, rules = new
    return {
        "sequence": record.sequence, "request_id": old.request_id, "time_unix_ns": record.time_unix_ns,
        "from": {"action": old.action, "outcome": old_outcome, "rules": old_rules, "adjust": old.score_adjustment,
                 "policy_hash": old.policy_hash, "policy_version": old.policy_version},
        "to": {"action": action, "outcome": outcome, "rules": rules, "adjust": adjust},
    }
