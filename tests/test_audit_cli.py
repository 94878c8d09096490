"""``aios-kernel audit verify|export|replay`` on wrong paths, missing checkpoints and damaged records.

Each case is one a user met: a command that answered "OK" or exit 0 where the
log was not there or not whole, or a traceback where one line should say
which path was wrong. Logs are real ones written by ``AuditLog``; damage is
done to their bytes on purpose. The commands run as ``python -m kernel audit``
subprocesses (``run_cli``), as a user runs them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_audit_verify import build_log, frame_offset, read_frames, run_cli, segment, write_frames

from kernel.audit import AuditCorrupt, iter_directory, verify_directory
from kernel.audit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
RECORDS = 16
PIPELINES = ROOT / "examples" / "claims" / "pipelines"


@pytest.fixture
def log_dir(tmp_path) -> Path:
    directory = tmp_path / "audit"
    build_log(directory, records=RECORDS, checkpoint_every=5)
    return directory


def flip_byte_in_record(directory: Path, index: int) -> None:
    path = segment(directory)
    data = bytearray(path.read_bytes())
    data[frame_offset(path, index) + 20] ^= 0x01
    path.write_bytes(bytes(data))


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --------------------------------------------------------------------------- not a log at all
@pytest.mark.parametrize("command", ["verify", "export"])
def test_a_folder_with_no_log_is_refused_not_verified(tmp_path, log_dir, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    # The data directory instead of <data_dir>/audit: files of the kernel, no segments.
    (tmp_path / "kernel.sqlite3").write_bytes(b"")
    for wrong in (empty, tmp_path):
        done = run_cli(command, str(wrong))
        assert done.returncode == 2, done.stdout + done.stderr
        assert one_line(done.stderr) == (
            f"aios-kernel audit {command}: no audit log in {wrong} (expected segment files such as "
            f"00000000000000000000.seg and checkpoints.log; the kernel keeps its log in <data_dir>/audit)")
        assert "OK" not in done.stdout and "note:" not in done.stdout
    assert not verify_directory(empty).ok


def test_the_key_note_needs_a_key(tmp_path):
    # A log with no record and no checkpoint (a header-only segment): nothing was signed, no key used.
    (tmp_path / "00000000000000000000.seg").write_bytes(b"AIOSAUD\x02")
    done = run_cli("verify", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 0 records and 0 signed checkpoints verified [" in done.stdout
    assert "(key" not in done.stdout and "note:" not in done.stdout


# --------------------------------------------------------------------------- no signed checkpoint
def test_records_with_no_signed_checkpoint_fail(log_dir):
    (log_dir / "checkpoints.log").unlink()
    result = verify_directory(log_dir)
    assert not result.ok and result.records == RECORDS
    assert f"no signed checkpoint covers records 0..{RECORDS - 1}: checkpoints.log is missing or empty" \
        in result.reason
    done = run_cli("verify", str(log_dir))
    assert done.returncode == 1
    assert f"FAILED: no signed checkpoint covers records 0..{RECORDS - 1}" in done.stdout


def test_an_emptied_checkpoint_file_fails_too(log_dir):
    path = log_dir / "checkpoints.log"
    magic, _ = read_frames(path)
    write_frames(path, magic, [])
    assert "checkpoints.log is missing or empty" in verify_directory(log_dir).reason


def test_records_after_the_first_checkpoint_only_are_a_crash_tail_and_pass(log_dir):
    """What a kernel killed before its first periodic checkpoint leaves: the tree-size-0 head it
    signed on creation, then records. Chained but unsigned, not a failure."""
    path = log_dir / "checkpoints.log"
    magic, checkpoints = read_frames(path)
    write_frames(path, magic, checkpoints[:1])
    result = verify_directory(log_dir)
    assert result.ok, result.reason
    assert (result.records, result.checkpoints, result.signed_size) == (RECORDS, 1, 0)
    assert f"the last {RECORDS} are chained but not yet signed" in result.describe()


# --------------------------------------------------------------------------- export: damage vs torn tail
def test_export_of_a_damaged_middle_record_fails_and_names_it(log_dir, tmp_path):
    flip_byte_in_record(log_dir, 10)
    out = tmp_path / "out.jsonl"
    done = run_cli("export", str(log_dir), "--out", str(out))
    assert done.returncode == 1, done.stderr
    message = one_line(done.stderr)
    assert "record 10 is damaged" in message and "records from 10 on could not be read" in message
    assert f"{out} is incomplete" in message and f"aios-kernel audit verify {log_dir}" in message
    assert "torn" not in message and "exported" not in message
    assert [json.loads(line)["sequence"] for line in out.read_text().splitlines()] == list(range(10))
    with pytest.raises(AuditCorrupt, match="record 10 is damaged"):
        list(iter_directory(log_dir))


def test_export_stops_at_a_torn_tail_with_a_warning(log_dir, tmp_path):
    path = segment(log_dir)
    with open(path, "r+b") as f:  # the last record cut short, as a crash mid-write leaves it
        f.truncate(frame_offset(path, RECORDS - 1) + 30)
    out = tmp_path / "out.jsonl"
    done = run_cli("export", str(log_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "ends in a torn record after 14" in done.stderr
    assert f"exported {RECORDS - 1} records to {out}" in done.stderr
    assert len(out.read_text().splitlines()) == RECORDS - 1


def test_export_to_a_path_that_cannot_be_written(log_dir, tmp_path):
    out = tmp_path / "no-such-folder" / "x.jsonl"
    done = run_cli("export", str(log_dir), "--out", str(out))
    assert done.returncode == 2
    assert one_line(done.stderr) == f"aios-kernel audit export: cannot write {out}: No such file or directory"


def test_export_refuses_an_until_not_after_its_since(log_dir):
    # (A compliance audit: it exported nothing and exited 0, where StreamAudit refuses the same.)
    done = run_cli("export", str(log_dir), "--since", "2026-11-27T10:00:00Z", "--until", "2026-11-27T09:00:00Z")
    assert done.returncode == 2 and done.stdout == ""
    assert one_line(done.stderr) == "aios-kernel audit export: --until must be later than --since (StreamAudit " \
                                    "refuses the same)"


def test_export_never_writes_into_the_log_nor_over_a_file_unless_forced(log_dir, tmp_path):
    """(Operator walk-through) `--out` over a segment truncated it before reading it, exit 0, and the log no longer
    verified; any existing file was replaced without a word."""
    seg = segment(log_dir)
    before = seg.read_bytes()
    done = run_cli("export", str(log_dir), "--out", str(seg))
    assert done.returncode == 2 and seg.read_bytes() == before
    assert "inside" in one_line(done.stderr) and "write elsewhere" in done.stderr
    assert verify_directory(log_dir).ok
    data_dir_file = tmp_path / "kernel.sqlite3"  # the log's folder is a data dir: the store is guarded too
    data_dir_file.write_bytes(b"the store")
    done = run_cli("export", str(log_dir), "--out", str(data_dir_file))
    assert done.returncode == 2 and data_dir_file.read_bytes() == b"the store"
    data_dir_file.unlink()

    kept = tmp_path / "precious.txt"
    kept.write_text("only copy\n")
    done = run_cli("export", str(log_dir), "--out", str(kept))
    assert done.returncode == 2 and kept.read_text() == "only copy\n"
    assert one_line(done.stderr) == f"aios-kernel audit export: {kept} already exists; pass --force to replace it"
    done = run_cli("export", str(log_dir), "--out", str(kept), "--force")
    assert done.returncode == 0, done.stderr
    assert len(kept.read_text().splitlines()) == RECORDS
    # Devices and the process's own streams are written as before (a session review: /dev/null was refused).
    assert run_cli("export", str(log_dir), "--out", "/dev/null").returncode == 0


def test_a_damaged_checkpoint_file_header_fails_verify_in_one_line(log_dir):
    """(Operator walk-through) a traceback, where a damaged segment gets FAILED and exit 1."""
    checkpoints = log_dir / "checkpoints.log"
    data = bytearray(checkpoints.read_bytes())
    data[0] ^= 0xFF
    checkpoints.write_bytes(bytes(data))
    done = run_cli("verify", str(log_dir))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "FAILED" in done.stdout and "checkpoints.log" in done.stdout and "file header" in done.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device every write to fails ENOSPC")
def test_an_export_whose_output_fills_the_disk_says_so_in_one_line(log_dir):
    """(Docs audit) an export small enough to sit in the file's buffer met the full disk only as the file was
    closed, after the handlers: a traceback ending in "OSError: [Errno 28] No space left on device", exit 1
    (which reads as a damaged log). Now the one line a write error in the loop gets, exit 2."""
    done = run_cli("export", str(log_dir), "--out", "/dev/full")
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == "aios-kernel audit export: cannot write /dev/full: No space left on device"


@pytest.mark.parametrize("days, why", [
    ("nan", "'nan' is not a number of days"), ("inf", "'inf' is not a number of days"),
    ("a", "'a' is not a number of days"),
    ("-1", "'-1': must be 0 to 36500 days"), ("1e300", "'1e300': must be 0 to 36500 days"),
])
def test_archive_refuses_an_age_that_is_no_number_of_days(log_dir, tmp_path, days, why):
    """(Docs audit) --older-than nan, inf and 1e300 ended in a ValueError / OverflowError traceback, exit 1 (the
    code for an archive that could not be written after its checks)."""
    done = run_cli("archive", str(log_dir), str(tmp_path / "old"), "--older-than", days, "--no-store")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"aios-kernel audit archive: error: argument --older-than: {why}"
    assert not (tmp_path / "old").exists()


@pytest.mark.parametrize("args", [("export", "--from"), ("verify", "--min-records")])
def test_a_sequence_that_is_no_whole_number_is_named_in_words(log_dir, args):
    """(Docs audit) --from abc said "invalid _sequence value: 'abc'": the name of a function inside the CLI."""
    command, flag = args
    done = run_cli(command, str(log_dir), flag, "1e3")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"aios-kernel audit {command}: error: argument {flag}: '1e3' is not a whole number")


# --------------------------------------------------------------------------- replay
def test_replay_blames_the_policy_option_not_the_pipeline_file(log_dir, tmp_path):
    policy = tmp_path / "nonexistent.toml"
    done = run_cli("replay", str(log_dir), "--pipeline", str(PIPELINES / "claims_triage.toml"),
                   "--policy", str(policy))
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"aios-kernel audit replay: --policy {policy}: cannot read: No such file or directory")


@pytest.mark.parametrize("sample, why", [("-1", "'-1': must be 0 (print none) or more"),
                                          ("ten", "'ten' is not a whole number")])
def test_replay_refuses_a_sample_size_that_is_no_count(log_dir, sample, why):
    """(Docs audit) --sample -1 was taken, printed no changed case and exited 0, as if none had changed."""
    done = run_cli("replay", str(log_dir), "--pipeline", str(PIPELINES / "claims_triage.toml"),
                   "--policy", str(PIPELINES / "policy.toml"), "--sample", sample)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == f"aios-kernel audit replay: error: argument --sample: {why}"


def test_replay_over_a_damaged_record_fails(log_dir):
    flip_byte_in_record(log_dir, 10)
    done = run_cli("replay", str(log_dir), "--pipeline", str(PIPELINES / "claims_triage.toml"),
                   "--policy", str(PIPELINES / "policy.toml"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "record 10 is damaged" in one_line(done.stderr) and "Traceback" not in done.stderr


def test_replay_never_writes_its_report_into_the_log_nor_over_a_file_unless_forced(log_dir, tmp_path):
    checkpoints = log_dir / "checkpoints.log"
    before = checkpoints.read_bytes()
    replay = ("replay", str(log_dir), "--pipeline", str(PIPELINES / "claims_triage.toml"),
              "--policy", str(PIPELINES / "policy.toml"))
    done = run_cli(*replay, "--report", str(checkpoints))
    assert done.returncode == 2 and checkpoints.read_bytes() == before and "inside" in one_line(done.stderr)
    report = tmp_path / "report.json"
    report.write_text("{}")
    done = run_cli(*replay, "--report", str(report))
    assert done.returncode == 2 and report.read_text() == "{}"
    assert one_line(done.stderr) == f"aios-kernel audit replay: --report {report} already exists; pass --force to " \
                                    "replace it"
    done = run_cli(*replay, "--report", str(report), "--force")
    assert done.returncode == 0, done.stderr
    assert "changed" in json.loads(report.read_text())


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["verify", "export", "replay"])
def test_every_option_has_a_help_text(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    lines = capsys.readouterr().out.split("options:", 1)[1].splitlines()
    for number, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        described = len(re.split(r"\s{2,}", line.strip())) > 1 or (
            number + 1 < len(lines) and lines[number + 1].startswith(" " * 8) and lines[number + 1].strip())
        assert described, f"{command}: {line.strip()} has no help text"


def test_a_key_file_in_the_directory_that_holds_no_key_is_named(log_dir):
    """(Operator walk-through) a garbage public-key.pem was skipped without a word: verify fell back to public-keys/."""
    (log_dir / "public-key.pem").write_text("garbage\n")
    done = run_cli("verify", str(log_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipped: {log_dir / 'public-key.pem'}: expected an Ed25519 public key" in done.stdout


def test_export_writes_a_keyed_decisions_request_hash_in_hex_as_every_other_hash(tmp_path):
    """An analyst's walk-through: `audit export` wrote `hash` and `prev_hash` in hex but a keyed decision's
    `request_hash` in base64 (proto3 JSON's bytes), so it matched neither the idempotency store's hex request hash
    nor anything else in the export. Real kernel, real keyed Decide."""
    import grpc
    from claims_support import build_small_model
    from conftest import start_claims_kernel

    from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
    from kernel.decision_client import make_request
    from kernel.store.idempotency import request_hash

    server = start_claims_kernel(build_small_model(tmp_path / "models"), tmp_path)
    request = make_request("claims_triage", {"claim_amount": 800.0}, idempotency_key="claim-1")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = kgrpc.DecisionServiceStub(channel).Decide(request, timeout=10)
    finally:
        server.stop(grace=1)
    out = tmp_path / "export.jsonl"
    done = run_cli("export", str(tmp_path / "data" / "audit"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(text) for text in out.read_text().splitlines()
               if json.loads(text)["sequence"] == answer.audit_sequence]
    assert line["request_hash"] == request_hash(request)
    assert line["hash"] == answer.audit_hash


def test_export_piped_into_a_reader_that_leaves_early_stops_quietly(tmp_path):
    """(Operator walk-through) `aios-kernel audit export DIR | head -1` printed "cannot write standard output: Broken
    pipe" and exited 2, as if the export had failed: the reader leaving is no error of the log or the command."""
    directory = tmp_path / "audit"
    build_log(directory, records=1500, checkpoint_every=500)  # far more lines than a pipe holds
    reader = subprocess.Popen([sys.executable, "-m", "kernel", "audit", "export", str(directory)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert json.loads(reader.stdout.readline())["sequence"] == 0
    reader.stdout.close()  # as `head -1` does after its line
    _, err = reader.communicate(timeout=120)
    assert reader.returncode == 141, err
    assert b"cannot write" not in err and b"Traceback" not in err, err


def test_since_and_until_in_iso_8601_name_the_very_microsecond(tmp_path):
    """(Time audit) --since/--until in ISO-8601 were read through float seconds, up to 256 ns off: a record at (or
    just before) the microsecond named was put on the wrong side of the bound."""
    from datetime import datetime, timezone

    from test_audit_verify import decision

    from kernel.audit import AuditLog

    second = int(datetime(2026, 11, 28, 5, 0, 0, tzinfo=timezone.utc).timestamp()) * 10**9
    # Microseconds whose float reading was too high (24 ns: --since left "at" out) and too low (152 ns: --until
    # left "before" out).
    for micro, option, kept in ((1, "--since", ["at", "after"]), (1999, "--until", ["before"])):
        directory = tmp_path / f"{option[2:]}-audit"
        at = second + micro * 1000
        with AuditLog.open(directory, checkpoint_records=1, checkpoint_ms=60_000) as log:
            for name, time_ns in (("before", at - 1), ("at", at), ("after", at + 1)):
                record = decision(1)
                record.request_id, record.time_unix_ns = name, time_ns
                log.append_and_wait(record, 10)
        done = run_cli("export", str(directory), option, f"2026-11-28T05:00:00.{micro:06d}Z")
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["request_id"] for line in done.stdout.splitlines()] == kept, (option, micro)


def test_export_gives_each_records_time_in_utc_too(tmp_path):
    """(Time audit) A reader of `audit export` met only ``time_unix_ns``, a 19-digit number: ``time`` is the same
    instant in ISO-8601, UTC, every nanosecond kept."""
    from test_audit_verify import decision

    from kernel.audit import AuditLog

    directory = tmp_path / "audit"
    with AuditLog.open(directory, checkpoint_records=1, checkpoint_ms=60_000) as log:
        record = decision(1)
        record.time_unix_ns = 1_795_842_000_000_001_999  # 2026-11-28 05:00:00 UTC and 1,999 ns
        log.append_and_wait(record, 10)
    done = run_cli("export", str(directory))
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(text) for text in done.stdout.splitlines()]
    assert (line["time_unix_ns"], line["time"]) == (1_795_842_000_000_001_999, "2026-11-28T05:00:00.000001999Z")
