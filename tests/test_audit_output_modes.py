"""What `audit export --out` and `audit replay --report` write is as private as the log they read.

The data dir is owner-only (0700) because the log keeps every decision's
inputs; an export holds all of them again, and a replay report every changed
case with its fields. Both were created under the caller's umask (0644 at the
usual 022): readable by every local user wherever they were written (a
helper's audit). A new file is made owner-only (0600) now.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from claims_support import build_small_model, claim_request, copy_pipelines

from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.testing.processes import ServeProcess


@pytest.fixture(scope="module")
def kernel_data(tmp_path_factory) -> Path:
    """A real kernel's data dir: 12 decisions made durable (audit_mode fsync), stopped cleanly."""
    root = tmp_path_factory.mktemp("modes")
    server = ServeProcess(build_small_model(root / "models"), "--pipelines", str(copy_pipelines(root / "pipelines")),
                          "--log-level", "WARNING", data_dir=root / "data")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(12, seed=4)):
                stub.Decide(claim_request(case, request_id=f"r{i}"), timeout=10)
    finally:
        code, err = server.stop()
    assert code == 0, err
    return root


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernel", "audit", *args], capture_output=True, text=True,
                          timeout=120, umask=0o022)


def test_an_export_file_is_made_owner_only(kernel_data, tmp_path):
    out = tmp_path / "decisions.jsonl"
    done = audit_cli("export", str(kernel_data / "data" / "audit"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "claims_triage" in out.read_text()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_a_replay_report_is_made_owner_only(kernel_data, tmp_path):
    report = tmp_path / "report.json"
    pipelines = kernel_data / "pipelines"
    done = audit_cli("replay", str(kernel_data / "data" / "audit"), "--pipeline", str(pipelines / "claims_triage.toml"),
                     "--policy", str(pipelines / "policy.toml"), "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert report.is_file()
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o600
