"""``aios-kernel policy check FILE`` and ``aios-kernel policy test FILE --cases CASES``, as functions.

Cases file (JSON lines): one object per line, ``#`` comments and blank lines
allowed::

    {"name": "clear fraud", "row": {"fraud_score": 0.93, ...}, "expect": {"action": "deny"}}

``row`` holds the policy's inputs and model outputs (``label``, ``confidence``,
``score.<class>``); ``expect`` holds ``action`` and optionally ``fired``
(list of rule ids), ``escalate`` (true or false) and ``adjust`` (the score
adjustment, a number); ``"expect": "deny"`` is short for the action alone. A
row the kernel would refuse (a bool given as 1, a label none of the policy's
classes) is refused here too. Every case runs through the compiled evaluator and
the reference; a difference between the two is reported as a failure too.

A mistake in the cases file itself is refused before any case runs, every one
as ``FILE:LINE: message`` (exit 2): not JSON, a key other than ``name``,
``row``, ``expect``; an action, or a rule id in ``fired``,
the policy does not have; ``fired`` not a list, ``escalate`` not a bool; a
row that leaves out an input the policy reads, or gives one NaN or
Infinity (JSON as Python reads it; here NaN was a missing value, inf a
number, and the kernel refuses both at the request); no cases at all. The
row that leaves out an input is refused, not guessed at: left out, the input would be missing
here (a test on it unknown), whereas the kernel never decides with it
missing (a pipeline fills in the field's default), so the case could pass
while the kernel decides the same request otherwise. A row writes the
value the request sends or the pipeline's default gives, or ``null`` to
test a missing value on purpose. A row key the policy has no field for is
not a mistake (a row may be a whole request) but is named in a note, with
the input it may have meant.

``--pipeline PIPELINE.toml`` decides each row as the kernel decides the
request: the row's pipeline fields are read as that pipeline reads a
request (types, ranges, values; one left out takes its default, so a row
may leave out what a request may), then the policy decides; a row the
pipeline would refuse fails, naming the field, as the request would.

Rule coverage counts, per rule, the cases whose outcome it made: the
deciding rule (FIRST, PRIORITY), every matching rule (COLLECT, and the rules
of a UNIQUE conflict, whose case fails), the default where none matched.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from .errors import ERROR, PolicyError, PolicyInputError
from .loader import load_policy
from .policy import Policy
from .types import Schema

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE, EXIT_UNCHECKED = 0, 1, 2, 3


def _said_a_pipeline_file(path: str | Path) -> bool:
    """Whether ``path`` is a pipeline file, said on stderr with the policy it names (checked as a policy it gave
    17 errors, one "line 0": an operator walk-through)."""
    named = _policy_a_pipeline_names(Path(path))
    if named is not None:
        print(f"{path}: a pipeline file, not a policy; its policy is {named}: `aios-kernel policy check {named}` "
              f"(a pipeline is checked by `aios-kernel pipelines check {path}`, and when a kernel loads it)", file=sys.stderr)
    return named is not None


def _policy_a_pipeline_names(path: Path) -> str | None:
    """The policy file a pipeline file at ``path`` names, if it is one (a [pipeline] table and no policy tables)."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # (TOMLDecodeError and UnicodeDecodeError are ValueErrors; a
        return None  # 5,000-digit integer one too, a deep array recursion): the policy loader says what is wrong
    if not isinstance(raw.get("pipeline"), dict) or "rule" in raw or "outputs" in raw:
        return None
    policy = raw.get("policy")
    named = policy.get("file") if isinstance(policy, dict) else None
    return str(path.parent / named) if isinstance(named, str) and named else "the file its [policy] table names"


def check_command(path: str | Path, out: TextIO = sys.stdout) -> int:
    """Load and check a policy file; print its summary or every problem. 0 = usable, 1 = refused,
    2 = no such file (nothing was checked), 3 = usable (the kernel would serve it) but NOT fully checked:
    the table analysis stopped at its work limit, so overlaps or unreachable rules may go unreported."""
    if not Path(path).is_file():
        why = "a directory, not a policy file" if Path(path).is_dir() else "no such file"
        print(f"{path}: cannot read: {why}", file=sys.stderr)
        return EXIT_UNUSABLE
    if _said_a_pipeline_file(path):
        return EXIT_UNUSABLE
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        _print_diagnostics(exc.diagnostics, out)
        errors = len(exc.errors)
        print(f"{path}: refused, {errors} error{'s' if errors != 1 else ''}", file=out)
        return EXIT_FAILED
    _print_diagnostics(policy.warnings, out)
    if policy.analysis_complete:
        print(f"{path}: OK", file=out)
    else:
        print(f"{path}: NOT fully checked: the table analysis stopped at its work limit (see the warning above); "
              "the kernel would load it, but overlaps and unreachable rules from that rule on are not reported",
              file=out)
    print(f"  policy {policy.name} version {policy.version}, hit policy {policy.hit_policy}, "
          f"{len(policy.rules)} rules ({len(policy.rules) - 1} + default '{policy.default.id}')", file=out)
    print(f"  sha256 {policy.hash}", file=out)
    reads = ", ".join(f"{name} ({ftype})" for name, ftype in policy.reads.items())
    print(f"  reads {reads or 'nothing'}", file=out)
    print(f"  actions {', '.join(policy.actions)} (highest priority first)", file=out)
    print(f"  compiled to {policy._compiled.program.registers} instructions, run by the {policy.backend} kernel",
          file=out)
    return EXIT_OK if policy.analysis_complete else EXIT_UNCHECKED


def test_command(path: str | Path, cases_path: str | Path, out: TextIO = sys.stdout,
                 pipeline_path: str | Path | None = None) -> int:
    """Run the cases against the policy: mismatches, then rule coverage. 0 = all pass, 1 = failures,
    2 = the policy, the pipeline or the cases file cannot be used. With ``pipeline_path``, each row is read as
    that pipeline reads a request (its fields' defaults, ranges and values) before the policy decides it."""
    if _said_a_pipeline_file(path):
        return EXIT_UNUSABLE
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        _print_diagnostics(exc.diagnostics, out)
        print(f"{path}: refused; no cases run", file=out)
        return EXIT_UNUSABLE
    pipeline = None
    if pipeline_path is not None:
        from ..pipelines.spec import PipelineError, load_pipeline  # (only here: it loads the pipeline machinery)

        try:  # (the policy under test, whatever file the pipeline names: its fields are what is borrowed)
            pipeline = load_pipeline(pipeline_path, lambda name: policy)
        except PipelineError as exc:
            print(f"{exc}\n{pipeline_path}: refused; no cases run", file=out)
            return EXIT_UNUSABLE
    try:
        cases = read_cases(cases_path, policy, pipeline)
    except ValueError as exc:
        print(str(exc), file=out)
        return EXIT_UNUSABLE
    for note in ignored_keys_notes(policy, cases):
        print(note, file=out)
    report = run_cases(policy, cases, pipeline)
    for line in report["failures"]:
        print(line, file=out)
    passed, total = report["passed"], len(cases)
    print(f"{total} case{'s' if total != 1 else ''}: {passed} passed, {total - passed} failed", file=out)
    coverage = report["coverage"]
    covered = sum(1 for count in coverage.values() if count)
    print(f"rule coverage: {covered} of {len(coverage)} rules fired "
          f"({100.0 * covered / max(len(coverage), 1):.0f}%)", file=out)
    for rule in policy.rules:
        count = coverage[rule.id]
        mark = "" if count else "   <- no case fires this rule"
        print(f"  {rule.id:12} {count:4} case{'s' if count != 1 else ' '}{mark}", file=out)
    return EXIT_OK if passed == total else EXIT_FAILED


CASE_KEYS = ("name", "row", "expect")
EXPECT_KEYS = ("action", "fired", "escalate", "adjust")


def read_cases(path: str | Path, policy: Policy | None = None, pipeline=None) -> list[dict]:
    """Parse a cases file, checking each case against ``policy`` when given (row keys, actions, rule ids).

    ValueError lists every bad case as ``FILE:LINE: message``, one per line (or says the file has none).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read cases: {exc}") from None
    cases, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            case = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON: {exc.msg} (column {exc.colno})")
            continue
        except ValueError as exc:  # json's int() past sys.get_int_max_str_digits(), not a JSONDecodeError
            problems.append(f"{where}: not usable JSON: {str(exc).split(';')[0]}")
            continue
        try:
            cases.append(_case(case, number, where, policy, pipeline))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise ValueError("\n".join(problems))
    if not cases:
        raise ValueError(f"no cases in {path} (a case is a JSON object on one line; # comments and blank lines "
                         "are skipped)")
    return cases


def _case(case, number: int, where: str, policy: Policy | None, pipeline=None) -> dict:
    """One case, checked; ValueError says what is wrong with it."""
    if not isinstance(case, dict):
        raise ValueError("a case is an object with a \"row\" object")
    for key in case:
        if key not in CASE_KEYS:
            inside = "; it belongs inside \"expect\"" if key in EXPECT_KEYS else _did_you_mean(key, CASE_KEYS)
            raise ValueError(f"unknown key {key!r} in the case{inside} (allowed: {', '.join(CASE_KEYS)})")
    row = case.get("row")
    if not isinstance(row, dict):
        raise ValueError("a case is an object with a \"row\" object")
    expect = case.get("expect")
    if isinstance(expect, str):
        expect = {"action": expect}
    if not isinstance(expect, dict) or not isinstance(expect.get("action"), str):
        raise ValueError("\"expect\" must be an action name or an object with \"action\"")
    for key in expect:
        if key not in EXPECT_KEYS:
            raise ValueError(f"unknown key {key!r} in \"expect\"{_did_you_mean(key, EXPECT_KEYS)} "
                             f"(allowed: {', '.join(EXPECT_KEYS)})")
    if "escalate" in expect and not isinstance(expect["escalate"], bool):
        raise ValueError(f"\"escalate\" must be true or false, not {json.dumps(expect['escalate'])}")
    if "adjust" in expect and (isinstance(expect["adjust"], bool) or not isinstance(expect["adjust"], (int, float))
                               or not math.isfinite(expect["adjust"])):
        raise ValueError(f"\"adjust\" must be a number, not {json.dumps(expect['adjust'])}")
    fired = expect.get("fired")
    if "fired" in expect and not (isinstance(fired, list) and all(isinstance(r, str) for r in fired)):
        raise ValueError(f"\"fired\" must be a list of rule ids, as in [\"R1\"], not {json.dumps(fired)}")
    ignored = []
    if policy is not None:
        _check_against(policy, row, expect)
        schema = Schema(policy.inputs, policy.classes)
        fields = {spec.name for spec in pipeline.fields} if pipeline is not None else set()
        ignored = [key for key in row if schema.type_of(key) is None and key not in fields]
        for key, value in row.items():  # JSON's true is a Python 1: the kernel refuses a bool for a number
            kind = schema.type_of(key)
            if isinstance(value, bool) and kind in ("number", "integer"):
                raise ValueError(f"row {key!r} is {json.dumps(value)}, but the policy reads it as a "
                                 f"{kind}: the kernel refuses a boolean there")
            if key in policy.inputs and isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"row {key!r} is {json.dumps(value)}, but the kernel refuses a number that is not "
                                 "finite there (a pipeline's field takes finite numbers only); write null to test a "
                                 "missing value")
            if kind == "bool" and value is not None and not isinstance(value, bool):  # (and 1 as a bool: the same)
                raise ValueError(f"row {key!r} is {json.dumps(value)}, but the policy reads it as a bool: write "
                                 "true or false (the kernel refuses anything else there)")
            if key == "label" and policy.classes is not None and value is not None and value not in policy.classes:
                raise ValueError(f"row 'label' is {json.dumps(value)}, not one of the policy's classes "
                                 f"({', '.join(policy.classes)}): the model never answers it")
        absent = [name for name in policy.inputs if name in policy.reads and name not in row]
        if absent and pipeline is None:  # (with the pipeline, it fills them in as the kernel does)
            raise ValueError(_absent_inputs(absent, ignored))
    name = str(case.get("name", f"line {number}"))
    return {"name": name, "line": number, "where": where, "row": row, "expect": expect, "ignored": ignored}


def _absent_inputs(absent: list[str], ignored: list[str]) -> str:
    """Why a row that leaves out inputs the policy reads is refused (a case decided with them missing could
    pass where the kernel, which never leaves a field missing, decides the same request otherwise)."""
    names = ", ".join(repr(name) for name in absent)
    typo = next((f" (the row has {key!r}{_did_you_mean(key, absent, cutoff=0.8)})" for key in ignored
                 if _did_you_mean(key, absent, cutoff=0.8)), "")
    return (f"the row leaves out {names}, which the policy reads{typo}: the kernel never decides with an input "
            "missing (a pipeline fills in the field's default), so write the value the request sends or the "
            "default gives, or null to test a missing value")


def ignored_keys_notes(policy: Policy, cases: list[dict]) -> list[str]:
    """One note per row key the policy has no field for, at its first line. Not an error: a row may be a
    whole request (pipeline fields the policy does not read); but a typo would be a silently missing
    value, so each is named, with the input it may have meant."""
    schema, seen, notes = Schema(policy.inputs, policy.classes), set(), []
    for case in cases:
        for key in case["ignored"]:
            if key not in seen:
                seen.add(key)
                known = [*schema.inputs, "label", "confidence", *(f"score.{c}" for c in schema.classes or ())]
                notes.append(f"{case['where']}: note: row key {key!r} is not read by the policy and is ignored"
                             f"{_did_you_mean(key, known, cutoff=0.8)}")  # (a near miss only: rows carry other fields)
    return notes


def _check_against(policy: Policy, row: dict, expect: dict) -> None:
    if expect["action"] not in policy.actions:
        raise ValueError(f"action {expect['action']!r} is not one of the policy's actions "
                         f"({', '.join(policy.actions)}){_did_you_mean(expect['action'], policy.actions)}")
    ids = [r.id for r in policy.rules]
    unknown = [r for r in expect.get("fired", ()) if r not in ids]
    if unknown:
        hint = _did_you_mean(unknown[0], ids) if len(unknown) == 1 else ""
        listed = ", ".join(repr(r) for r in unknown)
        raise ValueError(f"\"fired\" names {'a rule' if len(unknown) == 1 else 'rules'} the policy does not "
                         f"have: {listed}{hint}")


def _did_you_mean(word: str, choices, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def run_cases(policy: Policy, cases: list[dict], pipeline=None) -> dict:
    """Evaluate every case with both evaluators (its row read as ``pipeline`` reads a request, when given);
    failures as printable lines, coverage per rule id."""
    failures: list[str] = []
    coverage: Counter = Counter({rule.id: 0 for rule in policy.rules})
    passed = 0
    for case in cases:
        label = f"{case['where']}: case {case['name']!r}"
        row = case["row"]
        if pipeline is not None:
            try:
                row = as_requested(pipeline, row)
            except ValueError as exc:
                failures.append(f"{label}: the kernel refuses this request: {exc}")
                continue
        try:
            got = policy.evaluate_rows([row]).row(0)
            ref = policy.evaluate_reference([row]).row(0)
        except PolicyInputError as exc:
            failures.append(f"{label}: the row does not fit the policy: {exc}")
            continue
        for rule_id in got["fired"]:
            coverage[rule_id] += 1
        problems = []
        if got != ref:
            problems.append(f"compiled and reference evaluators disagree ({got} vs {ref})")
        expect = case["expect"]
        if got["action"] != expect["action"]:
            problems.append(f"expected action {expect['action']!r}, got {got['action']!r}")
        if "fired" in expect and list(expect["fired"]) != got["fired"]:
            problems.append(f"expected rules {expect['fired']}, fired {got['fired']}")
        if "adjust" in expect and not math.isclose(expect["adjust"], got["adjust"], rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"expected adjust {expect['adjust']:g}, got {got['adjust']:g}")
        if "escalate" in expect and expect["escalate"] != got["escalate"]:
            problems.append(f"expected escalate {str(expect['escalate']).lower()}, got {str(got['escalate']).lower()}")
        if got["error"]:
            problems.append(f"row error: {got['error']}")
        if problems:
            failures.append(f"{label}: {'; '.join(problems)} (fired {', '.join(got['fired'])})")
        else:
            passed += 1
    return {"passed": passed, "failures": failures, "coverage": coverage}


def as_requested(pipeline, row: dict) -> dict:
    """``row`` as the kernel decides it when a request sends its pipeline fields: each read and checked by the
    pipeline (ranges, values, types), the ones left out given their defaults; other keys (model outputs) kept.
    ValueError says why the kernel would refuse the request, naming the field."""
    from ..errors import InvalidArgument
    from ..field_values import to_value
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    names = {spec.name for spec in pipeline.fields}
    request = kpb.DecisionRequest(pipeline=pipeline.name)
    for name, value in row.items():
        if name not in names:
            continue
        if value is None:
            raise ValueError(f"field '{name}' is null, which no request can send (leave it out for the "
                             "pipeline's default)")
        try:
            request.fields[name].CopyFrom(to_value(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"field '{name}': {exc}") from None
    try:
        values = pipeline.codec.read(request.fields)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
    return {**{k: v for k, v in row.items() if k not in names}, **values}


def _print_diagnostics(diagnostics, out: TextIO) -> None:
    for d in diagnostics:
        print(f"{d}" if d.severity == ERROR else f"{d.path}:{d.line}: warning: {d.subject}: {d.message}", file=out)
        if d.excerpt:
            for line in d.excerpt.splitlines():
                print(f"    {line}", file=out)
