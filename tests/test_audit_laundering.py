"""Records a restart signed after the fact are on the log, and ``audit verify`` says so.

Found by a compliance audit (2026-11-27): an insider who can write the data directory, without the key,
cut ``checkpoints.log`` inside an early checkpoint (as a crash tears the last one), changed a decision,
re-chained every record after it and restarted the kernel: it adopted the 21 "unsigned" records, a clean
"kernel stopping" among them, signed them, and ``verify --strict --from-key`` passed with the forged
action on the log. The start records what it adopted; verify lists it, and ``--strict`` fails a range that
holds a clean stop (a clean stop signs every record, so its checkpoints were cut). A log cut back to one of
its own checkpoints is a valid shorter log: ``--min-records`` catches it against a size noted before.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from claims_support import claim_request
from conftest import start_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.audit import verify_directory
from kernel.audit.checkpoints import read_all
from kernel.audit.segments import CHECKPOINT_MAGIC, frames_start
from test_audit_verify import forge, read_frames, run_cli, segment, write_frames

CASE = data.generate_cases(1, seed=7)[0]


def _run_kernel(models: Path, folder: Path, decisions: int) -> None:
    """A kernel over ``folder`` that makes ``decisions`` decisions and stops cleanly."""
    server = start_claims_kernel(models, folder, audit_checkpoint_records=5)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = kgrpc.DecisionServiceStub(channel)
            for n in range(decisions):
                stub.Decide(claim_request(CASE, request_id=f"r{n}"), timeout=30)
    finally:
        server.stop(grace=2)


def _checkpoint_frames(audit: Path) -> tuple[bytes, list[bytes], list[int]]:
    """checkpoints.log as (header, frames, each frame's tree size)."""
    path = audit / "checkpoints.log"
    data = path.read_bytes()
    offset = start = frames_start(path, data, CHECKPOINT_MAGIC)
    frames = []
    while offset < len(data) and (length := int.from_bytes(data[offset:offset + 4], "little")):
        frames.append(data[offset:offset + 8 + length])
        offset += 8 + length
    return data[:start], frames, [c.tree_size for c in read_all(audit)[0]]


def _cut_checkpoints_inside(audit: Path, number: int) -> None:
    """Truncate checkpoints.log halfway into checkpoint ``number``'s frame: what a torn last write looks like."""
    header, frames, _sizes = _checkpoint_frames(audit)
    (audit / "checkpoints.log").write_bytes(header + b"".join(frames[:number]) + frames[number][:len(frames[number]) // 2])


def _rewrite_and_rechain(audit: Path, sequence: int, action: str) -> None:
    magic, payloads = read_frames(segment(audit))
    payloads = [p for p in payloads if p]  # (the zero tail of a preallocated segment reads as empty frames)
    previous = None
    for index, payload in enumerate(payloads):
        record = pb.AuditRecord.FromString(payload)
        if index == sequence:
            record.decision.action = action
        if previous is not None:
            record.prev_hash = previous
        if index >= sequence:
            payloads[index] = forge(record)
        previous = pb.AuditRecord.FromString(payloads[index]).hash
    write_frames(segment(audit), magic, payloads)


def test_records_a_restart_signed_after_their_checkpoints_were_cut_fail_strict_verify(claims_models, tmp_path):
    folder = tmp_path / "kernel"
    _run_kernel(claims_models, folder, 12)
    audit = folder / "data" / "audit"
    trusted = tmp_path / "trusted.pem"
    trusted.write_bytes((audit / "public-key.pem").read_bytes())
    size = verify_directory(audit, strict=True).records
    assert verify_directory(audit, strict=True).ok

    _cut_checkpoints_inside(audit, 2)
    _rewrite_and_rechain(audit, 6, "pay_everything")
    _run_kernel(claims_models, folder, 1)  # the restart adopts the "unsigned" records and signs them

    done = run_cli("verify", str(audit), "--from-key", str(trusted))
    assert done.returncode == 0, done.stdout + done.stderr  # a crash can leave an adopted range: no failure
    assert "were signed by the start at #" in done.stdout and "after an unclean stop" in done.stdout
    assert "is a clean stop: --strict fails here" in done.stdout
    done = run_cli("verify", str(audit), "--strict", "--from-key", str(trusted))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "a clean stop signs every record it wrote: the checkpoints that covered them were cut" in done.stdout
    result = verify_directory(audit, strict=True)
    assert result.first_bad_sequence <= 6 <= result.last_bad_sequence < size  # the forged record is in the range


def test_a_log_cut_back_to_one_of_its_checkpoints_fails_against_a_size_noted_before(claims_models, tmp_path):
    folder = tmp_path / "kernel"
    _run_kernel(claims_models, folder, 12)
    audit = folder / "data" / "audit"
    noted = verify_directory(audit).records
    magic, payloads = read_frames(segment(audit))
    payloads = [p for p in payloads if p]
    kept = 10  # a checkpoint every 5 records: 10 is one of its tree sizes
    write_frames(segment(audit), magic, payloads[:kept])
    header, frames, sizes = _checkpoint_frames(audit)
    assert kept in sizes
    (audit / "checkpoints.log").write_bytes(header + b"".join(f for f, size in zip(frames, sizes) if size <= kept))

    shorter = run_cli("verify", str(audit))
    assert shorter.returncode == 0, shorter.stdout  # a valid shorter log, as far as its own files tell ...
    assert "does not end with a 'kernel stopping' record" in shorter.stdout
    done = run_cli("verify", str(audit), "--min-records", str(noted))
    assert done.returncode == 1 and f"the log holds {kept} records, fewer than the {noted} expected" in done.stdout


def test_an_unreadable_file_fails_in_words_not_a_traceback(claims_models, tmp_path):
    folder = tmp_path / "kernel"
    _run_kernel(claims_models, folder, 2)
    audit = folder / "data" / "audit"
    (audit / "checkpoints.log").unlink()
    (audit / "checkpoints.log").mkdir()
    done = run_cli("verify", str(audit))
    assert done.returncode == 1 and "cannot read the log" in done.stdout and "Traceback" not in done.stderr


def test_many_ranges_signed_after_unclean_stops_are_summed_up_in_one_sentence(tmp_path):
    """(Crash audit) verify's OK line listed every range a start signed after an unclean stop: several KB after 25
    crashes. Up to three are listed; more are summed up (a range holding a clean stop is always named)."""
    from kernel.audit.verify import MAX_RANGES_LISTED, _Walk

    walk = _Walk(tmp_path)
    walk.adopted = [(100 * k + 10, 100 * k, 100 * k + 5) for k in range(1, 26)]
    walk.recovery_notes(strict=False)
    assert walk.note == ("25 ranges of records from 100 to 2505 were signed by starts after unclean stops (the last "
                         "at #2510): only the hash chain vouched for each until then")
    few = _Walk(tmp_path)
    few.adopted = walk.adopted[:MAX_RANGES_LISTED]
    few.stops = [202]  # a clean stop inside the second range: named whatever the count
    few.recovery_notes(strict=False)
    assert few.note.count("were signed by the start at #") == MAX_RANGES_LISTED
    assert "record #202 among them is a clean stop: --strict fails here" in few.note
