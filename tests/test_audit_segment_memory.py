"""A segment made larger after it was written is refused in one line, in bounded memory, never read whole.

Found by a red team's audit (2026-11-28): ``audit verify``, ``archive``, ``export`` and the kernel's start read each
segment whole, so a segment cut out to 4 GiB with ``truncate -s`` (a sparse file: no disk used) made them allocate
4 GiB: a MemoryError traceback under a memory limit, an OOM kill without one. The writer never leaves more than
``MAX_ZERO_TAIL_BYTES`` of zeros after a segment's records (segments.read_log_file): past that the file is named
and refused before it is read. Each command here runs in a child limited to 1 GiB of address space
(``RLIMIT_AS``), on the files of a real log.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_audit_crafted_files import _decided_and_stopped, records_end
from test_audit_verify import ROOT, build_log, segment

from kernel.audit.segments import MAX_ZERO_TAIL_BYTES, PREALLOCATE_BYTES

SPARSE_BYTES = 4 << 30
ADDRESS_SPACE = 1 << 30


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_limited(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m kernel ARGS`` with at most ADDRESS_SPACE of memory: reading a 4 GiB segment whole fails in it."""
    return subprocess.run([sys.executable, "-m", "kernel", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, preexec_fn=_limited, env={**os.environ, "AIOS_LOG_LEVEL": "WARNING"})


@pytest.fixture
def log_dir(tmp_path) -> Path:
    build_log(tmp_path / "audit", records=30)
    return tmp_path / "audit"


def truncate_out(path: Path) -> int:
    """Make ``path`` SPARSE_BYTES long (a hole after its zero tail); returns where its records end."""
    end = records_end(path)
    os.truncate(path, SPARSE_BYTES)
    return end


def _said_in_one_line(done: subprocess.CompletedProcess, path: Path, end: int) -> None:
    said = done.stdout + done.stderr
    assert "Traceback" not in said and "MemoryError" not in said, said
    assert f"{path}: its last {SPARSE_BYTES - end:,} bytes (of {SPARSE_BYTES:,}) are zeros" in said, said


@pytest.mark.parametrize("command", [["verify"], ["verify", "--strict"], ["export"]])  # (replay reads as export)
def test_a_segment_truncated_out_to_gigabytes_fails_the_readers_in_one_line(log_dir, command):
    path = segment(log_dir)
    end = truncate_out(path)
    done = run_limited("audit", *command, str(log_dir))
    assert done.returncode in (1, 2), done
    _said_in_one_line(done, path, end)
    if command[0] == "verify":
        assert done.returncode == 1 and f"FAILED at record 0: {path}" in done.stdout, done


def test_an_archive_of_a_log_with_a_segment_truncated_out_is_refused_in_one_line(log_dir, tmp_path):
    path = segment(log_dir)
    end = truncate_out(path)
    done = run_limited("audit", "archive", str(log_dir), str(tmp_path / "archive"), "--before", "20", "--no-store")
    assert done.returncode != 0, done
    _said_in_one_line(done, path, end)
    assert os.stat(path).st_size == SPARSE_BYTES  # nothing changed


def test_a_kernel_start_on_a_segment_truncated_out_is_refused_in_one_line(claims_models, tmp_path):
    """A real kernel's log (two decisions, a clean stop), its segment cut out to 4 GiB: `aios-kernel serve` in
    1 GiB of address space refuses to open the log, naming the file and how to cut it back, and changes nothing."""
    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    path = segment(data_dir / "audit")
    end = truncate_out(path)
    done = run_limited("serve", "--models", str(claims_models), "--pipelines", pipelines, "--data-dir",
                       str(data_dir), "--port", "0")
    assert done.returncode != 0, done
    _said_in_one_line(done, path, end)
    assert f"truncate -s {end + PREALLOCATE_BYTES} {path}" in done.stderr, done.stderr
    assert os.stat(path).st_size == SPARSE_BYTES
    # Cut back as it says, the log opens and verifies as before.
    os.truncate(path, end + PREALLOCATE_BYTES)
    done = run_limited("audit", "verify", str(data_dir / "audit"), "--strict")
    assert done.returncode == 0 and "OK" in done.stdout, done


def test_a_zero_tail_a_writer_leaves_reads_as_before(log_dir):
    """Up to MAX_ZERO_TAIL_BYTES of zeros after the records (a preallocation: at most 1.5 x 64 MiB) are unused
    space, as ever; a hole of that size inside the file is not looked at either (it is no more than the limit)."""
    path = segment(log_dir)
    os.truncate(path, records_end(path) + MAX_ZERO_TAIL_BYTES)
    done = run_limited("audit", "verify", str(log_dir), "--strict")
    assert done.returncode == 0 and "OK: 30 records" in done.stdout, done


def test_a_hole_longer_than_any_record_before_more_bytes_is_refused_unread(log_dir):
    """Bytes written past a hole of more than a record's limit (1 GiB): the hole is named, nothing is read."""
    path = segment(log_dir)
    with open(path, "r+b") as file:
        file.seek(3 << 30)
        file.write(b"\x01" * 64)
    done = run_limited("audit", "verify", str(log_dir))
    assert done.returncode == 1, done
    assert "Traceback" not in done.stdout + done.stderr and "MemoryError" not in done.stdout + done.stderr
    assert f"{path}: a hole of " in done.stdout and "more zeros than any record or preallocation holds" in done.stdout


def test_a_checkpoint_file_truncated_out_to_gigabytes_fails_verify_and_the_start_in_one_line(claims_models, tmp_path):
    """checkpoints.log, read whole as well by verify and the start (appended to, never preallocated)."""
    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    path = data_dir / "audit" / "checkpoints.log"
    os.truncate(path, SPARSE_BYTES)
    for args in (["audit", "verify", str(data_dir / "audit")],
                 ["serve", "--models", str(claims_models), "--pipelines", pipelines, "--data-dir", str(data_dir),
                  "--port", "0"]):
        done = run_limited(*args)
        said = done.stdout + done.stderr
        assert done.returncode != 0 and "Traceback" not in said and "MemoryError" not in said, said
        assert f"{path}: its last " in said and f"(of {SPARSE_BYTES:,}) are zeros" in said, said
    assert os.stat(path).st_size == SPARSE_BYTES


def test_a_backup_of_a_data_dir_with_a_segment_truncated_out_is_refused_in_one_line(claims_models, tmp_path):
    """`aios-kernel backup` copied each segment whole (4 GiB of zeros written to the backup's disk) and then read the
    copy whole: the same check refuses it first, naming the file, and leaves no copy behind."""
    pipelines, data_dir = _decided_and_stopped(claims_models, tmp_path)
    path = segment(data_dir / "audit")
    end = truncate_out(path)
    done = run_limited("backup", str(data_dir), str(tmp_path / "copy"))
    assert done.returncode != 0, done
    _said_in_one_line(done, path, end)
    assert not (tmp_path / "copy").exists() or not any((tmp_path / "copy").rglob("*.seg")), "a copy was left"
