"""`aios-kernel policy check` and `aios-kernel policy test`, run as the real command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    run = cli("check", str(tmp_path))  # (a CLI audit: a folder was "no such file")
    assert run.returncode == 2 and f"{tmp_path}: cannot read: a directory, not a policy file" in run.stderr


def test_check_of_a_pipeline_file_names_its_policy_in_one_line():
    """(Operator walk-through) checked as a policy, the pipeline file gave 17 errors, one of them at line 0."""
    pipeline = POLICY.parent / "claims_triage.toml"
    run = cli("check", str(pipeline))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == (f"{pipeline}: a pipeline file, not a policy; its policy is {POLICY}: `aios-kernel "
                                  f"policy check {POLICY}` (a pipeline is checked by `aios-kernel pipelines check "
                                  f"{pipeline}`, and when a kernel loads it)")


def test_toml_cut_off_at_its_end_is_reported_at_its_last_line(tmp_path):
    # (A CLI audit: tomllib gives no line for an error at the end of the document, printed as FILE:0.)
    broken = tmp_path / "cut.toml"
    broken.write_text('name = "p"\nrules = [\n')
    run = cli("check", str(broken))
    assert run.returncode == 1 and run.stdout.startswith(f"{broken}:2: TOML: ")


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
    inputs = {k: v for k, v in good_case()["row"].items() if k not in ("label", "confidence") and "." not in k}
    cases.write_text(json.dumps({"name": "no model outputs", "row": inputs, "expect": "deny"}) + "\n")
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


# -- mistakes in the cases file: refused before any case runs, FILE:LINE, exit 2
def run_test_command(cases_path: Path) -> tuple[int, str]:
    from kernel.policy import cli as policy_cli  # (a module, so pytest does not collect its test_command)

    out = io.StringIO()
    code = policy_cli.test_command(POLICY, cases_path, out)
    return code, out.getvalue()


def good_case() -> dict:
    return json.loads(CASES.read_text().splitlines()[2])  # R01 fires: deny, not escalated


@pytest.mark.parametrize("change, message", [
    (lambda c: c["expect"].update(escalate="false"), '"escalate" must be true or false, not "false"'),
    (lambda c: c["expect"].update(escalate=0), '"escalate" must be true or false, not 0'),
    (lambda c: c["expect"].update(fired="R01"), '"fired" must be a list of rule ids, as in ["R1"], not "R01"'),
    (lambda c: c["expect"].update(fired=["R01", "r01"]),
     "\"fired\" names a rule the policy does not have: 'r01'; did you mean 'R01'?"),
    (lambda c: c["expect"].update(fired=["R98", "R99"]),
     "\"fired\" names rules the policy does not have: 'R98', 'R99'"),
    (lambda c: c.update(fired=["R01"]),
     "unknown key 'fired' in the case; it belongs inside \"expect\" (allowed: name, row, expect)"),
    (lambda c: c.update(expected=c.pop("expect")),
     "unknown key 'expected' in the case; did you mean 'expect'? (allowed: name, row, expect)"),
    (lambda c: c["expect"].update(escalated=False),
     "unknown key 'escalated' in \"expect\"; did you mean 'escalate'? (allowed: action, fired, escalate, adjust)"),
    # rows the kernel would refuse are refused here too (a pipeline author's walk-through: 1 passed as true, and a
    # label the model never answers passed)
    (lambda c: c["row"].update(has_police_report=1),
     "row 'has_police_report' is 1, but the policy reads it as a bool: write true or false"),
    (lambda c: c["row"].update(label="fraud"),
     "row 'label' is \"fraud\", not one of the policy's classes (approve, review, deny): the model never answers it"),
    (lambda c: c["expect"].update(adjust="0.3"), '"adjust" must be a number, not "0.3"'),
    (lambda c: c["row"].update(claim_amount=True),  # JSON's true passed as the number 1; the kernel refuses it
     "row 'claim_amount' is true, but the policy reads it as a number: the kernel refuses a boolean there"),
    # JSON as Python reads it takes NaN (read here as a missing value) and Infinity (a number): a case passed with
    # fraud_score NaN, decided as missing, where the kernel refuses the request ("must be a finite number")
    (lambda c: c["row"].update(fraud_score=float("nan")),
     "row 'fraud_score' is NaN, but the kernel refuses a number that is not finite there"),
    (lambda c: c["row"].update(claim_amount=float("-inf")),
     "row 'claim_amount' is -Infinity, but the kernel refuses a number that is not finite there"),
    (lambda c: c["expect"].update(action="aprove"),
     "action 'aprove' is not one of the policy's actions (deny, review, approve, fast_track); did you mean 'approve'?"),
])
def test_test_refuses_malformed_cases_with_file_and_line(tmp_path, change, message):
    cases = tmp_path / "cases.jsonl"
    case = good_case()
    change(case)
    cases.write_text("# one good case, then the bad one\n" + json.dumps(good_case()) + "\n" + json.dumps(case) + "\n")
    code, out = run_test_command(cases)
    assert code == 2, out
    assert out.startswith(f"{cases}:3: {message}") and len(out.splitlines()) == 1, out  # nothing ran


def test_test_lists_every_bad_case_and_passes_good_escalate_values(tmp_path):
    cases = tmp_path / "cases.jsonl"
    fine = good_case()
    fine["expect"]["escalate"] = False
    bad = good_case()
    bad["expect"]["escalate"] = "false"  # bool("false") is True: it failed as "expected escalate false, got false"
    cases.write_text("\n".join(json.dumps(c) for c in (fine, bad, bad)) + "\n")
    code, out = run_test_command(cases)
    assert code == 2 and [line.split(": ")[0] for line in out.splitlines()] == [f"{cases}:2", f"{cases}:3"]
    cases.write_text(json.dumps(fine) + "\n")
    assert run_test_command(cases)[0] == 0


def test_test_of_a_cases_file_without_cases_exits_2(tmp_path):
    cases = tmp_path / "cases.jsonl"
    for text in ("", "# only a comment\n\n"):
        cases.write_text(text)
        run = cli("test", str(POLICY), "--cases", str(cases))
        assert run.returncode == 2 and f"no cases in {cases}" in run.stdout, run.stdout
        assert "0 cases" not in run.stdout


def test_check_says_when_the_table_was_not_fully_checked(tmp_path, monkeypatch):
    from kernel.policy import analysis
    from kernel.policy import cli as policy_cli

    # No single field keeps these rules apart (each one allows every tier but one, and every amount below a
    # bound), so the analysis compares every pair: with a small work limit it stops part way.
    path = tmp_path / "policy.toml"
    text = ('[policy]\nname = "combinatorial"\nversion = "1"\nhit_policy = "FIRST"\n[inputs]\namount = "number"\n'
            'tier = "string"\n[outputs]\nactions = ["x", "y"]\n')
    for i in range(60):
        text += f'[[rule]]\nid = "R{i}"\nwhen = "tier != \'t{i}\' and amount < {i}"\naction = "x"\n'
    path.write_text(text + '[[rule]]\nid = "D"\ndefault = true\naction = "y"\n')
    out = io.StringIO()
    assert policy_cli.check_command(path, out) == 0 and f"{path}: OK" in out.getvalue()
    monkeypatch.setattr(analysis, "WORK_LIMIT", 500)
    out = io.StringIO()
    assert policy_cli.check_command(path, out) == 3
    lines = out.getvalue().splitlines()
    assert "warning: rule 'R" in lines[0] and "stopped at its work limit" in lines[0]
    assert lines[1].startswith(f"{path}: NOT fully checked:") and f"{path}: OK" not in out.getvalue()


def test_row_keys_the_policy_does_not_read_are_named_in_a_note_not_refused(tmp_path):
    """A row may be a whole request (pipeline fields the policy does not read): named once, at its first line,
    and the case runs without that value."""
    cases = tmp_path / "cases.jsonl"
    whole_request = dict(good_case(), row=dict(good_case()["row"], claim_id="c-1"))
    cases.write_text("\n".join(json.dumps(c) for c in (whole_request, whole_request)) + "\n")
    code, out = run_test_command(cases)
    lines = out.splitlines()
    assert f"{cases}:1: note: row key 'claim_id' is not read by the policy and is ignored" in lines, out
    assert sum("claim_id" in line for line in lines) == 1, out  # once, not per case
    assert "2 cases: 2 passed" in out and code == 0, out


def test_a_row_leaving_out_an_input_the_policy_reads_is_refused_naming_it(tmp_path):
    """A case leaving out has_police_report passed expecting 'review' (R01 `not has_police_report` is unknown on
    a missing value), while the kernel, filling in the pipeline's default false, decides the same claim 'deny'
    with R01: only a note said so, and the run passed (exit 0). The kernel never decides with an input missing,
    so such a row is refused, naming the input (a typo of it with the key it may be); a row that writes null
    tests a missing value on purpose."""
    case = good_case()
    case["row"].pop("has_police_report")
    case["expect"] = {"action": "review", "fired": ["DEFAULT"]}
    meant = json.loads(json.dumps(case))
    meant["row"]["has_police_report"] = None
    typo = good_case()
    typo["row"]["claim_amuont"] = typo["row"].pop("claim_amount")
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(c) for c in (meant, case, typo)) + "\n")
    code, out = run_test_command(cases)
    assert code == 2 and "passed" not in out, out  # refused before any case runs
    assert out.splitlines() == [
        f"{cases}:2: the row leaves out 'has_police_report', which the policy reads: the kernel never decides with "
        "an input missing (a pipeline fills in the field's default), so write the value the request sends or the "
        "default gives, or null to test a missing value",
        f"{cases}:3: the row leaves out 'claim_amount', which the policy reads (the row has 'claim_amuont'; did you "
        "mean 'claim_amount'?): the kernel never decides with an input missing (a pipeline fills in the field's "
        "default), so write the value the request sends or the default gives, or null to test a missing value"], out
    cases.write_text(json.dumps(meant) + "\n")
    code, out = run_test_command(cases)
    assert code == 0 and "1 case: 1 passed" in out, out


def test_a_case_can_expect_the_score_adjustment(tmp_path):
    """(The same walk-through: `expect` could not assert `adjust`, a documented output.)"""
    case = good_case()  # R01 fires: adjust 0.3
    right, wrong = json.loads(json.dumps(case)), json.loads(json.dumps(case))
    right["expect"]["adjust"], wrong["expect"]["adjust"] = 0.3, 0.5
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps(right) + "\n" + json.dumps(wrong) + "\n")
    code, out = run_test_command(cases)
    assert code == 1 and "expected adjust 0.5, got 0.3" in out and f"{cases}:2" in out, out


def test_test_with_the_pipeline_reads_each_row_as_the_kernel_reads_the_request(tmp_path):
    """`--pipeline`: a row that leaves a field out is decided on the field's default, as the kernel decides the
    request (the demo's fraud_score: 0.21, so R09 approves it), and one the pipeline would refuse (a value past
    a field's max, a null no request can send) fails naming the field, as the request would."""
    pipeline = POLICY.parent / "claims_triage.toml"
    left_out = good_case()
    left_out["row"].pop("fraud_score")
    left_out["row"]["has_police_report"] = True
    right = dict(left_out, name="default decides", expect={"action": "approve", "fired": ["R09"]})
    wrong = dict(left_out, name="as if missing", expect={"action": "review", "fired": ["DEFAULT"]})
    too_big = dict(good_case(), name="too big", row=dict(good_case()["row"], fraud_score=1.5))
    null = dict(good_case(), name="null", row=dict(good_case()["row"], fraud_score=None))
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(c) for c in (right, wrong, too_big, null)) + "\n")
    run = cli("test", str(POLICY), "--cases", str(cases), "--pipeline", str(pipeline))
    assert run.returncode == 1, run.stdout
    lines = run.stdout.splitlines()
    assert not any("'default decides'" in line for line in lines), run.stdout  # it passed
    assert any("'as if missing': expected action 'review', got 'approve'" in line for line in lines), run.stdout
    assert any("'too big': the kernel refuses this request: field 'fraud_score' must be <= 1, got 1.5" in line
               for line in lines), run.stdout
    assert any("'null': the kernel refuses this request: field 'fraud_score' is null" in line for line in lines)
    assert "4 cases: 1 passed, 3 failed" in run.stdout
    run = cli("test", str(POLICY), "--cases", str(CASES), "--pipeline", str(pipeline))
    assert run.returncode == 1 and "case 'no fraud score (missing)" in run.stdout, run.stdout  # null: no request
