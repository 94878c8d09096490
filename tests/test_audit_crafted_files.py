"""A log directory someone else hands over (a backup, an archive, an edited data dir): files crafted to hold up
``audit verify``, ``export`` or a kernel's start are refused at once, naming the file.

Found by a helper's audit (2026-11-28), each with real files:

- a named pipe where a segment, ``checkpoints.log`` or a kept public key is read: ``audit verify`` and a kernel's
  start waited for ever in ``open`` (a start held SIGTERM too: "stopping without serving" never came); a link
  to ``/dev/zero`` as a segment ended ``audit verify`` in a MemoryError traceback. They are refused as files
  that cannot be read (``segments.read_regular``); a kept key that is no file is skipped, as an unreadable
  one always was.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from test_audit_verify import build_log, run_cli

from claims_support import claim_request, copy_pipelines
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import AuditCorrupt

# Far below a hang's timeout, far above what a refusal takes.
PROMPTLY_S = 45


@pytest.fixture
def log_dir(tmp_path) -> Path:
    build_log(tmp_path / "audit", records=30)
    return tmp_path / "audit"


# --------------------------------------------------------------------------- files that are no files
def _pipe_for_a_new_segment(directory: Path) -> str:
    os.mkfifo(directory / "00000000000000000030.seg")
    return "named pipe"


def _pipe_for_the_checkpoints(directory: Path) -> str:
    (directory / "checkpoints.log").unlink()
    os.mkfifo(directory / "checkpoints.log")
    return "named pipe"


def _zero_device_as_a_segment(directory: Path) -> str:
    os.symlink("/dev/zero", directory / "00000000000000000030.seg")
    return "device"


@pytest.mark.parametrize("craft", [_pipe_for_a_new_segment, _pipe_for_the_checkpoints, _zero_device_as_a_segment])
def test_verify_fails_at_once_on_a_file_that_is_no_regular_file(log_dir, craft):
    what = craft(log_dir)
    done = run_cli("verify", str(log_dir), "--strict")  # (a hang fails here: run_cli's timeout)
    assert done.returncode == 1, done
    assert f"{what}, not a regular file" in done.stdout and "Traceback" not in done.stderr, done


def test_export_refuses_a_segment_that_is_a_named_pipe(log_dir):
    _pipe_for_a_new_segment(log_dir)
    done = run_cli("export", str(log_dir))
    assert done.returncode == 2 and "named pipe, not a regular file" in done.stderr, done
    assert "Traceback" not in done.stderr


def test_a_kept_public_key_that_is_a_named_pipe_is_skipped_with_a_note(log_dir):
    (log_dir / "public-key.pem").unlink()
    os.mkfifo(log_dir / "public-key.pem")
    done = run_cli("verify", str(log_dir))
    assert done.returncode == 0, done  # (public-keys/ still holds the key)
    assert "skipped: cannot read public key" in done.stdout and "named pipe" in done.stdout, done


def _decided_and_stopped(claims_models, tmp_path) -> tuple[str, Path]:
    """(pipelines folder, data dir) of a claims kernel that made two decisions and stopped cleanly."""
    from conftest import start_kernel

    pipelines, data_dir = str(copy_pipelines(tmp_path / "pipelines")), tmp_path / "data"
    server = start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(2, seed=3)):
                stub.Decide(claim_request(case, request_id=f"c{i}"), timeout=10)
    finally:
        server.stop(grace=1)
    return pipelines, data_dir


@pytest.mark.timeout(120)  # (the hang this guards against: a start waiting in open() for a pipe's writer)
@pytest.mark.parametrize("craft", ["pipe"])
def test_a_kernel_start_on_a_crafted_log_is_refused_promptly_and_changes_nothing(claims_models, tmp_path, craft):
    from conftest import start_kernel

    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    audit = data_dir / "audit"
    if craft == "pipe":
        _pipe_for_the_checkpoints(audit)
    before = {path.name: (path.stat().st_size if path.is_file() else None) for path in audit.iterdir()}
    started = time.monotonic()
    with pytest.raises((AuditCorrupt, OSError)) as refused:
        start_kernel(claims_models, pipelines=pipelines, data_dir=str(data_dir), pipeline_poll_s=0)
    assert time.monotonic() - started < PROMPTLY_S
    said = str(refused.value)
    assert "named pipe, not a regular file" in said
    assert {path.name: (path.stat().st_size if path.is_file() else None) for path in audit.iterdir()} == before
