"""``aios-kernel review|task|pipelines ...`` against a real kernel process serving the claims demo.

The commands run in this process (``kernel.cli.main``) to keep the test
quick; what they talk to is the real server over gRPC, as from a terminal.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from claims_support import copy_pipelines
from kernel.cli import main
from kernel.testing.processes import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
# A claim the demo policy sends to a person (R04: a large claim) and one it decides alone (R08).
LARGE_CLAIM = ["--field", "claim_amount=90000", "--field", "customer_tier=gold"]
SMALL_CLAIM = ["--field", "claim_amount=800", "--field", "customer_tier=gold", "--field", "fraud_score=0.05",
               "--field", "has_police_report=true", "--field", "policy_age_months=40"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    from examples.claims import build_models

    models = tmp_path_factory.mktemp("cli-models")
    build_models.build(models, models=build_models.MODELS[:1], log=lambda line: None)
    pipelines = copy_pipelines(tmp_path_factory.mktemp("cli-pipelines"))  # uploads write into it
    server = ServeProcess(models, "--pipelines", str(pipelines), data_dir=tmp_path_factory.mktemp("cli-data"))
    yield server
    code, err = server.stop()
    assert code == 0, err


@pytest.fixture
def cli(kernel, capsys):
    """``cli("review", "list")`` -> (exit code, stdout, stderr), against the test's kernel."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--address", kernel.address])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def escalate(cli, *extra: str) -> str:
    code, out, err = cli("decide", "claims_triage", *LARGE_CLAIM, *extra, "--json")
    assert code == 0, err
    decision = json.loads(out)
    assert decision["outcome"] == "ESCALATED"
    return decision["review_id"]


def test_a_reviewer_lists_shows_claims_and_resolves_a_case(cli):
    review_id = escalate(cli, "--text", "description=water in the basement", "--tenant", "acme")

    code, out, _ = cli("review", "list", "--tenant", "acme")
    line = next(line for line in out.splitlines() if line.startswith(review_id))
    assert code == 0 and "OPEN" in line and "claims_triage" in line and "due in" in line
    code, out, _ = cli("review", "list", "--tenant", "acme", "--state", "resolved")
    assert code == 0 and review_id not in out and out.startswith("0 reviews")

    code, out, _ = cli("review", "show", review_id)
    assert code == 0
    assert "claim_amount = 90000" in out and '"water in the basement"' in out  # the case as the pipeline saw it
    assert "rule R04" in out and "actions:    approve, deny, request_info" in out

    code, _, err = cli("review", "resolve", review_id, "--reviewer", "bob", "--action", "deny")
    assert code == 1 and err.startswith("FAILED_PRECONDITION:") and "ClaimReview" in err  # not claimed yet
    code, out, _ = cli("review", "claim", review_id, "--reviewer", "alice", "--lease", "60")
    assert code == 0 and "CLAIMED" in out.splitlines()[0] and "claimed by  alice until" in out
    code, _, err = cli("review", "claim", review_id, "--reviewer", "bob")
    assert code == 1 and "claimed by alice" in err
    code, _, err = cli("review", "resolve", review_id, "--reviewer", "alice", "--action", "shrug")
    assert code == 1 and err.startswith("INVALID_ARGUMENT:") and "allowed: approve, deny, request_info" in err
    code, out, _ = cli("review", "resolve", review_id, "--reviewer", "alice", "--action", "deny",
                       "--comment", "no photos of the damage")
    assert code == 0 and "RESOLVED" in out.splitlines()[0]
    assert "resolved:   deny by alice" in out and "comment: no photos of the damage" in out and "recorded as audit #" in out

    code, out, _ = cli("review", "list", "--tenant", "acme", "--state", "all", "--json")
    (stored,) = [json.loads(line) for line in out.splitlines()]
    assert (stored["review_id"], stored["state"], stored["resolved_action"]) == (review_id, "RESOLVED", "deny")
    code, _, err = cli("review", "show", "no-such-review")
    assert code == 1 and err.startswith("NOT_FOUND:")


def test_review_show_gives_the_models_score_for_each_class(cli):
    review_id = escalate(cli, "--tenant", "scores")
    code, out, _ = cli("review", "show", review_id, "--json")
    scores = json.loads(out)["proposed"]["model"]["class_scores"]
    assert code == 0 and set(scores) == {"approve", "review", "deny"}
    code, out, _ = cli("review", "show", review_id)
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    assert code == 0
    assert "scores: " + ", ".join(f"{label} {score:.3f}" for label, score in ranked) in out, out


def test_review_show_marks_the_defaults_the_decision_used(cli):
    review_id = escalate(cli, "--tenant", "defaults")  # claim_amount and customer_tier sent; six fields left out
    code, out, _ = cli("review", "show", review_id)
    assert code == 0
    assert "    customer_tier = \"gold\"\n" in out  # sent
    assert "    fraud_score = 0.21  (default: not in the request)" in out, out  # the pipeline's default, used
    assert out.count("(default: not in the request)") == 6


def test_review_list_pages_up_to_its_limit_and_says_more_match(cli):
    ids = [escalate(cli, "--tenant", "paging") for _ in range(3)]
    code, out, _ = cli("review", "list", "--tenant", "paging", "--limit", "2")
    shown = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert code == 0 and shown == ids[:2]  # oldest first
    assert out.splitlines()[-1].startswith("2 reviews (2 open) shown; more match")
    code, out, _ = cli("review", "list", "--tenant", "paging", "--limit", "0")
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ids and "more match" not in out


def test_a_json_list_cut_at_its_limit_says_so_on_stderr(cli):
    """`--json` printed the first --limit (50 by default) reviews or tasks and nothing else: a script reading the
    lines took them for all there were. The lines stay one message each; stderr says more match."""
    ids = [escalate(cli, "--tenant", "paging-json") for _ in range(3)]
    code, out, err = cli("review", "list", "--tenant", "paging-json", "--limit", "2", "--json")
    assert code == 0 and [json.loads(line)["review_id"] for line in out.splitlines()] == ids[:2]
    assert err.strip() == "2 reviews shown; more match (raise --limit, 0 = all)"
    code, out, err = cli("review", "list", "--tenant", "paging-json", "--limit", "0", "--json")
    assert code == 0 and [json.loads(line)["review_id"] for line in out.splitlines()] == ids and err == ""
    started = [json.loads(cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "paging-json",
                              "--json")[1])["task_id"] for _ in range(2)]
    code, out, err = cli("task", "list", "--tenant", "paging-json", "--state", "all", "--limit", "1", "--json")
    assert code == 0 and [json.loads(line)["task_id"] for line in out.splitlines()] == started[:1]
    assert err.strip() == "1 task shown; more match (raise --limit, 0 = all)"


def test_review_claim_next_takes_the_oldest_open_case(cli):
    first, second = escalate(cli, "--tenant", "next-desk"), escalate(cli, "--tenant", "next-desk")
    code, out, err = cli("review", "claim", "--next", "--reviewer", "alice", "--tenant", "next-desk", "--lease", "60")
    assert code == 0, err
    assert out.startswith(f"review {first}  CLAIMED") and "claimed by  alice until" in out
    code, out, err = cli("review", "claim", "--next", "--reviewer", "bob", "--tenant", "next-desk",
                         "--pipeline", "claims_triage", "--json")
    assert code == 0 and (json.loads(out)["review_id"], json.loads(out)["claimed_by"]) == (second, "bob"), err
    code, _, err = cli("review", "claim", "--next", "--reviewer", "bob", "--tenant", "next-desk")
    assert code == 1 and err.startswith("NOT_FOUND: no open review to claim (filters: pipeline any, "
                                        "tenant 'next-desk')"), err


def test_review_watch_prints_waiting_cases_and_stops_at_its_count(cli):
    review_id = escalate(cli, "--tenant", "watch")
    code, out, _ = cli("review", "watch", "--tenant", "watch", "--include-open", "--count", "1", "--json",
                       "--timeout", "20")
    assert code == 0 and json.loads(out)["review_id"] == review_id


def test_a_task_waits_for_its_review_and_ends_with_the_reviewers_action(cli):
    code, out, err = cli("task", "start", "claims_triage", *SMALL_CLAIM, "--wait")
    assert code == 0, err
    assert "SUCCEEDED" in out and "fast_track  (AUTOMATED" in out  # followed to the end, decision printed

    code, out, _ = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "tasks",
                       "--idempotency-key", "claim-7781", "--json")
    task = json.loads(out)
    assert code == 0 and task["request"]["idempotency_key"] == "claim-7781"
    code, out, _ = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "tasks",
                       "--idempotency-key", "claim-7781", "--json")
    assert json.loads(out)["task_id"] == task["task_id"]  # the same key and request: the same task

    code, out, _ = cli("review", "watch", "--tenant", "tasks", "--include-open", "--count", "1", "--json",
                       "--timeout", "20")
    review = json.loads(out)
    assert review["task_id"] == task["task_id"]
    code, out, _ = cli("task", "get", task["task_id"])
    assert code == 0 and "WAITING_FOR_REVIEW" in out.splitlines()[0] and f"review      {review['review_id']}" in out

    assert cli("review", "claim", review["review_id"], "--reviewer", "carol")[0] == 0
    assert cli("review", "resolve", review["review_id"], "--reviewer", "carol", "--action", "approve")[0] == 0
    code, out, _ = cli("task", "watch", task["task_id"], "--timeout", "20")
    assert code == 0 and "SUCCEEDED" in out and "approve  (REVIEWED" in out and "decided by carol" in out

    code, _, err = cli("task", "cancel", task["task_id"])
    assert code == 1 and err.startswith("FAILED_PRECONDITION:") and "already SUCCEEDED" in err

    # The tour's command run again: the key's task is followed, and says it was started before.
    code, out, _ = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "tasks",
                       "--idempotency-key", "claim-7781", "--wait")
    assert code == 0 and out.startswith(f"task {task['task_id']} was already started with idempotency key "
                                        "'claim-7781'") and "SUCCEEDED" in out


def test_task_commands_name_what_is_wrong(cli):
    code, _, err = cli("task", "start", "claims_triage", "--field", "claim_amount")
    assert code == 2 and "--field 'claim_amount': expected NAME=VALUE" in err
    code, _, err = cli("task", "start", "no_such_pipeline")
    assert code == 1 and err.startswith("NOT_FOUND:")
    code, _, err = cli("task", "get", "no-such-task")
    assert code == 1 and err.startswith("NOT_FOUND:")


def test_task_list_shows_a_tenants_unfinished_tasks_by_default(cli):
    """(A workflow engine's audit: an operator could not find stuck tasks.) `task list`: those not final yet by
    default, oldest first; --state picks others; --json one Task per line."""
    ids = []
    for _ in range(2):
        code, out, _ = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "listing", "--json")
        ids.append(json.loads(out)["task_id"])
    for task_id in ids:  # (each waits for its review: not final)
        assert cli("task", "watch", task_id, "--timeout", "1")[0] == 3
    code, out, err = cli("task", "list", "--tenant", "listing")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("TASK") and [line.split()[0] for line in lines[1:3]] == ids
    assert all("WAITING_FOR_REVIEW" in line and "claims_triage" in line for line in lines[1:3])
    assert lines[-1] == "2 tasks (2 WAITING_FOR_REVIEW)"
    code, out, _ = cli("task", "list", "--tenant", "listing", "--limit", "1")
    assert out.splitlines()[-1] == "1 task (1 WAITING_FOR_REVIEW) shown; more match (raise --limit, 0 = all)"
    code, out, _ = cli("task", "list", "--tenant", "listing", "--state", "succeeded", "--state", "failed")
    assert code == 0 and out.strip() == "0 tasks"
    code, out, _ = cli("task", "list", "--tenant", "nobody")  # (the default filter, said when it shows none)
    assert code == 0 and out.strip() == "0 tasks not final yet (--state all lists finished ones too)"
    code, out, _ = cli("task", "list", "--tenant", "listing", "--state", "all", "--json")
    assert [json.loads(line)["task_id"] for line in out.splitlines()] == ids


def test_a_cancelled_task_watch_exits_1_and_its_review_shows_as_withdrawn(cli):
    code, out, _ = cli("task", "start", "claims_triage", *LARGE_CLAIM, "--tenant", "cancel", "--json")
    task_id = json.loads(out)["task_id"]
    code, out, err = cli("task", "watch", task_id, "--timeout", "1")  # it waits for a review: still going
    assert code == 3 and "WAITING_FOR_REVIEW" in out and f"task {task_id} goes on in the kernel" in err
    code, out, _ = cli("task", "get", task_id, "--json")
    review_id = json.loads(out)["review_id"]
    code, out, _ = cli("task", "cancel", task_id)
    assert code == 0 and "CANCELLED" in out.splitlines()[0]
    code, out, _ = cli("task", "watch", task_id, "--timeout", "20")
    assert code == 1 and "CANCELLED" in out
    code, out, _ = cli("review", "show", review_id)
    assert "withdrawn by the kernel" in out and "resolved:" not in out and "waits on this review" not in out


def test_a_repeated_idempotent_decision_says_it_was_replayed(cli):
    first = cli("decide", "claims_triage", *SMALL_CLAIM, "--idempotency-key", "cli-replay")
    again = cli("decide", "claims_triage", *SMALL_CLAIM, "--idempotency-key", "cli-replay")
    assert first[0] == again[0] == 0 and "replayed" not in first[1]
    assert "replayed: the answer first given for this idempotency key" in again[1].splitlines()[0]


@pytest.mark.parametrize("args, needle", [
    (["decide", "claims_triage", "--field", "claim_amount=1", "--field", "claim_amount=2"], "claim_amount is given twice"),
    # (a pipeline author's walk-through: protobuf's "Value out of range: …" named no field; null went as 'null')
    (["decide", "claims_triage", "--field", "prior_claims=9223372036854775808"],
     "--field 'prior_claims': 9223372036854775808 does not fit a 64-bit integer"),
    (["task", "start", "claims_triage", "--field", "customer_tier=null"], "a field has no null"),
    # bytes that are not UTF-8 from the shell (kept as surrogates): a traceback from protobuf before
    (["review", "resolve", "r1", "--reviewer", "b\udcffob", "--action", "approve"],
     "an argument is not valid UTF-8 text: 'b\\\\xffob'"),
    (["task", "get", "t\udcff"], "an argument is not valid UTF-8 text"),
    (["decide", "claims_triage", "--timeout", "0"], "--timeout: '0': must be more than 0"),
    (["review", "claim", "r1", "--reviewer", "bob", "--lease", "-5"], "--lease: '-5': must be 0 (the kernel's 300) to 86400"),
    # past a uint32 the request could not be built: a traceback, not a refusal
    (["review", "claim", "r1", "--reviewer", "bob", "--lease", "5000000000"], "--lease: '5000000000': must be 0 (the"),
    (["review", "claim", "--next", "--reviewer", "bob", "--lease", "86401"], "--lease: '86401': must be 0 (the kernel's"),
    (["review", "show", ""], "review_id: must not be empty"),
    (["review", "claim", "r1", "--next", "--reviewer", "bob"], "give a REVIEW_ID (r1) or --next, not both"),
    (["review", "claim", "--reviewer", "bob"], "give the REVIEW_ID to claim, or --next"),
    (["review", "claim", "r1", "--tenant", "acme", "--reviewer", "bob"], "use them with --next"),
    (["task", "get", " "], "task_id: must not be empty"),
    (["review", "watch", "--count", "-1"], "--count: '-1': must be 0 (no limit) or more"),
    (["review", "list", "--limit", "-1"], "--limit: '-1': must be 0 (no limit) or more"),
    # a stray word is refused with the command's own usage, not the top-level one
    (["decide", "claims_triage", "extra"], "usage: aios-kernel decide [-h]"),
    (["review", "list", "extra"], "aios-kernel review list: error: unrecognized arguments: extra"),
])
def test_command_line_mistakes_exit_2_before_calling_the_kernel(cli, capsys, args, needle):
    try:
        code, _, err = cli(*args)
    except SystemExit as exc:  # argparse's own refusal
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and needle in err, err


def test_pipelines_list_and_an_upload_refused_then_accepted(cli, tmp_path):
    code, out, _ = cli("pipelines", "list")
    lines = out.splitlines()
    (line,) = [line for line in lines if line.startswith("claims_triage ")]
    assert code == 0 and "model claims_triage" in line and lines[-1] == "1 pipeline serving"
    counts = lines[lines.index(line) + 1]  # what it decided, by outcome (ListPipelines' counters)
    assert counts.startswith("  decided ") and " automated, " in counts and "failed" in counts, counts
    running_hash = line.split()[2]

    original = (ROOT / "examples" / "claims" / "pipelines" / "claims_triage.toml").read_text(encoding="utf-8")
    assert "min_confidence = 0.6" in original, "the demo pipeline changed; update this test's edit"
    broken = tmp_path / "claims_triage.toml"
    broken.write_text(original.replace("min_confidence = 0.6", 'min_confidence = "high"'), encoding="utf-8")
    code, _, err = cli("pipelines", "upload", str(broken))
    assert code == 1 and err.startswith("INVALID_ARGUMENT: refused, the running version keeps serving")
    assert f"{broken}:" in err and "[escalation].min_confidence" in err  # names the user's file, line and field
    assert running_hash in cli("pipelines", "list")[1]  # still serving what it served

    changed = tmp_path / "changed.toml"
    changed.write_text(original.replace("min_confidence = 0.6", "min_confidence = 0.85"), encoding="utf-8")
    code, out, _ = cli("pipelines", "upload", str(changed), "--json")
    info = json.loads(out)
    assert code == 0 and info["name"] == "claims_triage" and info["hash"][:12] != running_hash
    # Changed under its old version label: the caller is told, not only the kernel's log (an operator walk-through).
    assert "but still declares version '2026-11-25.1'" in info["warnings"][0]
    assert info["hash"][:12] in cli("pipelines", "list")[1]
    code, _, err = cli("pipelines", "upload", str(tmp_path / "missing.toml"))
    assert code == 2 and "cannot read" in err and "missing.toml" in err
    restore = tmp_path / "original.toml"  # the module's other tests decide with the demo's threshold
    restore.write_text(original, encoding="utf-8")
    assert cli("pipelines", "upload", str(restore))[0] == 0


def test_a_pipeline_whose_model_is_unloaded_is_listed_as_unable_to_decide(claims_models, tmp_path):
    """(Operator walk-through) after `models unload`, `pipelines list` showed the pipeline serving as before, while
    every Decide answered UNAVAILABLE."""
    import subprocess
    import sys

    import grpc

    from conftest import start_claims_kernel
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel._proto.inference import grpc_service_pb2 as ipb
    from kernel._proto.inference import grpc_service_pb2_grpc as ipb_grpc

    server = start_claims_kernel(claims_models, tmp_path)
    try:
        address = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(address) as channel:
            admin = kgrpc.AdminServiceStub(channel)
            (info,) = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).pipelines
            assert info.unavailable_reason == ""
            ipb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                ipb.RepositoryModelUnloadRequest(model_name="claims_triage"), timeout=30)
            (info,) = admin.ListPipelines(kpb.ListPipelinesRequest(), timeout=10).pipelines
            assert info.unavailable_reason.startswith("model claims_triage version 1 is not loaded")
        listed = subprocess.run([sys.executable, "-m", "kernel", "pipelines", "list", "--address", address],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert listed.returncode == 0, listed.stderr
        assert "  cannot decide now: model claims_triage version 1 is not loaded" in listed.stdout
        assert listed.stdout.splitlines()[-1] == "1 pipeline serving; 1 of them cannot decide now (model not loaded)"
    finally:
        server.stop(grace=1)


def test_a_task_watch_cut_by_a_stopping_kernel_exits_3_not_1(claims_models, tmp_path):
    """(A workflow engine's audit) `task watch` exited 1 both when the task FAILED and when the kernel's stop ended
    the watch: a script could not tell "give up" from "watch again". A watch cut before the task is final is 3."""
    import subprocess
    import sys

    server = ServeProcess(claims_models, "--pipelines", str(copy_pipelines(tmp_path / "pipelines")),
                          data_dir=tmp_path / "data")
    watcher = None
    try:
        started = subprocess.run([sys.executable, "-m", "kernel", "task", "start", "claims_triage", *LARGE_CLAIM,
                                  "--json", "--address", server.address], capture_output=True, text=True, timeout=60,
                                 cwd=ROOT)
        task_id = json.loads(started.stdout)["task_id"]
        watcher = subprocess.Popen([sys.executable, "-m", "kernel", "task", "watch", task_id, "--address",
                                    server.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=ROOT)
        while "WAITING_FOR_REVIEW" not in (line := watcher.stdout.readline()):  # (watching: the stop cuts it)
            assert line, watcher.stderr.read()
    finally:
        code, log = server.stop()
    out, err = watcher.communicate(timeout=60)
    assert code == 0, log
    assert watcher.returncode == 3, (out, err)
    assert "UNAVAILABLE: the kernel is shutting down" in err
    assert f"the watch ended before task {task_id} was final; it goes on in the kernel: watch it again" in err


def test_a_refused_uploaded_policy_is_named_by_the_users_own_path(cli, tmp_path):
    """(Operator walk-through) the error named the policy by the file name the pipeline gives it (my_policy.toml),
    not the file the user passed with --policy."""
    original = (ROOT / "examples" / "claims" / "pipelines" / "claims_triage.toml").read_text(encoding="utf-8")
    pipeline = tmp_path / "my_pipeline.toml"
    pipeline.write_text(original.replace('name = "claims_triage"', 'name = "my_pipeline"', 1)
                        .replace('file = "policy.toml"', 'file = "my_policy.toml"'), encoding="utf-8")
    policy = tmp_path / "drafts" / "bad_policy.toml"
    policy.parent.mkdir()
    policy.write_text((ROOT / "examples" / "claims" / "pipelines" / "policy.toml").read_text(encoding="utf-8")
                      .replace('hit_policy = "FIRST"', 'hit_policy = "SOMETIMES"'), encoding="utf-8")
    code, _, err = cli("pipelines", "upload", str(pipeline), "--policy", str(policy))
    assert code == 1 and f"{policy}:" in err and "my_policy.toml:" not in err, err
    assert "hit_policy" in err


def test_a_name_cut_to_its_column_says_so():
    from kernel.review.cli import _cut

    assert _cut("claims_triage", 16) == "claims_triage   "
    assert _cut("invoice_approval_emea", 16) == "invoice_approva…"


def test_review_show_says_a_text_the_reopened_review_no_longer_has():
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.review.cli import describe

    review = kpb.Review(review_id="r1", state="OPEN", pipeline="claims_triage", actions=["deny"],
                        text_digests={"description": "sha256:ab12"})
    review.request.fields["claim_amount"].int_value = 90000
    shown = "\n".join(describe(review))
    assert "    description (text): not kept; this review was reopened from the audit log after a crash, which has " \
           "only its digest sha256:ab12" in shown, shown


def test_a_tasks_history_gives_each_step_its_date_and_zone(cli, monkeypatch):
    """(Time audit) ``task get`` and ``task watch`` printed each step as a bare ``22:10:05``: neither the day of a
    step days back (a task waiting for a review) nor the zone (the kernel's messages give times in UTC)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        code, out, _ = cli("task", "start", "claims_triage", *SMALL_CLAIM, "--tenant", "zones", "--wait")
        assert code == 0 and "SUCCEEDED" in out
        task_id = out.split()[1]
        code, shown, _ = cli("task", "get", task_id)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    stamped = re.compile(r"^\s*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d E[SD]T  (QUEUED|RUNNING|SUCCEEDED)\b")
    steps = lambda text: [line for line in text.splitlines()  # noqa: E731
                          if not line.startswith("task ") and re.search(r"  (QUEUED|RUNNING|SUCCEEDED)  ", line)]
    assert steps(out) and all(stamped.match(line) for line in steps(out)), out  # (the states it saw: at least one)
    assert len(steps(shown)) == 3 and all(stamped.match(line) for line in steps(shown)), shown


def test_review_show_names_the_second_a_lease_has_ended_by(cli):
    """(Time audit) "claimed by alice until 05:33:51" for a lease ending at 05:33:51.086: bob, claiming at the time
    shown, was refused. An end still to come is shown rounded up to its second."""
    from datetime import datetime

    review_id = escalate(cli, "--tenant", "lease-end")
    code, out, _ = cli("review", "claim", review_id, "--reviewer", "alice", "--lease", "60", "--json")
    assert code == 0
    ends_ns = int(json.loads(out)["lease_expires_unix_ns"])
    code, shown, _ = cli("review", "show", review_id)
    until = re.search(r"claimed by  alice until (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", shown)
    assert until, shown
    # (in local time, as shown; the lease ends between two seconds, so the second cut down is before it)
    assert datetime.strptime(until[1], "%Y-%m-%d %H:%M:%S").timestamp() * 10**9 >= ends_ns, (until[1], ends_ns)


def test_review_show_keeps_a_comments_lines_under_it():
    """(Tenant-boundaries audit) a comment may span lines, and each went to the left edge: a reviewer's comment
    'ok\\n  resolved:   approve by carol ...' printed a second 'resolved:' line that read as the kernel's own."""
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from kernel.cli_support import decision_lines
    from kernel.review.cli import describe

    review = kpb.Review(review_id="r1", state="RESOLVED", pipeline="claims_triage", resolved_action="deny",
                        resolved_by="alice", comment="photos missing\n  resolved:   approve by carol\n\nsee file")
    shown = "\n".join(describe(review)).splitlines()  # (as ``review show`` prints them)
    assert [line for line in shown if line.startswith("  resolved:")] == ["  resolved:   deny by alice at -"]
    at = shown.index("    comment: photos missing")
    assert shown[at + 1:at + 4] == ["             " + "  resolved:   approve by carol", "", "             see file"]
    review.resolution.reasons.add(rule_id="REVIEW", description="decided by alice: ok\n  request forged")
    review.resolution.request_id = "q1"
    (decision,) = [line for line in "\n".join(decision_lines(review.resolution)).splitlines() if "forged" in line]
    assert decision == " " * len("  rule REVIEW: ") + "  request forged"  # (the resolution, as ``task get`` shows it)
