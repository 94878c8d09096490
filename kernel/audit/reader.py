"""Reading records back: from a sequence number, with filters, optionally following the live tail.

``iter_log`` reads a live ``AuditLog`` (only durable records; with ``follow``
it waits for more), ``iter_directory`` reads a log directory with no writer
(a copy, an archive), stopping with a warning at a torn tail and raising
``AuditCorrupt`` at damage anywhere else; in a directory that archived
records (kernel/audit/base.py) it starts at its base, saying so. A segment's data ends
at a zero frame header (its preallocated zero tail) or at the end of the
file. Both check each frame's checksum and yield parsed ``AuditRecord``
messages, hash included.
Replay, export and StreamAudit are built on these.
"""

from __future__ import annotations

import bisect
import io
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2
from ..wire import encode_varint
from .errors import AuditCorrupt
from .record import split_stored
from .base import read_base
from .recovery import INDEX_EVERY, after_base, writer_is_live
from .segments import (HEADER_BYTES, MAGIC, FrameScanner, crc32, frames_start, list_segments, read_log_file,
                       unpack_header)

log = logging.getLogger("aios.audit")

_parse = kernel_pb2.AuditRecord.FromString
FOLLOW_POLL_S = 0.1  # how often a follower waiting for records looks at its stop signal
STOP_CHECK_EVERY = 256  # records between looks at the stop signal while reading back
# A batch ends once its records pass this many bytes (at least one record a batch): gRPC clients refuse messages
# over 4 MiB by default, and a follower refused one batch would get the same one again on every resume (a review
# audit: 4,096 records of ~1 kB, or a policy change's record of 167 kB among them).
BATCH_BYTES = 1 << 20


class RecordFilter:
    """Which records a reader wants; an unset criterion matches everything."""

    __slots__ = ("tenant", "pipeline", "kind", "since_unix_ns", "until_unix_ns")

    def __init__(self, tenant: str | None = None, pipeline: str | None = None, kind: int | None = None,
                 since_unix_ns: int | None = None, until_unix_ns: int | None = None):
        self.tenant = tenant or None
        self.pipeline = pipeline or None
        self.kind = kind or None
        self.since_unix_ns = since_unix_ns or None  # inclusive
        self.until_unix_ns = until_unix_ns or None  # exclusive

    @classmethod
    def of(cls, *criteria) -> "RecordFilter | None":
        """A filter, or None when no criterion is set (the reader then skips matching)."""
        wanted = cls(*criteria)
        return wanted if any(getattr(wanted, name) is not None for name in cls.__slots__) else None

    def matches(self, record: kernel_pb2.AuditRecord) -> bool:
        if self.tenant is not None and record.tenant != self.tenant:
            return False
        if self.pipeline is not None and record.pipeline != self.pipeline:
            return False
        if self.kind is not None and record.kind != self.kind:
            return False
        if self.since_unix_ns is not None and record.time_unix_ns < self.since_unix_ns:
            return False
        if self.until_unix_ns is not None and record.time_unix_ns >= self.until_unix_ns:
            return False
        return True


def _stop_signal(stop) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event) or hasattr(stop, "is_set"):
        return stop.is_set
    return stop


class _Cursor:
    """Reads stored records of a live log in order, one segment file at a time.

    Its read-ahead buffer may hold bytes past the last durable record: in a
    preallocated segment those are zeros the writer overwrites later, so the
    buffer is dropped (``forget_read_ahead``) before records written since are read.
    """

    __slots__ = ("_log", "_number", "_file", "sequence")

    def __init__(self, audit_log, sequence: int):
        self._log = audit_log
        segments = audit_log._segments
        firsts = [first for first, _ in segments]
        self._number = max(bisect.bisect_right(firsts, sequence) - 1, 0)
        first, path = segments[self._number]
        offset, at = len(MAGIC), first
        index = audit_log._index
        position = bisect.bisect_right(index, (sequence, 1 << 62)) - 1
        if position >= 0 and index[position][1] == self._number:
            at, _, offset = index[position]
        self._file = _open_at(path, offset)
        self.sequence = at
        while self.sequence < sequence:  # skip whole frames without reading their bodies
            length, _ = unpack_header(self._read(HEADER_BYTES))
            self._file.seek(length, 1)
            self.sequence += 1

    def _read(self, count: int) -> bytes:
        data = self._file.read(count)
        if len(data) != count:
            raise AuditCorrupt(f"{self._file.name}: ends inside record {self.sequence}, which is durable")
        return data

    def next_payload(self) -> bytes:
        header = self._file.read(HEADER_BYTES)
        if not any(header):  # the end of this segment (or its zero tail): the record is first in the next one
            self._file.close()
            self._number += 1
            first, path = self._log._segments[self._number]
            if first != self.sequence:
                raise AuditCorrupt(f"{path.name} starts at {first}, expected record {self.sequence}")
            self._file = _open_at(path, len(MAGIC))
            header = self._file.read(HEADER_BYTES)
        if len(header) != HEADER_BYTES:
            raise AuditCorrupt(f"{self._file.name}: ends inside record {self.sequence}, which is durable")
        length, checksum = unpack_header(header)
        payload = self._read(length)
        if crc32(payload) != checksum:
            raise AuditCorrupt(f"{self._file.name}: record {self.sequence} fails its checksum")
        self.sequence += 1
        return payload

    def forget_read_ahead(self) -> None:
        position = self._file.tell()
        raw = self._file.detach()
        raw.seek(position)
        self._file = io.BufferedReader(raw)

    def close(self) -> None:
        self._file.close()


def _open_at(path: Path, offset: int) -> io.BufferedReader:
    raw = io.FileIO(path, "rb")
    raw.seek(offset)
    return io.BufferedReader(raw)


def read_leaf_hashes(audit_log, start: int, count: int) -> bytes:
    """The stored hashes of durable records [start, start + count), concatenated: the Merkle tree's leaves it
    no longer keeps in memory (kernel/audit/merkle.py, ``keep_recent``)."""
    cursor = _Cursor(audit_log, start)
    try:
        return b"".join([split_stored(cursor.next_payload())[1] for _ in range(count)])
    finally:
        cursor.close()


def _stored(audit_log, from_sequence: int, follow: bool, stop) -> Iterator[bytes | None]:
    """The stored bytes of a live log's durable records from ``from_sequence``, and None each time the reader has
    caught up with the log (before it waits for more, following)."""
    stopped = _stop_signal(stop)
    sequence = max(from_sequence, 0)
    cursor = None
    try:
        while True:
            limit = audit_log.size
            if sequence >= limit:
                yield None
                if not follow:
                    return
                while not audit_log._await_record(sequence, FOLLOW_POLL_S):
                    if stopped() or audit_log.closed:
                        return
                continue
            if cursor is None:
                cursor = _Cursor(audit_log, sequence)
            else:
                cursor.forget_read_ahead()  # it may hold zeros where records were written since
            while sequence < limit:
                yield cursor.next_payload()
                sequence += 1
                if not sequence % STOP_CHECK_EVERY and stopped():
                    return
            if stopped():
                return
    finally:
        if cursor is not None:
            cursor.close()


def iter_log(audit_log, from_sequence: int, wanted: RecordFilter | None, follow: bool, stop) -> Iterator:
    """Durable records of a live log from ``from_sequence`` (see ``AuditLog.read``)."""
    for payload in _stored(audit_log, from_sequence, follow, stop):
        if payload is not None:
            record = _parse(payload)
            if wanted is None or wanted.matches(record):
                yield record


def iter_log_batches(audit_log, from_sequence: int, wanted: RecordFilter | None, follow: bool, stop,
                     max_records: int) -> Iterator[bytes]:
    """``iter_log``'s records as serialized ``AuditRecordBatch`` messages of at most ``max_records``, each sent as
    soon as the records read are all the log holds. Built from the stored bytes (a stored record is its complete
    serialization): a record is parsed only for a filter, never serialized again."""
    batch: list[bytes] = []
    size = 0
    for payload in _stored(audit_log, from_sequence, follow, stop):
        if payload is None:
            if batch:
                yield _batch_bytes(batch)
                batch, size = [], 0
            continue
        if wanted is not None and not wanted.matches(_parse(payload)):
            continue
        batch.append(payload)
        size += len(payload)
        if len(batch) >= max_records or size >= BATCH_BYTES:
            yield _batch_bytes(batch)
            batch, size = [], 0
    if batch:
        yield _batch_bytes(batch)


def _batch_bytes(payloads: list[bytes]) -> bytes:
    """``AuditRecordBatch`` on the wire: field 1 (``records``, length-delimited) once per record."""
    return b"".join([b"\x0a" + encode_varint(len(payload)) + payload for payload in payloads])


def iter_directory(directory: str | Path, from_sequence: int = 0, wanted: RecordFilter | None = None) -> Iterator:
    """Records of a log directory nobody is writing, from ``from_sequence``.

    Stops with a warning at a torn tail (the last segment's last record cut short, as a crash
    leaves it). Raises ``AuditCorrupt`` at any other bad frame, a torn-looking one with a valid
    frame after it included: the records after it exist but cannot be trusted, and stopping
    quietly would hide them.
    """
    directory = Path(directory)
    base = read_base(directory)
    segments, _ = after_base(list_segments(directory), base, directory)
    if base is not None and from_sequence < base.tree_size:  # (an export or a replay "from the start")
        log.warning("audit: %s: %s; reading from record %d on", directory, base.describe(), base.tree_size)
        from_sequence = base.tree_size
    for number, (first, path) in enumerate(segments):
        following = segments[number + 1][0] if number + 1 < len(segments) else None
        if following is not None and following <= from_sequence:
            continue
        data = read_log_file(path)
        start = frames_start(path, data, MAGIC)
        if start is None:
            if following is not None:  # only the newest segment can be caught being created
                raise AuditCorrupt(f"{path.name}: ends inside its file header, yet records {following} on follow it")
            return
        scanner = FrameScanner(data, start, records=True)
        sequence = first
        if from_sequence - first >= INDEX_EVERY:
            sequence, start = _skip(data, start, first, from_sequence)
            scanner = FrameScanner(data, start, records=True)
        for _, payload in scanner:
            if sequence >= from_sequence:
                try:
                    record = _parse(payload)
                except Exception:  # DecodeError, or upb's own error: a frame whose checksum holds but is no record
                    raise AuditCorrupt(f"{path.name}: record {sequence} is not a valid AuditRecord; records from "
                                       f"{sequence} on could not be read") from None
                if wanted is None or wanted.matches(record):
                    yield record
            sequence += 1
        if scanner.problem is not None:
            # A torn-looking frame with a valid one after it is damage too (recovery.py), unless a writer is
            # live: a reader racing it may see a later page of one write before an earlier one.
            problem = scanner.problem if following is not None or not scanner.torn else (
                None if writer_is_live(directory) else scanner.damage())
            if problem is not None:
                raise AuditCorrupt(f"{path.name}: record {sequence} is damaged ({problem}); "
                                   f"records from {sequence} on could not be read")
            log.warning("audit: %s ends in a torn record after %d (%s: a write a crash cut short); stopped there",
                        path.name, sequence - 1, scanner.problem)
            return


def _skip(data: bytes, offset: int, sequence: int, target: int) -> tuple[int, int]:
    """Walk frame headers (no checksums) from ``offset`` to the frame of record ``target``."""
    limit = len(data)
    while sequence < target and offset + HEADER_BYTES <= limit:
        length, _ = unpack_header(data, offset)
        if not length or offset + HEADER_BYTES + length > limit:  # the zero tail, or damage the scanner reports
            break
        offset += HEADER_BYTES + length
        sequence += 1
    return sequence, offset
