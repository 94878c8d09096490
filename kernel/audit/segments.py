"""Segment files: framing that makes a torn tail detectable, naming by first sequence, rotation, preallocation.

A log directory holds segments named by the sequence number of their first
record (``00000000000000001234.seg``, zero-padded so names sort in order).
Each segment starts with ``MAGIC`` and then holds frames::

    uint32 length (little-endian) | uint32 crc32(payload) | payload (a stored record)

followed, in a preallocated segment, by zeros up to the end of the file. A
record is never empty, so a header of all zeros (length 0) never starts a
real frame: it marks the clean end of the segment's data, and every byte
after it must be zero too (unused space, not damage). The writer keeps the
bytes ahead of its write position already written as zeros and fdatasynced
(``PREALLOCATE_BYTES`` at a time), and writes each group with ``pwrite`` at
the logical end: its fdatasync then overwrites allocated blocks and needs no
journalled file-size change (about half the cost of one after an append, on
this VM's ext4). A segment may therefore end in unused zeros, and files
written before preallocation (no zero tail) read the same way.

A crash can leave the last frames of the last segment incomplete, zeroed or
garbled (pages reach the disk in any order): the first frame whose header,
length or checksum is wrong, or non-zero bytes after the zero end marker,
mark where the valid log ends. Rotation happens between records: the full
segment is fsynced and closed, the next one created (zero-filled) and the
directory fsynced, so only the last segment can ever have a torn tail.
Whether bad bytes at the end are such a tail or damage inside the log
(``FrameScanner.damage``: a valid frame after them, or a complete frame
with wrong bytes) decides between cutting and refusing to open: see
``recovery`` for why. Nothing is cut unless ``check_cut`` agrees, and the
bytes cut are kept aside (``keep_torn_bytes``).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import stat
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..durable_files import fsync_dir  # (re-exported: the audit modules import it from here)
from .. import __version__
from .errors import AuditCorrupt, AuditFormatTooNew
from .record import HASH_BYTES, HASH_TRAILER, TRAILER_BYTES

# Segment format version 2: may end in unused zeros (preallocated). Version 1 (append-only, written
# before 2026-11-26) reads the same way; a version-1 segment the writer reopens is relabelled 2 before
# any zeros are written into it, so a kernel that knows only version 1 refuses it by its header
# instead of misreading its zeros as a damaged record.
MAGIC = b"AIOSAUD\x02"
MAGIC_V1 = b"AIOSAUD\x01"
CHECKPOINT_MAGIC = b"AIOSCKP\x01"  # the checkpoint file uses the same framing
HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
HEADER_BYTES = HEADER.size
MAX_PAYLOAD_BYTES = 1 << 30  # a larger length field is damage, not a record
PREALLOCATE_BYTES = 256 << 10  # zeros written ahead of the records at a time (bench/RESULTS.md: preallocated segments)
# frame_after's limits: the search of a torn tail a crash leaves never comes near them (a 4 MiB one of real records:
# ~0.05 s); bytes crafted to make it slow reach them in a few seconds (see there).
SEARCH_STEPS = 1 << 20  # offsets looked at (~1.5 s)
SEARCH_CHECKSUM_BYTES = 1 << 30  # bytes checksummed (~1 s)
_ZEROS = bytes(1 << 16)  # compared against with bytes.startswith (a memcmp): ~15 GB/s
SUFFIX = ".seg"
_NAME = re.compile(r"^(\d{20})\.seg$")
_NONZERO = re.compile(rb"[^\x00]")

log = logging.getLogger("aios.audit")

crc32 = zlib.crc32
pack_header = HEADER.pack
unpack_header = HEADER.unpack_from


def segment_name(first_sequence: int) -> str:
    return f"{first_sequence:020d}{SUFFIX}"


def frame(payload: bytes) -> bytes:
    return pack_header(len(payload), crc32(payload)) + payload


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first sequence, path) of every segment, in order; other files are ignored."""
    found = []
    for path in directory.iterdir():
        if path.suffix != SUFFIX:
            continue
        match = _NAME.match(path.name)
        if match is None:
            raise AuditCorrupt(f"{path}: not a segment name (expected 20 digits + {SUFFIX})")
        found.append((int(match.group(1)), path))
    found.sort()
    return found


def read_regular(path: Path) -> bytes:
    """The bytes of one of a log directory's files, which must be a regular file (or a link to one).

    A named pipe, a device or a socket where a segment, the checkpoint file, the archive base or a kept key is
    read (a crafted backup, an edited directory) held ``audit verify``, ``export`` and the kernel's start for good
    (a pipe's ``open`` waits for a writer) or filled the memory (a link to ``/dev/zero``): such a file raises
    ``OSError`` (EINVAL; a directory EISDIR, as reading it always did) before any byte is read, like a file that
    cannot be read. ``FileNotFoundError`` passes through as well.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # (O_NONBLOCK: a pipe's open returns at once)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "not a plain file")
            raise OSError(errno.EINVAL, f"{kind}, not a regular file: a log's files are plain files; nothing was read "
                                        "from it", str(path))
        os.set_blocking(fd, True)
        with io.FileIO(fd, "rb", closefd=False) as file:
            return file.readall()
    finally:
        os.close(fd)


# The most zeros the writer leaves after a segment's records: it writes the next chunk once fewer than half a chunk
# remain, so at most one and a half chunks (SegmentFile.write), and a chunk is at most 64 MiB (kernel/config.py's
# audit_preallocate_bytes). Twice that, to spare any doubt: more zeros at a segment's end were put there.
MAX_ZERO_TAIL_BYTES = 128 << 20
_READ_BACK_BYTES = 1 << 20  # the bytes read at a time while counting a segment's zeros from its end


def read_log_file(path: Path) -> bytes:
    """A segment's or the checkpoint file's bytes (``read_regular``), unless it ends in more zeros than a writer
    leaves, or holds a hole longer than a record can be: then ``AuditCorrupt`` naming the file, before it is read.

    Readers take such a file whole. One made larger after it was written (``truncate -s 100G``: a sparse file, no
    disk) made ``audit verify``, ``export``, ``archive`` and the kernel's start allocate all of it, a MemoryError
    traceback or an OOM kill (a red team's audit). (The checkpoint file is appended to, never preallocated: a crash
    leaves at most a frame of zeros at its end.) Only a file over ``MAX_ZERO_TAIL_BYTES`` is looked at: its holes
    (``SEEK_DATA``/``SEEK_HOLE``, a few calls) and the zeros at its end, read back from the last data; every file
    a writer leaves passes and is read exactly as before, so the scans see the same bytes.
    """
    check_log_file(path)
    return read_regular(path)


def check_log_file(path: Path) -> None:
    """``read_log_file``'s check alone, for a reader that copies the file before it reads it (a backup)."""
    found = os.stat(path)
    if stat.S_ISREG(found.st_mode) and found.st_size > MAX_ZERO_TAIL_BYTES:  # (anything else: read_regular refuses)
        _check_zero_runs(path, found.st_size)


def _check_zero_runs(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # (as read_regular: a pipe put there meanwhile)
    try:
        data_end = position = 0
        while position < size:  # the file's data extents; the gaps between them read as zeros
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break  # a hole to the end
            if start - position > MAX_PAYLOAD_BYTES:
                raise AuditCorrupt(f"{path}: a hole of {start - position:,} bytes at byte offset {position:,} "
                                   f"(the file is {size:,} bytes): more zeros than any record or preallocation "
                                   f"holds, so the file was made larger after it was written; nothing was read")
            data_end = position = os.lseek(fd, start, os.SEEK_HOLE)
        written = data_end  # back from the last data to its last non-zero byte
        while written:  # (a block at a time: written zeros too, to name where the records end)
            count = min(_READ_BACK_BYTES, written)
            block = os.pread(fd, count, written - count)
            written -= count
            kept = nonzero_end(block, 0)
            if kept:
                written += kept
                break
    finally:
        os.close(fd)
    if size - written > MAX_ZERO_TAIL_BYTES:
        keep = min(written + PREALLOCATE_BYTES, size)
        raise AuditCorrupt(
            f"{path}: its last {size - written:,} bytes (of {size:,}) are zeros after its records, more than a writer "
            f"leaves (at most {MAX_ZERO_TAIL_BYTES >> 20} MiB: a preallocation), so the file was made larger after it "
            f"was written (truncate, a copy tool); nothing was read past the records. Keep a copy and cut it to "
            f"{keep:,} bytes (`truncate -s {keep} {path}`): every record stays")


def zeros_from(data: bytes, offset: int) -> bool:
    """Whether every byte of ``data`` from ``offset`` on is zero (unused, preallocated space)."""
    limit = len(data)
    block = len(_ZEROS)
    while limit - offset >= block:
        if not data.startswith(_ZEROS, offset):
            return False
        offset += block
    return offset >= limit or data.endswith(_ZEROS[: limit - offset])


def nonzero_end(data: bytes, offset: int) -> int:
    """The offset just past the last non-zero byte at or after ``offset`` (``offset`` when all are zero)."""
    end = len(data)
    block = len(_ZEROS)
    while end - offset >= block and data.endswith(_ZEROS, end - block, end):
        end -= block
    return offset + len(data[offset:end].rstrip(b"\x00"))


class FrameScanner:
    """Iterates ``(offset, payload)`` over the frames of ``data`` (bytes) from ``start``.

    Iteration stops at the end of the data, at a zero header followed only by
    zeros (the clean end of a preallocated segment), or at the first invalid
    frame; afterwards ``end`` is the offset just past the last valid frame,
    ``problem`` says why scanning stopped early (None at a clean end) and
    ``torn`` is True when the bad bytes look like a write that did not finish
    (a cut, a crash mid-write, or a reader that raced the writer): the data
    ends inside the frame, the frame's last byte and everything after it are
    still zero, or non-zero bytes follow the zero end marker (pages of a
    group written out of order). A complete frame with wrong bytes and
    non-zero bytes to its end is damage, not torn.
    """

    __slots__ = ("data", "start", "end", "problem", "torn", "records")

    def __init__(self, data: bytes, start: int, records: bool = False):
        self.data = data
        self.start = start
        self.records = records  # the frames hold stored records (a segment): see frame_after
        self.end = start
        self.problem: str | None = None
        self.torn = False

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        data = self.data
        limit = len(data)
        offset = self.start
        while offset < limit:
            if limit - offset < HEADER_BYTES:
                if zeros_from(data, offset):
                    return  # the last few bytes of a preallocated segment: unused
                self.problem = f"{limit - offset} bytes at offset {offset} are too few for a frame header"
                self.torn = True
                return
            length, checksum = unpack_header(data, offset)
            body = offset + HEADER_BYTES
            if not length:  # records are never empty: the end of the data, or a header never fully written
                if checksum or not zeros_from(data, body):
                    self.problem = f"non-zero bytes follow the end of the records at offset {offset}"
                    self.torn = True
                return
            if length > MAX_PAYLOAD_BYTES or body + length > limit:
                self.problem = f"the frame at offset {offset} claims {length} bytes; {limit - body} remain"
                self.torn = length <= MAX_PAYLOAD_BYTES
                return
            payload = data[body:body + length]
            if crc32(payload) != checksum:
                self.problem = f"the frame at offset {offset} fails its checksum"
                self.torn = not data[body + length - 1] and zeros_from(data, body + length)
                return
            self.end = offset = body + length
            yield offset - HEADER_BYTES - length, payload

    def damage(self) -> str | None:
        """After the scan: None when what follows ``end`` is unused zeros or a torn tail, else why it is damage.

        A torn tail is ``torn`` *and* has no valid frame anywhere after the
        bad one (searched at every byte offset: the bad frame's length cannot
        be trusted). A complete frame with wrong bytes, or any valid frame
        after a bad one, is damage inside the data, not the end of a write a
        crash cut short (``recovery`` explains why that is the line). Only for
        files no writer is writing: a reader racing a writer can see a later
        page of one write before an earlier one.
        """
        if self.problem is None:
            return None
        try:
            after = frame_after(self.data, self.end, self.records)
        except SearchTooLong as exc:
            return (f"{self.problem}, and the {len(self.data) - self.end:,} bytes from there are more than a search "
                    f"for a valid frame after it can cover ({exc}): far more than a write a crash cuts short")
        if after is not None:
            return f"{self.problem}, yet a valid frame follows it at offset {after}"
        if not self.torn:
            return f"{self.problem}: whole bytes that are wrong, not a write cut short"
        return None


class SearchTooLong(Exception):
    """``frame_after`` gave up: the bytes after a bad frame would take longer to search than any a crash leaves."""


def frame_after(data: bytes, start: int, records: bool = False) -> int | None:
    """Offset of the first frame after ``start`` that is complete and passes its checksum, or None.
    ``records``: only frames that hold a stored record (ending in its hash field) count, as in a segment; a frame
    that holds anything else is no record a cut could lose, and checking the two bytes first spares the checksum
    of nearly every candidate.

    Every byte offset is tried (zero runs are skipped: a frame's length has a
    non-zero byte; so are offsets whose length would be 16 MiB or more where
    fewer bytes remain). Only bad bytes at the end of a file are searched this
    way, on open: a crash leaves at most the writes in flight, a group (fsync
    mode) or what was written since the last checkpoint (async), a few MB.

    Bytes chosen to make the search slow (a length that fits at every few
    offsets, each checksummed over up to the rest of the file) cost time that
    grows with the square of their size: 2 MiB of them held a kernel's start for
    three minutes (a helper's audit). Past ``SEARCH_STEPS`` offsets looked at or
    ``SEARCH_CHECKSUM_BYTES`` checksummed it raises ``SearchTooLong``, which
    ``damage`` reports as damage (no torn tail a crash leaves is that long: the
    log refuses to open, as for any damage, rather than cut what it cannot tell).
    """
    limit = len(data)
    view = memoryview(data)
    search = _NONZERO.search
    find = data.find
    steps = checksummed = 0
    offset = start + 1
    while offset + HEADER_BYTES < limit:
        if data[offset + 3] and limit - offset - HEADER_BYTES < 1 << 24:
            # Its length is 16 MiB or more, past the end: the next candidate has a zero fourth byte.
            zero = find(b"\x00", offset + 4)
            if zero < 0:
                return None
            offset = zero - 3
            continue
        length, checksum = unpack_header(data, offset)
        if not length:
            found = search(data, offset + 4)
            if found is None:
                return None
            offset = max(found.start() - 3, offset + 1)
            continue
        body = offset + HEADER_BYTES
        end = body + length
        if end <= limit and (not records or length >= TRAILER_BYTES and
                             data[end - TRAILER_BYTES:end - HASH_BYTES] == HASH_TRAILER):
            if crc32(view[body:end]) == checksum:
                return offset
            checksummed += length
        steps += 1
        if steps > SEARCH_STEPS or checksummed > SEARCH_CHECKSUM_BYTES:
            raise SearchTooLong(f"gave up at offset {offset} after checking {steps:,} offsets and checksumming "
                                f"{checksummed:,} bytes")
        offset += 1
    return None


def check_cut(path: Path, fd: int, size: int, length: int, records: bool = False) -> None:
    """Raise ``AuditCorrupt`` unless the bytes of ``fd`` from ``size`` to ``length`` are unused zeros or a torn
    tail: the check recovery made, made again on the bytes about to be cut (nothing is cut on a stale verdict).
    ``records``: a segment's (``FrameScanner``)."""
    tail = os.pread(fd, length - size, size)
    scanner = FrameScanner(tail, 0, records)
    for _ in scanner:
        problem = "a valid frame starts there"
        break
    else:
        problem = scanner.damage()
    if problem is not None:
        raise AuditCorrupt(f"{path}: refusing to cut it at byte offset {size}: the bytes there are not a torn tail "
                           f"({problem}, counting from that offset); nothing was changed on disk")


def keep_torn_bytes(path: Path, offset: int, length: int) -> Path:
    """Copy the ``length`` bytes from ``offset`` that a torn-tail repair is about to cut to ``<file>.torn-<time>``
    (fsynced), for inspection; returns the copy's path."""
    with open(path, "rb") as source:
        source.seek(offset)
        tail = source.read(length)
    kept = path.with_name(f"{path.name}.torn-{time.time_ns()}")
    with open(kept, "xb") as copy:
        copy.write(tail)
        copy.flush()
        os.fsync(copy.fileno())
    fsync_dir(path.parent)
    log.warning("audit: the %d bytes cut from %s are kept in %s", len(tail), path.name, kept.name)
    return kept


def frames_start(path: Path, data: bytes, magic: bytes = MAGIC) -> int | None:
    """Offset of the first frame in a file's bytes, after checking its header.

    None when the file holds a prefix of its header and then only zeros (or
    nothing): a crash while the file was being created (only allowed for the
    last file). No record is ever written before the header is on disk.
    """
    if data[: len(magic)] == magic or (magic == MAGIC and data[: len(MAGIC_V1)] == MAGIC_V1):
        return len(magic)
    family, version = magic[:-1], magic[-1]
    if len(data) >= len(magic) and data[:len(family)] == family and data[len(family)] > version:
        raise AuditFormatTooNew(
            f"{path}: file format {data[len(family)]} was written by a newer aios-kernel; this one ({__version__}) "
            f"reads format{'s 1–' if version > 1 else ' '}{version}: run a kernel at least as new as the one that "
            "wrote it (nothing was read or changed)")
    written = nonzero_end(data, 0)
    if written <= len(magic) and magic.startswith(data[:written]):
        return None
    raise AuditCorrupt(f"{path}: does not start with the expected file header {magic!r}")


class AppendFile:
    """The checkpoint file: frames appended with plain ``os.write`` (no user-space buffer).

    It stays append-only: a checkpoint is one small frame per interval, fsynced at most once
    per interval, so zero-filling it ahead would save one cheap journal commit a second.
    """

    __slots__ = ("path", "fd", "size")

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size

    @classmethod
    def create(cls, path: Path, magic: bytes) -> "AppendFile":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            os.write(fd, magic)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        fsync_dir(path.parent)
        return cls(path, fd, len(magic))

    @classmethod
    def reopen(cls, path: Path, size: int) -> "AppendFile":
        """Open an existing file for appending, cutting it to ``size`` bytes first (a torn tail, checked again)."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            length = os.fstat(fd).st_size
            if length != size:
                check_cut(path, fd, size, length)
                os.ftruncate(fd, size)
            # Records an async-mode writer left in the page cache become durable before any
            # checkpoint can cover them.
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size)

    def write(self, data) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, very large buffers)
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def gone(self) -> str | None:
        """Why the file open here is no longer the file at ``path`` (deleted, renamed, replaced), or None.

        Writes to a deleted file succeed and even fsync: only the link count of the open file, or a
        different file (inode) at its path, tells that they will be lost when the descriptor closes.
        """
        held = os.fstat(self.fd)
        try:
            there = os.stat(self.path)
        except OSError as exc:  # ENOENT: deleted, or renamed away (with its directory, maybe); ENOTDIR: a file there
            if held.st_nlink == 0:
                return f"{self.path} was deleted"
            return f"{self.path} is no longer there ({exc.strerror})"
        if (there.st_ino, there.st_dev) != (held.st_ino, held.st_dev):
            return f"{self.path} was replaced by another file"
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:  # pwrite may write less than asked (signals, very large buffers)
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class SegmentFile(AppendFile):
    """The segment the writer fills: frames go at the logical end (``size``) with ``pwrite``.

    With ``chunk`` > 0 the bytes from ``size`` up to ``zeroed`` are already
    written as zeros: when a write leaves less than half a chunk of them, the
    next chunk (capped at ``limit``, the segment size) is written at once, in
    the same group, so that group's fdatasync commits the file-size change
    and the groups after it overwrite allocated blocks (no journal commit).
    ``chunk`` 0 appends (the file grows with every group): the format before
    preallocation, kept as the benchmark's baseline.
    """

    __slots__ = ("zeroed", "chunk", "limit")  # (sync and close as AppendFile's)

    def __init__(self, path: Path, fd: int, size: int, zeroed: int, chunk: int, limit: int):
        super().__init__(path, fd, size)  # size: the logical end, just past the last frame
        self.zeroed = zeroed  # the file's length: zeros from size to here
        self.chunk = chunk
        self.limit = limit

    @classmethod
    def create(cls, path: Path, magic: bytes, chunk: int, limit: int, dir_fd: int = -1) -> "SegmentFile":
        """A new segment at ``path``; ``dir_fd``: its folder, open already (the writer's: a rotation then needs no
        descriptor but the new file's), else it is opened to fsync the new name."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            # The header and the first chunk of zeros in one write and the creation's one fsync.
            zeroed = max(min(chunk, limit), len(magic))
            try:
                _pwrite_all(fd, magic + bytes(zeroed - len(magic)), 0)
            except OSError as exc:
                if zeroed == len(magic):
                    raise
                # No room for the zeros (a full disk): the header alone, and the segment goes on without them, as
                # write() does when zeros fail (a session review: the rotation fail-stopped the log instead).
                os.ftruncate(fd, 0)
                _pwrite_all(fd, magic, 0)
                log.warning("audit: %s: could not write zeros ahead of the records (%s); this segment goes on "
                            "without preallocation", path.name, exc.strerror or exc)
                zeroed, chunk = len(magic), 0
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            # Ours alone (O_EXCL), and nothing in it yet: a header cut short (a full disk) failed every verify
            # afterwards, "ends inside its file header" (a crash audit).
            try:
                path.unlink()
            except OSError:
                pass
            raise
        if dir_fd >= 0:
            os.fsync(dir_fd)
        else:
            fsync_dir(path.parent)
        return cls(path, fd, len(magic), zeroed, chunk, limit)

    @classmethod
    def reopen(cls, path: Path, size: int, cut: bool, chunk: int, limit: int) -> "SegmentFile":
        """Open an existing segment whose data ends at ``size``.

        ``cut``: the bytes after ``size`` are a torn tail: the file is cut to
        ``size`` (the next write zero-fills again), after ``check_cut`` agrees
        (``AuditCorrupt`` otherwise, the file untouched). Otherwise they are
        zeros (checked by recovery) and are kept: writing continues inside them.
        """
        fd = os.open(path, os.O_RDWR)
        try:
            length = os.fstat(fd).st_size
            if cut and length != size:
                check_cut(path, fd, size, length, records=True)
            if os.pread(fd, len(MAGIC_V1), 0) == MAGIC_V1:  # see MAGIC: zeros go only into version-2 files
                _pwrite_all(fd, MAGIC, 0)
            if cut and length != size:
                os.ftruncate(fd, size)
                length = size
            # Records an async-mode writer left in the page cache become durable before any
            # checkpoint can cover them.
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, length, chunk, limit)

    def write(self, data) -> None:
        size = self.size
        _pwrite_all(self.fd, data, size)
        self.size = size = size + len(data)
        if self.zeroed < size:
            self.zeroed = size  # appended past the zeros (chunk 0, or a group larger than the room left)
        chunk = self.chunk
        if chunk and self.zeroed - size < chunk >> 1 and self.zeroed < self.limit:
            try:
                self._zero_fill(chunk)
            except OSError as exc:
                # The records are written: zeros ahead of them only make the next fsyncs cheaper. Failing the
                # group for them (a full disk) answered its callers UNAVAILABLE for records the next start then
                # adopted and signed (a crash audit); this segment goes on without them.
                self.chunk = 0
                log.warning("audit: %s: could not write zeros ahead of the records (%s); this segment goes on "
                            "without preallocation", self.path.name, exc.strerror or exc)

    def erase_from(self, size: int) -> None:
        """Cut the file back to ``size`` after a write that failed, best effort: records its callers are told were
        not written must not be found, adopted and signed by the next start."""
        try:
            os.ftruncate(self.fd, size)  # (frees space: it works on a full disk)
            os.fdatasync(self.fd)
        except OSError as exc:
            log.error("audit: %s: could not cut the failed group's records back off (%s); the next start may "
                      "adopt them", self.path.name, exc.strerror or exc)
            return
        self.size = self.zeroed = size

    def _zero_fill(self, chunk: int) -> None:
        end = min(self.zeroed + chunk, self.limit)
        _pwrite_all(self.fd, _zeros(end - self.zeroed), self.zeroed)
        self.zeroed = end


_zero_chunks: dict[int, bytes] = {}


def _zeros(count: int) -> bytes:
    """A zero buffer of ``count`` bytes, kept for reuse (a chunk is written many times over a log's life)."""
    zeros = _zero_chunks.get(count)
    if zeros is None:
        zeros = bytes(count)
        if len(_zero_chunks) < 8:
            _zero_chunks[count] = zeros
    return zeros
