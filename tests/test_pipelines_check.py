"""``aios-kernel pipelines check``: a pipeline file, its policy and its model checked as a kernel's load checks them,
with no kernel running (a pipeline author's walk-through: binding errors showed only against a running kernel)."""

from __future__ import annotations

import pytest

from claims_support import CLAIMS, copy_pipelines, faulty_claims_model
from kernel.cli import main


@pytest.fixture
def folder(tmp_path):
    return copy_pipelines(tmp_path / "pipelines")


def check(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["pipelines", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_pipeline_the_kernel_would_serve_passes(claims_models, folder, capsys):
    code, out, err = check(capsys, str(folder / "claims_triage.toml"), "--models", str(claims_models))
    assert code == 0 and err == "", err
    assert "pipeline claims_triage '2026-11-25.1'" in out and "model claims_triage version 1" in out
    assert out.strip().endswith("a kernel would serve it")


def test_a_binding_error_names_the_line_as_a_load_does(claims_models, folder, capsys):
    path = folder / "claims_triage.toml"
    path.write_text(path.read_text().replace('input = "features"', 'input = "feats"', 1))
    code, out, err = check(capsys, str(path), "--models", str(claims_models))
    assert code == 1 and out == ""
    assert err.startswith(f"refused: {path}:") and "[model].input: model 'claims_triage' has no input 'feats'" in err


def test_a_policy_given_apart_is_checked_with_it(claims_models, folder, tmp_path, capsys):
    policy = tmp_path / "candidate.toml"
    policy.write_text((CLAIMS / "policy.toml").read_text().replace("label in {'review', 'deny'}",
                                                                   "label in {'review', 'fraud'}", 1))
    code, _, err = check(capsys, str(folder / "claims_triage.toml"), "--policy", str(policy),
                         "--models", str(claims_models))
    assert code == 1 and f"{policy}:" in err and "'fraud' is not one of the model's classes" in err
    policy.write_text(policy.read_text().replace('[model]\nclasses = ["approve", "review", "deny"]\n', "", 1))
    code, out, err = check(capsys, str(folder / "claims_triage.toml"), "--policy", str(policy),
                           "--models", str(claims_models))
    assert code == 0 and "compares label with 'fraud'" in err and "a kernel would serve it" in out


def test_a_model_missing_from_the_repository_is_named(claims_models, folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = check(capsys, str(folder / "claims_triage.toml"), "--models", str(tmp_path / "empty"))
    assert code == 1 and "model 'claims_triage'" in err and "no such model folder" in err
    code, _, err = check(capsys, str(folder / "claims_triage.toml"), "--models", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err


def test_what_a_load_warns_about_is_said_too(claims_models, folder, tmp_path, capsys):
    faulty_claims_model(claims_models / "claims_triage" / "1", tmp_path / "logits" / "claims_triage" / "1",
                        fault="logits")
    code, out, err = check(capsys, str(folder / "claims_triage.toml"), "--models", str(tmp_path / "logits"))
    assert code == 0 and "a kernel would serve it" in out
    assert err.startswith("warning: pipeline claims_triage: output 'probabilities'") and "not probabilities" in err


def test_an_answer_is_printed_on_a_terminal_that_takes_ascii_only(claims_models, folder):
    """A review: an answer with a non-ASCII character printed to an ASCII-only stdout was blamed on the arguments
    ("not valid UTF-8 text", exit 2) — after a decision it printed had been made and recorded."""
    import os
    import subprocess
    import sys

    path = folder / "claims_triage.toml"
    path.write_text(path.read_text().replace('version = "2026-11-25.1"', 'version = "2026-11-25.1-prüfung"', 1))
    done = subprocess.run([sys.executable, "-m", "kernel", "pipelines", "check", str(path), "--models",
                           str(claims_models)], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert b"'2026-11-25.1-pr\\xfcfung'" in done.stdout and b"a kernel would serve it" in done.stdout


def test_the_policys_own_warnings_are_said_too(claims_models, folder, capsys):
    """(A docs check: a rule id the kernel uses was warned about by `policy check` but not by `pipelines check`, an
    upload's answer or the log.)"""
    policy = folder / "policy.toml"
    policy.write_text(policy.read_text().replace('id = "R01"', 'id = "FALLBACK"', 1))
    code, out, err = check(capsys, str(folder / "claims_triage.toml"), "--models", str(claims_models))
    assert code == 0 and "a kernel would serve it" in out
    assert "rule 'FALLBACK' id: is an id the kernel gives reasons of its own" in err


def test_a_file_that_cannot_be_read_could_not_be_checked_exit_2(claims_models, folder, tmp_path, capsys):
    """(Docs audit) docs/operations.md: "exit 1 means it would be refused, 2 that it could not be checked" (as
    policy check's exit 2 for no such file). A misspelt path was exit 1, "refused: PATH:0: cannot read", which a
    script gating an upgrade read as a pipeline the new kernel would refuse."""
    for missing in (tmp_path / "nowhere.toml", tmp_path):
        code, out, err = check(capsys, str(missing), "--models", str(claims_models))
        assert (code, out) == (2, ""), err
        assert err.startswith(f"{missing}: cannot read") and "refused" not in err, err
    code, out, err = check(capsys, str(folder / "claims_triage.toml"), "--policy", str(tmp_path / "nowhere.toml"),
                           "--models", str(claims_models))
    assert (code, out) == (2, "") and err.startswith(f"{tmp_path / 'nowhere.toml'}: cannot read"), err
    # a policy file the pipeline itself names but that is not there is the pipeline's fault: a load refuses it
    (folder / "policy.toml").unlink()
    code, _, err = check(capsys, str(folder / "claims_triage.toml"), "--models", str(claims_models))
    assert code == 1 and err.startswith("refused:"), err
