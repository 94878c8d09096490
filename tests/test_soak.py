"""bench/soak.py stays runnable: a few seconds of its mixed load on a real kernel, sampled, stopped, written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_soak_runs_every_call_and_writes_its_samples(tmp_path):
    # (SOAK_TEST_PORT: a host that hands out port ranges; by default any free port)
    port = os.environ.get("SOAK_TEST_PORT", "0")
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "6", "--interval", "2", "--rate", "25", "--label", "test",
         "--env", "MALLOC_ARENA_MAX=2", "--port", port, "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "soak test done:" in done.stdout and "kernel exit 0, 0 WARNING/ERROR lines" in done.stdout
    (path,) = tmp_path.glob("soak-*-test.json")
    report = json.loads(path.read_text())
    assert report["kernel_exit"] == 0 and report["log_problems"] == []
    assert report["kernel_env"]["MALLOC_ARENA_MAX"] == "2"  # (read back from the kernel's own environment)
    samples = report["samples"]
    assert len(samples) >= 3 and samples[0]["elapsed_s"] == 0 and samples[-1]["elapsed_s"] >= 6
    for sample in samples:
        assert sample["VmRSS"] > 0 and sample["Threads"] > 1 and sample["fds"] > 0 and sample["data_mb"] > 0
    assert samples[-1]["failed"] == {} and samples[-1]["ok"] > 100
    calls = report["calls"]
    for call in ("decide", "infer", "stream", "list-reviews", "start-task", "get-task", "audit"):
        assert calls.get(call, {}).get("OK", 0) > 0, (call, calls)
    assert samples[-1]["decisions"].get("ESCALATED", 0) > 0
    # (a resolve is counted only when a claim gave it a review to resolve)
    assert calls.get("resolve", {}).get("OK", 0) <= calls.get("claim-next", {}).get("OK", 0)
