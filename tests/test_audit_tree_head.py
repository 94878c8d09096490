"""``audit verify --tree-head SIZE:ROOT``: a signed tree head noted outside the data dir, held against the log.

``--min-records`` holds a log to a size noted before, which is all it takes
against someone without the key: no other root can be signed for that size.
Whoever can also read the signing key signs what they like: the whole history
rewritten, re-chained and re-signed, at least as long as before, verifies
``--strict --min-records`` with the very key an auditor trusts. Only the root
noted with the size (``GetCheckpoint``'s ``root_hash``, kept where the log's
writers cannot reach) tells that log from the one the kernel wrote.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from claims_support import build_small_model, claim_request, copy_pipelines
from test_audit_verify import decision, run_cli

from examples.claims import data as claims_data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc
from kernel.api import kernel_services
from kernel.api.audit_service import audit_handlers
from kernel.audit import AuditLog
from kernel.audit.archive import archive
from kernel.audit.checkpoints import read_all as read_checkpoints
from kernel.testing.processes import ServeProcess

RECORDS = 120


def kernel_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernel", *args], capture_output=True, text=True, timeout=120)


def write_log(directory: Path, key: Path, rewrite: int | None = None) -> None:
    """A log of RECORDS decisions signed with ``key``; ``rewrite``: that decision denied instead (what a holder of
    the key writes: a whole new history under the same key)."""
    with AuditLog.open(directory, key_path=key, checkpoint_records=10, checkpoint_ms=60_000,
                       segment_bytes=4096) as log:
        for i in range(RECORDS):
            record = decision(i)
            if i == rewrite:
                record.decision.action = "deny"
            log.append_and_wait(record, 10)


def noted_head(directory: Path, key: Path, size: int) -> str:
    """The tree head an auditor notes over gRPC, as GetCheckpoint answers it (root in base64, as grpcurl shows)."""
    with AuditLog.open(directory, key_path=key, checkpoint_records=10, checkpoint_ms=60_000) as log:
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers(
            kernel_services.generic_handlers(None, None, asynchronous=False, implemented=audit_handlers(log)))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                checkpoint = kernel_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(pb.CheckpointRequest())
        finally:
            server.stop(0)
    assert checkpoint.tree_size >= size
    return f"{checkpoint.tree_size}:{base64.b64encode(checkpoint.root_hash).decode()}"


def test_a_history_rewritten_with_the_key_fails_against_a_noted_tree_head(tmp_path):
    key = tmp_path / "audit-key.pem"
    kernels = tmp_path / "kernel" / "audit"
    write_log(kernels, key)
    head = noted_head(kernels, key, RECORDS)
    size = int(head.split(":")[0])
    public = tmp_path / "audit.pub"
    public.write_bytes((kernels / "public-key.pem").read_bytes())
    assert run_cli("verify", str(kernels), "--from-key", str(public), "--strict", "--tree-head", head).returncode == 0

    forged = tmp_path / "forged" / "audit"
    write_log(forged, key, rewrite=33)
    with AuditLog.open(forged, key_path=key):  # (its start signs the size it finds, as the kernel's did)
        pass
    plain = run_cli("verify", str(forged), "--from-key", str(public), "--strict", "--min-records", str(size))
    assert plain.returncode == 0, plain.stdout + plain.stderr  # what the size alone cannot tell
    done = run_cli("verify", str(forged), "--from-key", str(public), "--strict", "--tree-head", head)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAILED in records 0..{size - 1}: their hashes do not give the root of the tree head noted" in done.stdout

    hexed = f"{size}:{base64.b64decode(head.split(':')[1]).hex()}"  # the same head in hex
    assert run_cli("verify", str(kernels), "--tree-head", hexed).returncode == 0


def test_a_log_shorter_than_the_noted_head_or_archived_past_it(tmp_path):
    key = tmp_path / "audit-key.pem"
    kernels = tmp_path / "audit"
    write_log(kernels, key)
    copy = tmp_path / "older"
    shutil.copytree(kernels, copy)
    with AuditLog.open(kernels, key_path=key) as log:
        for i in range(30):
            log.append_and_wait(decision(i), 10)
    head = noted_head(kernels, key, RECORDS + 30)
    done = run_cli("verify", str(copy), "--tree-head", head)  # rolled back to an older copy
    assert done.returncode == 1 and "fewer than the" in done.stdout, done.stdout + done.stderr

    early = f"50:{'00' * 32}"
    archive(kernels, tmp_path / "archive", before=100, key_path=key, no_store=True)
    done = run_cli("verify", str(kernels), "--tree-head", early)
    assert done.returncode == 1 and "were archived: hold the archive to it" in done.stdout, done.stdout

    for bad in ("50", "x:abcd", "50:abcd", "-1:" + "00" * 32):
        done = run_cli("verify", str(kernels), "--tree-head", bad)
        assert done.returncode == 2 and "--tree-head" in done.stderr, (bad, done.stderr)


def test_a_data_dir_rolled_back_to_a_backup_and_run_on_fails_only_against_a_noted_tree_head(tmp_path):
    """A whole data dir restored from an older backup (store and log together, so the start finds nothing
    missing) and a kernel run on it: the kernel signs the new records itself, and the log grows past any size
    noted before. Only the root noted at that size tells the fork, and the failure says what it may be."""
    models = build_small_model(tmp_path / "models")
    serve = ("--pipelines", str(copy_pipelines(tmp_path / "pipelines")), "--log-level", "WARNING")
    env = dict(os.environ, AIOS_AUDIT_CHECKPOINT_RECORDS="5")
    data_dir, cases = tmp_path / "data", claims_data.generate_cases(40, seed=5)

    def run_kernel(first: int, count: int) -> pb.Checkpoint:
        server = ServeProcess(models, *serve, data_dir=data_dir, env=env)
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = kernel_pb2_grpc.DecisionServiceStub(channel)
                for i in range(first, first + count):
                    stub.Decide(claim_request(cases[i], request_id=f"r{i}"), timeout=10)
        finally:
            code, err = server.stop()
        assert code == 0, err
        return read_checkpoints(data_dir / "audit")[0][-1]

    run_kernel(0, 10)
    assert kernel_cli("backup", str(data_dir), str(tmp_path / "backup")).returncode == 0
    noted = run_kernel(10, 10)  # (the kernel's last checkpoint: what GetCheckpoint answered before its stop)
    shutil.rmtree(data_dir)
    assert kernel_cli("restore", str(tmp_path / "backup"), str(data_dir)).returncode == 0
    run_kernel(20, 20)
    audit = data_dir / "audit"

    plain = run_cli("verify", str(audit), "--strict", "--min-records", str(noted.tree_size))
    assert plain.returncode == 0, plain.stdout + plain.stderr  # what a size alone cannot tell
    head = f"{noted.tree_size}:{noted.root_hash.hex()}"
    done = run_cli("verify", str(audit), "--strict", "--tree-head", head)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "an older copy of it (a backup restored) that a kernel then wrote on" in done.stdout, done.stdout
