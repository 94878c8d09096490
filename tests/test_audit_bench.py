"""bench/audit_bench.py stays runnable: every workload once, with a short window, as the driver spawns it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.audit_bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workload,contender,extra", [
    ("bulk", "group", ()), ("small", "append", ()), ("small", "group", ()), ("threads", "group", ("--threads", "8")),
    ("paced", "append", ("--rate", "500")),
])
def test_each_workload_runs_and_its_log_verifies(tmp_path, workload, contender, extra):
    directory = tmp_path / "log"
    result = run("--run", workload, "--contender", contender, "--dir", str(directory), "--seconds", "0.3",
                 "--cpu", "0", *extra)
    assert result["records"] > 0 and result["records_per_s"] > 0 and result["groups"] > 0
    assert result["cpu_us_per_group"] > 0 and result["cpu_us_per_record"] > 0
    if workload != "bulk":
        assert 0 < result["p50_ms"] <= result["p99_ms"]
    verified = run("--run", "verify", "--dir", str(directory), "--cpu", "0")
    assert verified["records"] >= result["records"]
