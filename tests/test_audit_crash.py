"""kill -9 a process writing the log under load; every record it acknowledged must survive.

The child appends from 8 threads and prints ``sequence request_id hash`` for
each record once ``append_and_wait`` returned (fsync mode, so on disk). The
parent kills it with SIGKILL mid-load, reopens the directory (repairing any
torn tail) and checks each acknowledged record is there with the same id and
hash, that the log verifies, and that the log keeps working.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernel.audit import AuditLog, verify_directory

ROOT = Path(__file__).resolve().parent.parent

WRITER = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[3])
    from kernel.audit import AuditLog
    from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb

    log = AuditLog.open(sys.argv[1], mode=sys.argv[2], checkpoint_records=200, segment_bytes=32 * 1024)
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
        rest, _ = proc.communicate(timeout=30)
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
def test_acknowledged_records_survive_kill_9(tmp_path, mode):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "audit"
    total_acked: dict[int, tuple[str, str]] = {}
    for round_number in range(3):  # kill, reopen and go on, three times over the same log
        acked = run_and_kill(directory, script, mode, acks_before_kill=1500)
        assert not set(acked) & set(total_acked), "a sequence number was handed out twice"
        total_acked.update(acked)
        with AuditLog.open(directory) as log:
            assert log.size > max(total_acked)
            by_sequence = {record.sequence: record for record in log.read(0)}
            for seq, (request_id, digest) in total_acked.items():
                record = by_sequence[seq]
                assert record.request_id == request_id, seq
                assert record.hash.hex() == digest, seq
        result = verify_directory(directory)
        assert result.ok, result.reason
        assert result.records == log.size
    assert len(list(directory.glob("*.seg"))) > 3  # rotation happened under the kills too
