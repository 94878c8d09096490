"""`aios-kernel policy check` and `aios-kernel policy test`, run as the real command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "examples" / "claims" / "pipelines" / "policy.toml"
CASES = ROOT / "examples" / "claims" / "pipelines" / "policy_cases.jsonl"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernel", "policy", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_check_accepts_the_claims_policy():
    run = cli("check", str(POLICY))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"{POLICY}: OK"
    assert "policy claims_triage version 2026-11-25.1, hit policy FIRST, 11 rules" in lines[1]
    assert lines[2].startswith("  sha256 ") and len(lines[2].split()[1]) == 64


def test_check_refuses_with_file_line_and_a_caret(tmp_path):
    broken = tmp_path / "policy.toml"
    text = POLICY.read_text().replace("fraud_score >= 0.8 and not has_police_report",
                                      "fraud_scor >= 0.8 and not has_police_report")
    broken.write_text(text)
    run = cli("check", str(broken))
    assert run.returncode == 1
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "fraud_scor >=" in t)
    assert run.stdout.startswith(f"{broken}:{line}: rule 'R01' when: unknown field 'fraud_scor'; "
                                 "did you mean 'fraud_score'?")
    assert "    fraud_scor >= 0.8" in run.stdout and "\n    ^\n" in run.stdout
    assert run.stdout.rstrip().endswith("refused, 1 error")


def test_check_of_a_file_that_does_not_exist_exits_2(tmp_path):
    run = cli("check", str(tmp_path / "missing.toml"))
    assert run.returncode == 2 and "missing.toml: cannot read: no such file" in run.stderr


def test_check_reports_an_unreachable_rule(tmp_path):
    broken = tmp_path / "policy.toml"
    broken.write_text(POLICY.read_text().replace('when = "claim_amount in [0, 5000) and fraud_score < 0.4"',
                                                 'when = "claim_amount in [0, 5000) and fraud_score < 0.3 and '
                                                 "customer_tier in {'gold'} and confidence >= 0.8\""))
    run = cli("check", str(broken))
    assert run.returncode == 1
    assert "rule 'R09': is unreachable: every row it matches is matched first by" in run.stdout
    assert "'R08'" in run.stdout


def test_test_runs_the_sample_cases_with_coverage():
    run = cli("test", str(POLICY), "--cases", str(CASES))
    assert run.returncode == 0, run.stdout
    cases = [line for line in CASES.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert f"{len(cases)} cases: {len(cases)} passed, 0 failed" in run.stdout
    assert "rule coverage: 11 of 11 rules fired (100%)" in run.stdout
    assert "no case fires this rule" not in run.stdout


def test_test_reports_mismatches_and_uncovered_rules(tmp_path):
    cases = tmp_path / "cases.jsonl"
    base = json.loads(CASES.read_text().splitlines()[2])
    wrong = dict(base, name="wrong action", expect={"action": "approve", "escalate": True})
    wrong_rules = dict(base, name="wrong rules", expect={"action": base["expect"]["action"], "fired": ["R09"]})
    cases.write_text("# comment\n\n" + "\n".join(json.dumps(c) for c in (base, wrong, wrong_rules)) + "\n")
    run = cli("test", str(POLICY), "--cases", str(cases))
    assert run.returncode == 1
    assert (f"{cases}:4: case 'wrong action': expected action 'approve', got 'deny'; expected escalate true, "
            "got false (fired R01)") in run.stdout
    assert f"{cases}:5: case 'wrong rules': expected rules ['R09'], fired ['R01']" in run.stdout
    assert "3 cases: 1 passed, 2 failed" in run.stdout
    assert "rule coverage: 1 of 11 rules fired (9%)" in run.stdout
    assert "  R02             0 cases   <- no case fires this rule" in run.stdout


def test_test_refuses_bad_case_files_and_rows(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text('{"row": {}, "expect": "deny"}\n{"row": [1]}\n')
    run = cli("test", str(POLICY), "--cases", str(cases))
    assert run.returncode == 2 and f"{cases}:2: a case is an object with a \"row\" object" in run.stdout
    cases.write_text('{"row": {}, "expect": "deny"}\n{oops\n')
    run = cli("test", str(POLICY), "--cases", str(cases))
    assert run.returncode == 2 and f"{cases}:2: not JSON" in run.stdout
    cases.write_text('{"name": "no model outputs", "row": {"claim_amount": 10}, "expect": "deny"}\n')
    run = cli("test", str(POLICY), "--cases", str(cases))
    assert run.returncode == 1
    assert "case 'no model outputs': the row does not fit the policy: field 'confidence': is a model output" \
        in run.stdout


def test_test_with_a_broken_policy_runs_nothing(tmp_path):
    broken = tmp_path / "policy.toml"
    broken.write_text(POLICY.read_text().replace('hit_policy = "FIRST"', 'hit_policy = "FIRSTS"'))
    run = cli("test", str(broken), "--cases", str(CASES))
    assert run.returncode == 2
    assert f"{broken}:" in run.stdout and "policy.hit_policy" in run.stdout and "no cases run" in run.stdout
