"""A review watch resumes across a kill and a restart of the kernel, and `review watch` tells a cut from a refusal.

Real ``aios-kernel serve`` processes on one data directory, the first killed with SIGKILL while a real
``aios-kernel review watch`` subprocess follows it. Review positions (``Review.sequence``) are the store's and
outlive the process, so the watcher resumes with the ``--from`` its exit named and gets exactly the reviews
stored since the last one it printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from claims_support import UNSURE_CASE, claim_request, copy_pipelines
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.cli import main
from kernel.testing.processes import ServeProcess

ROOT = Path(__file__).resolve().parent.parent


def escalate(address: str, tenant: str) -> str:
    with grpc.insecure_channel(address) as channel:
        decided = kgrpc.DecisionServiceStub(channel).Decide(claim_request(UNSURE_CASE, tenant=tenant), timeout=30)
    assert decided.outcome == kpb.ESCALATED and decided.review_id, decided
    return decided.review_id


def watch_once_its_place_is_free(channel, from_sequence: int):
    """A WatchReviews from ``from_sequence`` and its first review, once the kernel's one place for a watch is free
    (a watch the client cancelled holds it until the kernel hears of the cancel)."""
    deadline = time.monotonic() + 30
    while True:
        stream = kgrpc.ReviewServiceStub(channel).WatchReviews(
            kpb.WatchReviewsRequest(tenant="dash", from_sequence=from_sequence), timeout=30)
        try:
            return stream, next(stream)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def test_a_watch_cut_by_a_kill_exits_3_and_resumes_after_the_restart_exactly(claims_models, tmp_path, capsys):
    """`review watch` exited 1 both when the kernel refused the watch and when a crash cut it, and had no way to
    go on from where it stopped: a dashboard's loop could not tell "fix the call" from "watch again", and a watch
    again missed what was escalated meanwhile (or, with --include-open, sent the waiting cases twice)."""
    pipelines, data_dir = copy_pipelines(tmp_path / "pipelines"), tmp_path / "data"
    first = ServeProcess(claims_models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    watcher = subprocess.Popen([sys.executable, "-m", "kernel", "review", "watch", "--tenant", "dash",
                                "--include-open", "--json", "--address", first.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        seen = escalate(first.address, "dash")
        line = watcher.stdout.readline()
        assert line, watcher.stderr.read()
        printed = json.loads(line)
        assert printed["review_id"] == seen
    finally:
        first.kill()  # the crash cuts the watch
    out, err = watcher.communicate(timeout=60)
    resume = int(printed["sequence"]) + 1
    assert watcher.returncode == 3, (out, err)
    assert err.startswith("UNAVAILABLE: "), err
    assert f"the watch ended without a refusal; resume with --from {resume} " in err, err

    second = ServeProcess(claims_models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir,
                          env={**os.environ, "AIOS_MAX_WATCHES": "1"})
    try:
        missed = [escalate(second.address, "dash"), escalate(second.address, "dash")]
        code = main(["review", "watch", "--tenant", "dash", "--from", str(resume), "--count", "2", "--json",
                     "--timeout", "30", "--address", second.address])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert [json.loads(line)["review_id"] for line in out.splitlines()] == missed  # not `seen` again

        # a bad resume point is refused: exit 1; flags that contradict each other: exit 2, nothing asked
        code = main(["review", "watch", "--from", "999999", "--timeout", "30", "--address", second.address])
        _, err = capsys.readouterr()
        assert code == 1 and err.startswith("INVALID_ARGUMENT: from_sequence 999999 is past the newest review "), err
        assert "without a refusal" not in err
        code = main(["review", "watch", "--from", str(resume), "--include-open", "--address", second.address])
        _, err = capsys.readouterr()
        assert code == 2 and "give one of them" in err, err

        # the same over the API, and new reviews after the missed ones, none twice
        with grpc.insecure_channel(second.address) as channel:
            stream, first_sent = watch_once_its_place_is_free(channel, resume)
            assert [first_sent.review_id, next(stream).review_id] == missed
            later = escalate(second.address, "dash")
            assert next(stream).review_id == later
            # a refusal is not a cut: exit 1 (here the kernel's one place for a watch is taken)
            code = main(["review", "watch", "--timeout", "30", "--address", second.address])
            _, err = capsys.readouterr()
            assert code == 1 and err.startswith("RESOURCE_EXHAUSTED: ") and "max_watches" in err, err
            assert "without a refusal" not in err
            stream.cancel()

    finally:
        code, log = second.stop()
    assert code == 0, log



def power_cut(claims_models, tmp_path, env, audit_too: bool):
    """A kernel that escalates while a watch follows, and a power cut: the data dir as it was at the last fsync
    before those escalations (the claim of an earlier one), after a SIGKILL; ``audit_too``: the audit log as well
    (audit_mode "async"), else as it is (fsynced record by record in "fsync" mode). Returns the pipelines, the data
    dir, the reviews escalated after that point and the reviews the watch was sent."""
    import shutil

    pipelines, data_dir = copy_pipelines(tmp_path / "pipelines"), tmp_path / "data"
    saved = tmp_path / "as-on-disk"
    first = ServeProcess(claims_models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir,
                         env=env)
    try:
        earlier = escalate(first.address, "dash")
        with grpc.insecure_channel(first.address) as channel:
            claimed = kgrpc.ReviewServiceStub(channel).ClaimReview(
                kpb.ClaimReviewRequest(review_id=earlier, reviewer="alice"), timeout=30)  # a durable write: an fsync
            # (the kernel is idle: what its files hold now is what a power cut leaves of them)
            shutil.copytree(data_dir, saved, ignore=shutil.ignore_patterns("*-shm", "LOCK", "kernel.lock"))
            stream = kgrpc.ReviewServiceStub(channel).WatchReviews(
                kpb.WatchReviewsRequest(tenant="dash", from_sequence=claimed.sequence + 1), timeout=30)
            seen = [escalate(first.address, "dash"), escalate(first.address, "dash")]
            sent = [next(stream), next(stream)]
            assert [review.review_id for review in sent] == seen
            stream.cancel()
    finally:
        first.kill()
    for path in (data_dir.iterdir() if audit_too else data_dir.glob("kernel.sqlite3*")):  # the power cut
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in (saved.iterdir() if audit_too else saved.glob("kernel.sqlite3*")):
        shutil.copytree(path, data_dir / path.name) if path.is_dir() else shutil.copy(path, data_dir / path.name)
    return pipelines, data_dir, seen, sent


def test_reviews_a_power_cut_took_come_back_past_every_position_a_watch_was_sent(claims_models, tmp_path):
    """An escalation's review row is stored in the background without an fsync (its durable audit record can open it
    again) and sent to watches at its commit. A power cut then takes the row, and SQLite's position counter with it:
    the start reopened the review from its record at a position a watch had already been sent and passed, so the
    watch resumed with from_sequence = the highest it had + 1 never got it (nor any other reopened one).

    Injected fault, a power cut: the store's files are put back as they were at the last fsync before the
    escalations the watch was sent, after the kernel was killed with SIGKILL; the audit log is kept as it is
    (fsynced record by record in the default audit_mode "fsync")."""
    pipelines, data_dir, seen, sent = power_cut(claims_models, tmp_path, None, audit_too=False)
    resume = max(review.sequence for review in sent) + 1
    second = ServeProcess(claims_models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    try:
        later = escalate(second.address, "dash")
        with grpc.insecure_channel(second.address) as channel:
            stream = kgrpc.ReviewServiceStub(channel).WatchReviews(
                kpb.WatchReviewsRequest(tenant="dash", from_sequence=resume), timeout=30)
            # the reopened reviews again (same ids, new positions: the watch cannot know they were lost), then the new
            got = []
            for expected in [*seen, later]:
                got.append(next(stream))
                assert got[-1].review_id == expected, (got, seen, later)
            stream.cancel()
    finally:
        code, log = second.stop()
    assert code == 0, log
    assert "reopened 2 reviews from the audit log" in log, log


def test_after_a_power_cut_in_async_mode_new_reviews_take_no_position_a_watch_was_sent(claims_models, tmp_path):
    """In audit_mode "async" a power cut takes the newest records with the review rows (as that mode allows), and
    the store's position counter with them: nothing is left to reopen, and the next reviews took the positions a
    watch had been sent and passed, so the watch resumed with from_sequence = the highest it had + 1 missed them.

    Injected fault, a power cut: the store's files and the audit log are put back as they were at the last fsync
    before the escalations the watch was sent, after a SIGKILL."""
    env = {**os.environ, "AIOS_AUDIT_MODE": "async"}
    pipelines, data_dir, _, sent = power_cut(claims_models, tmp_path, env, audit_too=True)
    resume = max(review.sequence for review in sent) + 1
    second = ServeProcess(claims_models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir,
                          env=env)
    try:
        later = [escalate(second.address, "dash") for _ in range(3)]
        with grpc.insecure_channel(second.address) as channel:
            stream = kgrpc.ReviewServiceStub(channel).WatchReviews(
                kpb.WatchReviewsRequest(tenant="dash", from_sequence=resume), timeout=30)
            got = [next(stream) for _ in later]
            stream.cancel()
        assert [review.review_id for review in got] == later, (got, resume)  # (was: the third only)
    finally:
        code, log = second.stop()
    assert code == 0, log
