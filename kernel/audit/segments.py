"""Segment files: framing that makes a torn tail detectable, naming by first sequence, rotation.

A log directory holds segments named by the sequence number of their first
record (``00000000000000001234.seg``, zero-padded so names sort in order).
Each segment starts with ``MAGIC`` and then holds frames::

    uint32 length (little-endian) | uint32 crc32(payload) | payload (a stored record)

A crash can leave the last frames of the last segment incomplete or zeroed
(pages reach the disk in any order); the first frame whose header, length or
checksum is wrong marks where the valid log ends. Rotation happens between
records: the full segment is fsynced and closed, the next one created and the
directory fsynced, so only the last segment can ever have a torn tail.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from .errors import AuditCorrupt

MAGIC = b"AIOSAUD\x01"  # segment file format, version 1
CHECKPOINT_MAGIC = b"AIOSCKP\x01"  # the checkpoint file uses the same framing
HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
HEADER_BYTES = HEADER.size
MAX_PAYLOAD_BYTES = 1 << 30  # a larger length field is damage, not a record
SUFFIX = ".seg"
_NAME = re.compile(r"^(\d{20})\.seg$")

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


class FrameScanner:
    """Iterates ``(offset, payload)`` over the frames of a buffer from ``start``.

    Iteration stops at the end of the buffer or at the first invalid frame;
    afterwards ``end`` is the offset just past the last valid frame,
    ``problem`` says why scanning stopped early (None at a clean end) and
    ``torn`` is True when the data ends inside that frame (a cut, or a crash
    mid-write) rather than holding a complete frame with wrong bytes.
    """

    __slots__ = ("data", "start", "end", "problem", "torn")

    def __init__(self, data, start: int):
        self.data = data
        self.start = start
        self.end = start
        self.problem: str | None = None
        self.torn = False

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        data = self.data
        limit = len(data)
        offset = self.start
        while offset < limit:
            if limit - offset < HEADER_BYTES:
                self.problem = f"{limit - offset} bytes at offset {offset} are too few for a frame header"
                self.torn = True
                return
            length, checksum = unpack_header(data, offset)
            body = offset + HEADER_BYTES
            if length > MAX_PAYLOAD_BYTES or body + length > limit:
                self.problem = f"the frame at offset {offset} claims {length} bytes; {limit - body} remain"
                self.torn = length <= MAX_PAYLOAD_BYTES
                return
            payload = bytes(data[body:body + length])
            if crc32(payload) != checksum:
                self.problem = f"the frame at offset {offset} fails its checksum"
                return
            self.end = offset = body + length
            yield offset - HEADER_BYTES - length, payload


def frames_start(path: Path, data, magic: bytes = MAGIC) -> int | None:
    """Offset of the first frame in a file's bytes, after checking its header.

    None when the file is shorter than its header and holds a prefix of it: a
    crash while the file was being created (only allowed for the last file).
    """
    if data[: len(magic)] == magic:
        return len(magic)
    if len(data) < len(magic) and magic.startswith(bytes(data)):
        return None
    raise AuditCorrupt(f"{path}: does not start with the expected file header {magic!r}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AppendFile:
    """A file the writer appends frames to with plain ``os.write`` (no user-space buffer)."""

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
        """Open an existing file for appending, cutting it to ``size`` bytes first (a torn tail)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != size:
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
