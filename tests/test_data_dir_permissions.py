"""The data dir is the owner's alone: it holds escalated cases' free text and the audit signing key.

(An operator walk-through found the data dir 0755 and the store 0644 under the usual umask: every local user could
read customers' own words.) A data dir the kernel makes is 0700; one that every local user can read is named in a
WARNING at start. Backups and archives are made the same way.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import grpc
from claims_support import build_small_model, claim_request, copy_pipelines
from conftest import start_kernel

from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.backup import backup
from kernel.testing.processes import ServeProcess


def test_a_new_data_dir_is_owner_only_and_an_open_one_is_named(model_repo, tmp_path, caplog):
    old_umask = os.umask(0o022)  # the usual one, whatever the test runner's is
    try:
        made = tmp_path / "made" / "data"
        with caplog.at_level(logging.WARNING, logger="aios.decisions"):
            start_kernel(model_repo, data_dir=str(made)).stop(grace=1)
        assert made.stat().st_mode & 0o777 == 0o700
        assert "is open to every local user" not in caplog.text

        opened = tmp_path / "opened"
        opened.mkdir(mode=0o755)
        with caplog.at_level(logging.WARNING, logger="aios.decisions"):
            start_kernel(model_repo, data_dir=str(opened)).stop(grace=1)
        assert f"data_dir {opened} is open to every local user (mode 755)" in caplog.text
        assert f"chmod 700 {opened}" in caplog.text

        copy = tmp_path / "backups" / "copy"
        assert backup(made, copy).ok
        assert copy.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old_umask)


def test_a_log_folder_the_kernel_makes_is_owner_only_in_a_data_dir_that_is_not(tmp_path):
    """A data dir made before the kernel (a mount point, a package's folder) is often 0755: the start warns, and the
    log folder it makes inside is owner-only (0700) all the same, as `aios-kernel backup` makes a copy's, and so
    are the store's files (kernel.sqlite3, its WAL, kernel.lock)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chmod(data_dir, 0o755)
    models, pipelines = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "pipelines")
    old_umask = os.umask(0o022)  # the usual one (the kernel process inherits it), whatever the test runner's is
    try:
        server = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir)
    finally:
        os.umask(old_umask)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            stub.Decide(claim_request(data.generate_cases(1, seed=4)[0]), timeout=10)
            escalated = claim_request(data.generate_cases(1, seed=4)[0], request_id="big")
            escalated.fields["claim_amount"].number_value = 90000  # (the demo policy escalates it: a review row)
            stub.Decide(escalated, timeout=10)
        # The store, its WAL and its lock too, while the kernel has them open (SQLite made them 0644: escalated
        # cases' free text readable by every local user of such a data dir).
        store_files = [p for p in data_dir.iterdir() if p.name.startswith("kernel.")]
        assert {p.name for p in store_files} >= {"kernel.sqlite3", "kernel.sqlite3-wal", "kernel.lock"}, store_files
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in store_files} == \
            {p.name: oct(0o600) for p in store_files}
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert "is open to every local user" in err
    assert stat.S_IMODE(os.stat(data_dir / "audit").st_mode) == 0o700


def test_an_archive_into_an_empty_folder_that_is_open_keeps_its_files_owner_only(tmp_path):
    """`audit archive LOG DEST` with DEST an empty folder made before (a mount point, 0755): the archive's segments,
    checkpoints and marker were made under the umask (0644), every decision's inputs readable by every local user, as
    a backup's were before its copy was made owner-only. Each file it writes is 0600 now, whatever DEST's mode."""
    data_dir = tmp_path / "data"
    models, pipelines = build_small_model(tmp_path / "models"), copy_pipelines(tmp_path / "pipelines")
    env = dict(os.environ, AIOS_AUDIT_SEGMENT_BYTES="8192")  # a segment every few decisions: boundaries to cut at
    server = ServeProcess(models, "--pipelines", str(pipelines), "--log-level", "WARNING", data_dir=data_dir, env=env)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for i, case in enumerate(data.generate_cases(20, seed=6)):
                stub.Decide(claim_request(case, request_id=f"r{i}"), timeout=10)
    finally:
        code, err = server.stop()
    assert code == 0, err
    dest = tmp_path / "cold"
    dest.mkdir()
    os.chmod(dest, 0o755)
    done = subprocess.run([sys.executable, "-m", "kernel", "audit", "archive", str(data_dir / "audit"), str(dest),
                           "--before", "15"], capture_output=True, text=True, timeout=120, umask=0o022)
    assert done.returncode == 0, done.stdout + done.stderr
    written = [path for path in dest.rglob("*") if path.is_file()]
    assert any(path.suffix == ".seg" for path in written) and (dest / "archive.json") in written
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == \
        {path.name: "0o600" for path in written}
