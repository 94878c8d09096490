"""``aios-kernel policy check FILE`` and ``aios-kernel policy test FILE --cases CASES``, as functions.

Cases file (JSON lines): one object per line, ``#`` comments and blank lines
allowed::

    {"name": "clear fraud", "row": {"fraud_score": 0.93, ...}, "expect": {"action": "deny"}}

``row`` holds request fields and model outputs (``label``, ``confidence``,
``score.<class>``); ``expect`` holds ``action`` and optionally ``fired``
(list of rule ids) and ``escalate``; ``"expect": "deny"`` is short for the
action alone. Every case runs through the compiled evaluator and the
reference; a difference between the two is reported as a failure too.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from .errors import ERROR, PolicyError, PolicyInputError
from .loader import load_policy
from .policy import Policy

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def check_command(path: str | Path, out: TextIO = sys.stdout) -> int:
    """Load and check a policy file; print its summary or every problem. 0 = usable, 1 = refused,
    2 = no such file (nothing was checked)."""
    if not Path(path).is_file():
        print(f"{path}: cannot read: no such file", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        _print_diagnostics(exc.diagnostics, out)
        errors = len(exc.errors)
        print(f"{path}: refused, {errors} error{'s' if errors != 1 else ''}", file=out)
        return EXIT_FAILED
    _print_diagnostics(policy.warnings, out)
    print(f"{path}: OK", file=out)
    print(f"  policy {policy.name} version {policy.version}, hit policy {policy.hit_policy}, "
          f"{len(policy.rules)} rules ({len(policy.rules) - 1} + default '{policy.default.id}')", file=out)
    print(f"  sha256 {policy.hash}", file=out)
    reads = ", ".join(f"{name} ({ftype})" for name, ftype in policy.reads.items())
    print(f"  reads {reads or 'nothing'}", file=out)
    print(f"  actions {', '.join(policy.actions)} (highest priority first)", file=out)
    print(f"  compiled to {policy._compiled.program.registers} instructions, run by the {policy.backend} kernel",
          file=out)
    return EXIT_OK


def test_command(path: str | Path, cases_path: str | Path, out: TextIO = sys.stdout) -> int:
    """Run the cases against the policy: mismatches, then rule coverage. 0 = all pass, 1 = failures,
    2 = the policy or the cases file cannot be used."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        _print_diagnostics(exc.diagnostics, out)
        print(f"{path}: refused; no cases run", file=out)
        return EXIT_UNUSABLE
    try:
        cases = read_cases(cases_path)
    except ValueError as exc:
        print(str(exc), file=out)
        return EXIT_UNUSABLE
    report = run_cases(policy, cases)
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


def read_cases(path: str | Path) -> list[dict]:
    """Parse a cases file; ValueError names the file and line of the first bad case."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read cases: {exc}") from None
    cases = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            case = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(case, dict) or not isinstance(case.get("row"), dict):
            raise ValueError(f"{where}: a case is an object with a \"row\" object")
        expect = case.get("expect")
        if isinstance(expect, str):
            expect = {"action": expect}
        if not isinstance(expect, dict) or not isinstance(expect.get("action"), str):
            raise ValueError(f"{where}: \"expect\" must be an action name or an object with \"action\"")
        unknown = set(expect) - {"action", "fired", "escalate"}
        if unknown:
            raise ValueError(f"{where}: unknown keys in \"expect\": {', '.join(sorted(unknown))}")
        cases.append({"name": str(case.get("name", f"line {number}")), "line": number, "where": where,
                      "row": case["row"], "expect": expect})
    return cases


def run_cases(policy: Policy, cases: list[dict]) -> dict:
    """Evaluate every case with both evaluators; failures as printable lines, coverage per rule id."""
    failures: list[str] = []
    coverage: Counter = Counter({rule.id: 0 for rule in policy.rules})
    passed = 0
    for case in cases:
        label = f"{case['where']}: case {case['name']!r}"
        try:
            got = policy.evaluate_rows([case["row"]]).row(0)
            ref = policy.evaluate_reference([case["row"]]).row(0)
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
        if "escalate" in expect and bool(expect["escalate"]) != got["escalate"]:
            problems.append(f"expected escalate {str(expect['escalate']).lower()}, got {str(got['escalate']).lower()}")
        if got["error"]:
            problems.append(f"row error: {got['error']}")
        if problems:
            failures.append(f"{label}: {'; '.join(problems)} (fired {', '.join(got['fired'])})")
        else:
            passed += 1
    return {"passed": passed, "failures": failures, "coverage": coverage}


def _print_diagnostics(diagnostics, out: TextIO) -> None:
    for d in diagnostics:
        print(f"{d}" if d.severity == ERROR else f"{d.path}:{d.line}: warning: {d.subject}: {d.message}", file=out)
        if d.excerpt:
            for line in d.excerpt.splitlines():
                print(f"    {line}", file=out)
