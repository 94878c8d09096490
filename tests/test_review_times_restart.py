"""A review's lease and SLA are wall-clock instants stored with it, and mean the same after a kill and a restart.

Real ``aios-kernel serve`` processes on one data directory, each killed with SIGKILL. A reviewer's claim made
before the kill still holds after an immediate restart (another reviewer is refused until its end, named in
UTC), and has ended after a restart past its end; an SLA missed while the kernel was down is counted once, at
every restart alike. "Restarted an hour / a day later" is the one fault injected on purpose: that kernel's wall
clock runs ahead (tests/_wall_clock_offset_kernel.py).
"""

from __future__ import annotations

import re
import sqlite3
import sys
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from claims_support import UNSURE_CASE, build_small_model, claim_request, copy_pipelines
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import RecordFilter, iter_directory
from kernel.testing.processes import ServeProcess

LATER_KERNEL = [sys.executable, str(Path(__file__).resolve().parent / "_wall_clock_offset_kernel.py")]
LEASE_S = 600


def restarted(models, pipelines, data_dir, later_s: float = 0) -> ServeProcess:
    cli = [*LATER_KERNEL, str(later_s)] if later_s else None
    return ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir, cli=cli)


def test_a_claim_and_an_sla_outlive_a_kill(tmp_path):
    models, pipelines, data_dir = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "p"), tmp_path / "d"
    first = restarted(models, pipelines, data_dir)
    try:
        with grpc.insecure_channel(first.address) as channel:
            decided = kgrpc.DecisionServiceStub(channel).Decide(claim_request(UNSURE_CASE), timeout=30)
            claimed = kgrpc.ReviewServiceStub(channel).ClaimReview(kpb.ClaimReviewRequest(
                review_id=decided.review_id, reviewer="alice", lease_seconds=LEASE_S), timeout=30)
    finally:
        first.kill()
    assert decided.review_id and claimed.state == "CLAIMED"

    second = restarted(models, pipelines, data_dir)
    try:
        with grpc.insecure_channel(second.address) as channel:
            reviews = kgrpc.ReviewServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=decided.review_id, reviewer="bob"), timeout=30)
            shown = reviews.GetReview(kpb.ReviewRef(review_id=decided.review_id), timeout=30)
    finally:
        second.kill()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    until = re.search(r"claimed by alice until (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", refused.value.details())
    # (the second it names is not before the lease's end: a claim made then, as told, is not refused again)
    assert until and datetime.fromisoformat(until[1].replace("Z", "+00:00")).timestamp() * 10**9 >= \
        claimed.lease_expires_unix_ns
    assert (shown.state, shown.claimed_by, shown.lease_expires_unix_ns) == ("CLAIMED", "alice",
                                                                            claimed.lease_expires_unix_ns)

    # Back after the lease ended (the kill took no lapse with it): bob may claim, alice may no longer resolve.
    third = restarted(models, pipelines, data_dir, later_s=LEASE_S + 60)
    try:
        with grpc.insecure_channel(third.address) as channel:
            reviews = kgrpc.ReviewServiceStub(channel)
            with pytest.raises(grpc.RpcError) as lapsed:
                reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=decided.review_id, reviewer="alice",
                                                               action="deny"), timeout=30)
            taken = reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=decided.review_id, reviewer="bob"),
                                        timeout=30)
    finally:
        third.kill()
    assert lapsed.value.code() == grpc.StatusCode.FAILED_PRECONDITION, lapsed.value.details()
    assert taken.claimed_by == "bob" and taken.claimed_unix_ns > claimed.lease_expires_unix_ns

    # A day on (the SLA is 4 hours), twice: missed, and counted once however many times the kernel starts.
    for _ in range(2):
        later = restarted(models, pipelines, data_dir, later_s=86_400)
        try:
            with grpc.insecure_channel(later.address) as channel:
                listed = kgrpc.ReviewServiceStub(channel).ListReviews(kpb.ListReviewsRequest(), timeout=30)
        finally:
            later.kill()
        assert listed.sla_missed == 1 and [r.sla_missed for r in listed.reviews] == [True]
        assert listed.reviews[0].sla_deadline_unix_ns == claimed.sla_deadline_unix_ns


KILLED_AFTER_RESOLUTION_RECORD = [sys.executable,
                                  str(Path(__file__).resolve().parent / "_killed_after_resolution_record_kernel.py")]


def _lose_unsynced_commits(journal: Path, store: Path) -> list[str]:
    """The injected fault of a power cut: the idempotency entries committed after the store's last fsynced commit
    are gone (SQLite keeps a prefix of its commits; unsynced ones may not have reached the disk). Returns their keys."""
    lines = journal.read_text(encoding="utf-8").splitlines()
    last_durable = max((i for i, line in enumerate(lines) if line.startswith("durable")), default=-1)
    lost = [line.split(" ", 1)[1] for line in lines[last_durable + 1:] if line.split(" ", 1)[1]]
    with sqlite3.connect(store) as conn:
        conn.executemany("DELETE FROM idempotency WHERE key = ?", [(key,) for key in lost])
    return lost


@pytest.mark.parametrize("later_s, power_cut", [(0, False), (2 * 86_400, False), (0, True)])
def test_a_resolution_cut_off_by_a_kill_is_recorded_once_however_late_the_restart(tmp_path, later_s, power_cut):
    """(Random-kill audit) a kill right after a resolution's record leaves its delivery to the next start, which
    looks for that record from a note taken before it was written. The note was an idempotency entry, kept 24 h: a
    kernel started again a day after the kill found none and recorded the resolution a second time. It was also
    committed without an fsync, right before the record's own: a power cut then could take the note and keep the
    record (``power_cut``: the commits after the store's last fsynced one taken away), with the same result."""
    models, pipelines, data_dir = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "p"), tmp_path / "d"
    journal = tmp_path / "commits.journal"
    first = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir,
                         cli=[*KILLED_AFTER_RESOLUTION_RECORD, str(journal)])
    with grpc.insecure_channel(first.address) as channel:
        decided = kgrpc.DecisionServiceStub(channel).Decide(claim_request(UNSURE_CASE), timeout=30)
        reviews = kgrpc.ReviewServiceStub(channel)
        reviews.ClaimReview(kpb.ClaimReviewRequest(review_id=decided.review_id, reviewer="alice"), timeout=30)
        with pytest.raises(grpc.RpcError):  # (the kernel is killed while it delivers the resolution)
            reviews.ResolveReview(kpb.ResolveReviewRequest(review_id=decided.review_id, reviewer="alice",
                                                           action="deny", comment="ok"), timeout=30)
    first.kill()
    if power_cut:
        _lose_unsynced_commits(journal, data_dir / "kernel.sqlite3")

    shown = _review_after_a_restart(models, pipelines, data_dir, later_s, decided.review_id)
    resolutions = [r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.REVIEW_RESOLUTION))]
    assert [(r.links_to, r.decision.action) for r in resolutions] == [(decided.audit_sequence, "deny")]
    assert shown.resolution.audit_sequence == resolutions[0].sequence


def test_a_withdrawal_cut_off_by_a_kill_is_recorded_once_a_day_later(tmp_path):
    """(Random-kill audit) as a resolution's: a task's cancel records the withdrawal of its review, then marks the
    review withdrawn; a kill between the two leaves the withdrawal to the next start, which found no note a day later
    and recorded it a second time."""
    models, pipelines, data_dir = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "p"), tmp_path / "d"
    first = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir,
                         cli=[*KILLED_AFTER_RESOLUTION_RECORD, str(tmp_path / "commits.journal")])
    with grpc.insecure_channel(first.address) as channel:
        tasks = kgrpc.TaskServiceStub(channel)
        task = tasks.StartTask(kpb.StartTaskRequest(request=claim_request(UNSURE_CASE)), timeout=30)
        for update in tasks.WatchTask(kpb.TaskRef(task_id=task.task_id), timeout=30):
            if update.state == kpb.WAITING_FOR_REVIEW:
                break
        with pytest.raises(grpc.RpcError):  # (the kernel is killed while it withdraws the task's review)
            tasks.CancelTask(kpb.TaskRef(task_id=task.task_id), timeout=30)
    first.kill()

    shown = _review_after_a_restart(models, pipelines, data_dir, 2 * 86_400, update.review_id)
    assert (shown.state, shown.resolved_action) == ("RESOLVED", "")
    resolutions = [r for r in iter_directory(data_dir / "audit", 0, RecordFilter(kind=kpb.REVIEW_RESOLUTION))]
    assert [(r.task_id, r.decision.reasons[0].rule_id) for r in resolutions] == [(task.task_id, "WITHDRAWN")]


def _review_after_a_restart(models, pipelines, data_dir, later_s: float, review_id: str) -> kpb.Review:
    """The review as a kernel started on ``data_dir`` ``later_s`` later shows it, once that kernel stopped cleanly."""
    later = restarted(models, pipelines, data_dir, later_s=later_s)
    try:
        with grpc.insecure_channel(later.address) as channel:
            shown = kgrpc.ReviewServiceStub(channel).GetReview(kpb.ReviewRef(review_id=review_id), timeout=30)
    finally:
        code, err = later.stop()
    assert code == 0, err
    return shown
