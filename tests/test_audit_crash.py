"""kill -9 a process writing the log under load; every record it acknowledged must survive.

The child appends from 8 threads and prints ``sequence request_id hash`` for
each record once ``append_and_wait`` returned (fsync mode, so on disk). The
parent kills it with SIGKILL mid-load, reopens the directory (repairing any
torn tail) and checks each acknowledged record is there with the same id and
hash, that the log verifies, and that the log keeps working.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog, verify_directory
from kernel.testing.processes import killed_after

ROOT = Path(__file__).resolve().parent.parent

WRITER = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[3])
    from kernel.audit import AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], mode=sys.argv[2], checkpoint_records=200, segment_bytes=32 * 1024,
                        preallocate_bytes=8192)  # zero-filled at creation and again part-way
    out = threading.Lock()
    print("ready", log.size, flush=True)

    def worker(t):
        i = 0
        while True:
            request_id = f"{t}-{i}"
            record = pb.AuditRecord(kind=pb.DECISION, tenant=f"t{t}", request_id=request_id, payload=b"p" * (i % 300))
            seq, digest = log.append_and_wait(record, 30)
            with out:
                sys.stdout.write(f"{seq} {request_id} {digest.hex()}\\n")
                sys.stdout.flush()
            i += 1

    for t in range(8):
        threading.Thread(target=worker, args=(t,), daemon=True).start()
    threading.Event().wait()
""")


def run_and_kill(directory: Path, script: Path, mode: str, acks_before_kill: int) -> dict[int, tuple[str, str]]:
    """Start the writer, kill -9 it after ``acks_before_kill`` acknowledgements; return every one it printed."""
    proc = subprocess.Popen([sys.executable, str(script), str(directory), mode, str(ROOT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: dict[int, tuple[str, str]] = {}
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), ready + proc.stderr.read()
        deadline = time.monotonic() + 60
        while len(acked) < acks_before_kill:
            line = proc.stdout.readline()
            assert line, "the writer stopped early: " + proc.stderr.read()
            assert time.monotonic() < deadline
            seq, request_id, digest = line.split()
            acked[int(seq)] = (request_id, digest)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Read the rest through proc.stdout, not communicate(): communicate reads the pipe's file
        # descriptor and misses what readline() above already pulled into proc.stdout's buffer, which
        # then showed up as a line cut at its start.
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    for line in rest.split("\n")[:-1]:  # complete lines only: one cut by the kill is not trusted
        seq, request_id, digest = line.split()
        acked[int(seq)] = (request_id, digest)
    return acked


@pytest.mark.parametrize("mode", ["fsync", "async"])
def test_acknowledged_records_survive_kill_9(tmp_path, caplog, mode):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "audit"
    total_acked: dict[int, tuple[str, str]] = {}
    for round_number in range(3):  # kill, reopen and go on, three times over the same log
        acked = run_and_kill(directory, script, mode, acks_before_kill=1500)
        assert not set(acked) & set(total_acked), "a sequence number was handed out twice"
        total_acked.update(acked)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aios.audit"), AuditLog.open(directory) as log:
            assert log.size > max(total_acked)
            if not log.dropped_bytes:  # killed between groups: the segment ends in its zero tail, nothing torn
                assert "torn tail in" not in caplog.text and not list(directory.glob("*.torn-*"))
            by_sequence = {record.sequence: record for record in log.read(0)}
            for seq, (request_id, digest) in total_acked.items():
                record = by_sequence[seq]
                assert record.request_id == request_id, seq
                assert record.hash.hex() == digest, seq
        result = verify_directory(directory)
        assert result.ok, result.reason
        assert result.records == log.size
    assert len(list(directory.glob("*.seg"))) > 3  # rotation happened under the kills too


IDLE_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from kernel.audit import AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], checkpoint_records=100, segment_bytes=64 * 1024, preallocate_bytes=16 * 1024)
    for i in range(int(sys.argv[3])):
        seq, digest = log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}", payload=b"p" * 90), 30)
        print(seq, digest.hex(), flush=True)
    # A record is acknowledged before the checkpoint over it is signed: wait for that too, so the kill
    # leaves no unsigned tail (the reopen would adopt it with a warning; test_audit_adopted covers that).
    while log.latest_checkpoint().tree_size < log.size:
        time.sleep(0.01)
    print("idle", flush=True)
    sys.stdin.read()  # killed here, between groups, its segments ending in preallocated zeros
""")


def test_kill_9_between_groups_leaves_a_zero_tail_not_a_torn_one(tmp_path, caplog):
    script = tmp_path / "writer.py"
    script.write_text(IDLE_WRITER)
    directory = tmp_path / "audit"
    proc = subprocess.Popen([sys.executable, str(script), str(directory), str(ROOT), "700"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    with killed_after(proc):
        while not lines or lines[-1] != "idle":
            line = proc.stdout.readline()
            assert line, "the writer stopped early: " + proc.stderr.read()
            lines.append(line.strip())
    acked = {int(seq): digest for seq, digest in (line.split() for line in lines[:-1])}
    assert sorted(acked) == list(range(700))
    last = sorted(directory.glob("*.seg"))[-1]
    assert last.read_bytes().endswith(bytes(64))  # the zero tail is there
    with caplog.at_level(logging.WARNING, logger="aios.audit"), AuditLog.open(directory) as log:
        assert log.size == 700 and log.dropped_bytes == 0
        assert {r.sequence: r.hash.hex() for r in log.read(0)} == acked
        assert log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id="after"), 10)[0] == 700
    assert not caplog.text  # no torn tail, no dropped bytes
    assert not list(directory.glob("*.torn-*"))
    assert len(list(directory.glob("*.seg"))) > 1
    result = verify_directory(directory)
    assert result.ok and result.records == 701
