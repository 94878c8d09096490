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
