"""The open's first pass over a segment: every frame that is whole, sound and ends in its hash field, in one go.

Opening a log reads every record ever written (recovery.py): ~3.7 s per million records on the benchmark VM, about
60 % of it this walk in Python (a generator step, a slice, a checksum and a function call per record). This pass
takes the frames a full scan would accept without a word — whole, checksum right, the hash field last — and stops
at the first that is anything else (the zero header that ends the records, a torn or damaged frame, a record with
no hash field): ``FrameScanner`` and the open's own checks take over from there and say what it is, exactly as
before. ``ext/auditscan.pyx`` is its compiled twin (tests/test_audit_scan.py compares both on random segments).
"""

from __future__ import annotations

from .record import HASH_BYTES, HASH_TRAILER, TRAILER_BYTES
from .segments import HEADER_BYTES, MAX_PAYLOAD_BYTES, crc32, unpack_header


def scan_sound(data: bytes, start: int, sequence: int, index_mask: int, number: int, leaves: bytearray,
               index: list) -> tuple[int, int]:
    """Walk the frames of ``data`` from ``start`` while each is sound; append each record's stored hash to
    ``leaves`` and, for each ``sequence`` with no bit of ``index_mask`` set, ``(sequence, number, offset)`` to
    ``index``. Returns (the offset where it stopped, the next sequence)."""
    limit = len(data)
    offset = start
    while limit - offset >= HEADER_BYTES:
        length, checksum = unpack_header(data, offset)
        body = offset + HEADER_BYTES
        end = body + length
        if length < TRAILER_BYTES or length > MAX_PAYLOAD_BYTES or end > limit:
            break
        if crc32(memoryview(data)[body:end]) != checksum:
            break
        if data[end - TRAILER_BYTES:end - HASH_BYTES] != HASH_TRAILER:
            break
        if not sequence & index_mask:
            index.append((sequence, number, offset))
        leaves += data[end - HASH_BYTES:end]
        sequence += 1
        offset = end
    return offset, sequence

