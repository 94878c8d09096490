"""The archive base: what a log directory keeps of the records it archived (``aios-kernel audit archive``).

Archiving moves whole segments, records ``[0, b)``, out of the live
directory. What the live log still needs of them is small and fixed:

- ``tree_size`` b and the **peaks** of ``[0, b)``: the hashes of the complete
  subtrees its size's binary digits make (at most 64). Every Merkle root of a
  size ≥ b, every inclusion proof of a record ≥ b and every consistency proof
  from a size ≥ b uses, of the archived records, only those peaks and nodes
  built from them and newer leaves (``MerkleTree``; the property test checks
  it against the full tree);
- ``last_hash``, the hash of record b - 1, which record b's ``prev_hash``
  names (the chain), with its inclusion proof in the tree of size b;
- a **checkpoint** for tree size b, signed by the log's key when archiving:
  the peaks fold to its root and the last hash is proven in it, so nobody
  without the key can change the base without the open and ``audit verify``
  refusing it. The same checkpoint closes the archive's own checkpoint file,
  so the archive verifies on its own and both halves name one signed state;
- an **archive signature**, by the archive's key, over a statement that names
  the same size, root and last hash (``archive_statement``). The checkpoint
  alone does not tell an archive's base from one anyone can make: the log's
  own ``checkpoints.log`` signs a tree head every few records, and with one at
  a segment boundary, the records' hashes and the segments before it deleted,
  a base checks out in every other field (a helper's audit: records 0..188
  removed, and ``audit verify --strict`` said "archived, under the signed
  base"). No checkpoint signs this statement's text, so only the key makes it.
  A base an archive of a release before 2026-11-28 wrote has none: the start
  warns, ``audit verify`` notes it and ``--strict`` fails until ``audit
  archive --accept-base`` signs it.

The file is JSON (``archive-base.json``), written once per archive: a temporary
file, fsynced, renamed over the old one, and the directory fsynced.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..durable_files import replace_whole
from .._proto.aios.kernel.v1 import kernel_pb2
from .checkpoints import Checkpoint, signature_ok
from .errors import AuditCorrupt, AuditFormatTooNew
from .keys import signature_valid
from .merkle import fold_peaks, verify_inclusion
from .segments import read_regular

FILE_NAME = "archive-base.json"
ARCHIVE_MARKER = "archive.json"  # in an archive (the archive command's DEST): what it holds, where it came from
FORMAT = 1
ARCHIVE_ORIGIN = "aios-kernel/audit/v1/archive-base"  # (a checkpoint's text starts "aios-kernel/audit/v1")
_UNTOUCHED = "The log was not opened and nothing was changed on disk; the archive it names holds the records"


@dataclass(frozen=True)
class ArchiveBase:
    tree_size: int  # records [0, tree_size) are archived
    peaks: tuple[tuple[int, bytes], ...]  # (height, hash) of the complete subtrees of [0, tree_size), tallest first
    last_hash: bytes  # hash of record tree_size - 1
    last_proof: tuple[bytes, ...]  # its inclusion proof in the tree of size tree_size
    checkpoint: kernel_pb2.Checkpoint  # signed, for tree size tree_size
    archive: str  # where the records went, as the operator named it (for messages)
    archived_unix_ns: int
    archive_signature: bytes = b""  # over archive_statement(...), by archive_key_id; b"": none (see the docstring)
    archive_key_id: str = ""
    # The cut was the log's end (every record archived, the kernel stopped): the next record must follow a kernel's
    # open, as after a clean stop (verify.py). Signed with the statement; False where unknown (an unsigned base).
    ends_log: bool = False

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "tree_size": self.tree_size,
            "peaks": [{"height": height, "hash": digest.hex()} for height, digest in self.peaks],
            "last_hash": self.last_hash.hex(),
            "last_proof": [digest.hex() for digest in self.last_proof],
            "checkpoint": base64.b64encode(self.checkpoint.SerializeToString()).decode(),
            "archive": self.archive,
            "archived_unix_ns": self.archived_unix_ns,
            **({"archive_signature": self.archive_signature.hex(), "archive_key_id": self.archive_key_id,
                "ends_log": self.ends_log} if self.archive_signature else {}),
        }, indent=1) + "\n"

    def statement(self) -> bytes:
        return archive_statement(self.tree_size, self.checkpoint.root_hash, self.last_hash,
                                 self.checkpoint.time_unix_ns, self.ends_log)

    def signed_by(self, key) -> "ArchiveBase":
        """This base with the archive signature of ``key`` (a ``SigningKey``)."""
        return replace(self, archive_signature=key.sign(self.statement()), archive_key_id=key.key_id)

    def unsigned(self) -> str | None:
        """Why a base without an archive signature cannot be told from a forged one (None when it has one)."""
        if self.archive_signature:
            return None
        return (f"{FILE_NAME} (records 0..{self.tree_size - 1} archived) carries no archive signature: `aios-kernel "
                f"audit archive` of a release before 2026-11-28 wrote it, or someone without the key made it out of "
                f"one of the log's own checkpoints and deleted those records; check them against the archive it "
                f"names ({self.archive or '?'}: `aios-kernel audit verify ARCHIVE --strict --min-records "
                f"{self.tree_size}`), then have `aios-kernel audit archive LOG_DIR NEW_FOLDER --before 0 "
                f"--accept-base` sign it")

    def describe(self) -> str:
        return f"records 0..{self.tree_size - 1} were archived (to {self.archive})"


def archive_statement(tree_size: int, root_hash: bytes, last_hash: bytes, checkpoint_time_unix_ns: int,
                      ends_log: bool) -> bytes:
    """The exact bytes a base's archive signature covers (never a checkpoint's: another first line)."""
    encode = base64.b64encode
    return (f"{ARCHIVE_ORIGIN}\n{tree_size}\n{encode(root_hash).decode()}\n{encode(last_hash).decode()}\n"
            f"{checkpoint_time_unix_ns}\n{'log end' if ends_log else 'within the log'}\n").encode()


def peak_heights(size: int) -> list[int]:
    """Heights of the complete subtrees [0, size) splits into, tallest first (its binary digits)."""
    return [height for height in range(size.bit_length() - 1, -1, -1) if size >> height & 1]


def _parse(path: Path, text: bytes) -> ArchiveBase:
    try:
        data = json.loads(text)  # (bytes: bytes that are not UTF-8 are a ValueError here, with the others)
        if data.get("format", 0) > FORMAT:
            raise AuditFormatTooNew(f"{path}: archive base format {data['format']} was written by a newer "
                                    f"aios-kernel; this one reads format {FORMAT}")
        base = ArchiveBase(
            tree_size=int(data["tree_size"]),
            peaks=tuple((int(peak["height"]), bytes.fromhex(peak["hash"])) for peak in data["peaks"]),
            last_hash=bytes.fromhex(data["last_hash"]),
            last_proof=tuple(bytes.fromhex(digest) for digest in data["last_proof"]),
            checkpoint=Checkpoint.FromString(base64.b64decode(data["checkpoint"], validate=True)),
            archive=str(data.get("archive", "")),
            archived_unix_ns=int(data.get("archived_unix_ns", 0)),
            archive_signature=bytes.fromhex(data.get("archive_signature", "")),
            archive_key_id=str(data.get("archive_key_id", "")),
            ends_log=data.get("ends_log") is True,
        )
    except AuditFormatTooNew:
        raise
    except Exception as exc:  # JSON, key, type, hex, base64 or protobuf errors: all mean the file is not a base
        raise AuditCorrupt(f"{path}: not a readable archive base ({type(exc).__name__}: {exc})") from None
    # The shape first (a tree is built from it before the signature can be checked): see check_base for the rest.
    if base.tree_size < 1 or [height for height, _ in base.peaks] != peak_heights(base.tree_size) or \
            any(len(digest) != 32 for _, digest in base.peaks):
        raise AuditCorrupt(f"the audit log in {path.parent} is damaged or was altered: {path}: its peaks are not "
                           f"those of a tree of {base.tree_size} records. {_UNTOUCHED}")
    return base


def read_base(directory: Path) -> ArchiveBase | None:
    """The directory's archive base, or None when nothing was archived from it."""
    path = directory / FILE_NAME
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return None
    return _parse(path, data)


def base_problem(base: ArchiveBase, public_key_for: Callable[[str], bytes | None]) -> str | None:
    """Why the base is not sound (None when it is): peaks that fold to the root its checkpoint signs, the last
    hash proven in it, and a signature that verifies with the key it names (``public_key_for(key_id)``; None =
    no trusted key for it, itself a problem: a base nothing vouches for would let anyone choose the archived
    past). Its shape was checked when it was read."""
    checkpoint = base.checkpoint
    if checkpoint.tree_size != base.tree_size:
        return f"its checkpoint is for tree size {checkpoint.tree_size}, not {base.tree_size}"
    if fold_peaks([digest for _, digest in base.peaks]) != checkpoint.root_hash:
        return "its peaks do not fold to the root its checkpoint signs"
    if not verify_inclusion(base.last_hash, base.tree_size - 1, base.tree_size, list(base.last_proof),
                            checkpoint.root_hash):
        return f"the hash it keeps of record {base.tree_size - 1} is not proven in that root"
    public = public_key_for(checkpoint.key_id)
    if public is None:
        return f"its checkpoint was signed by key {checkpoint.key_id or '?'}, which is not among the trusted keys"
    if not signature_ok(checkpoint, public):
        return f"its checkpoint's signature does not verify with key {checkpoint.key_id}"
    if base.archive_signature:
        public = public_key_for(base.archive_key_id)
        if public is None:
            return (f"its archive signature is by key {base.archive_key_id or '?'}, which is not among the trusted "
                    f"keys")
        if not signature_valid(public, base.archive_signature, base.statement()):
            return f"its archive signature does not verify with key {base.archive_key_id}"
    return None


def check_base(base: ArchiveBase, directory: Path, public_key_for: Callable[[str], bytes | None]) -> None:
    """``AuditCorrupt`` (the open's refusal) unless ``base_problem`` finds nothing."""
    problem = base_problem(base, public_key_for)
    if problem is not None:
        raise AuditCorrupt(f"the audit log in {directory} is damaged or was altered: {directory / FILE_NAME}: "
                           f"{problem}. {_UNTOUCHED}")


def write_base(directory: Path, base: ArchiveBase) -> None:
    """Replace the directory's base atomically (temporary file, fsync, rename, directory fsync)."""
    replace_whole(directory / FILE_NAME, base.to_json().encode("utf-8"))
