"""The unsigned tail a start is about to sign: it must continue the log, as a crash leaves it.

Opening a log reads each record's frame and the hash stored at its end, which
is all the signed checkpoints need (recovery.py). Records after the last
checkpoint have no checkpoint to answer to, and the open signs them (the
adoption). What a crash leaves there are records the writer wrote: each one's
bytes hash to its stored hash, carries its position as ``sequence`` and chains
to the one before. A helper's audit copied a segment after the last one: the
start adopted and signed its 305 records, whose sequence numbers began again at
0, and ``audit verify`` failed on them from then on, under the kernel's own
signature. So before signing, the tail gets the checks ``audit verify`` makes of
every record; one that fails refuses the open, changing nothing. Only the tail
is walked: after a crash it is at most ``checkpoint_records`` records, or
``checkpoint_ms`` of them.
"""

from __future__ import annotations

import bisect
from hashlib import sha256
from pathlib import Path

from .errors import AuditCorrupt
from .record import AuditRecord, split_stored
from .segments import MAGIC, FrameScanner, frames_start, read_log_file


def check_unsigned_tail(segments: list[tuple[int, Path]], signed: int, size: int, previous: bytes,
                        directory: Path) -> None:
    """Raise ``AuditCorrupt`` unless records ``[signed, size)`` of ``segments`` (first sequence, path) each hash to
    their stored hash, carry their position as ``sequence`` and chain to the one before; ``previous`` is record
    ``signed - 1``'s hash (the genesis value for record 0, the archive base's last hash after an archive)."""
    if signed >= size:
        return
    firsts = [first for first, _ in segments]
    number = max(bisect.bisect_right(firsts, signed) - 1, 0)
    for first, path in segments[number:]:
        data = read_log_file(path)
        start = frames_start(path, data, MAGIC)
        sequence = first
        for _, payload in FrameScanner(data, len(MAGIC) if start is None else start, records=True):
            if sequence >= size:
                return
            if sequence >= signed:
                problem = _problem(payload, sequence, previous)
                if problem is not None:
                    raise AuditCorrupt(
                        f"the audit log in {directory} is damaged or was altered: records {signed}..{size - 1} follow "
                        f"its last signed checkpoint, and record {sequence} ({path.name}) {problem}; a crash leaves "
                        f"records that continue the log, so these were put there, and signing them would vouch for "
                        f"them. The log was not opened and nothing was changed on disk; run `aios-kernel audit verify "
                        f"{directory}` for details, and `aios-kernel audit export {directory} --from {signed}` to read "
                        f"them")
                previous = payload[-32:]
            sequence += 1


def _problem(payload: bytes, sequence: int, previous: bytes) -> str | None:
    try:
        canonical, stored = split_stored(payload)
    except ValueError:  # (recovery took only frames that end in their hash field: kept for a direct caller)
        return "does not end with its hash field"
    if sha256(b"\x00" + canonical).digest() != stored:
        return "does not hash to the hash stored with it"
    try:
        record = AuditRecord.FromString(canonical)
    except Exception:  # DecodeError, or upb's own error on malformed bytes
        return "is not a valid AuditRecord"
    if record.sequence != sequence:
        return f"carries sequence {record.sequence} (a record copied, moved or inserted)"
    if record.prev_hash != previous:
        return f"does not chain to record {sequence - 1} (its prev_hash is not that record's hash)"
    return None
