"""``archive.json``: what an archive (``aios-kernel audit archive``'s DEST) holds, signed by the archive.

An archive ends where it was cut, not at a clean stop, so ``audit verify``
does not give it the note a log that ends without a "kernel stopping" record
gets ("crashed, or records were removed back to a checkpoint"). The file
alone does not tell an archive from a live log cut back to one of its own
checkpoints: the end and the root it names are in ``checkpoints.log``, and
anyone who could write the directory could write it and silence the one note
that told the cut (a helper's audit). So the archive signs, with the log's
key, a statement naming its first record, its end and the root there
(``marker_statement``; no checkpoint or base signs that text). A marker with
no signature (an archive of a release before 2026-11-28 wrote it), or one
signed by a key not trusted (anyone's own, or a key of a rotation the auditor
did not pass), still has its end and root checked, but verify notes it and
keeps the cut's note; one whose signature a trusted key does not verify, or
signed for other records than the directory holds, fails.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import ARCHIVE_MARKER as FILE_NAME
from .keys import signature_valid
from .segments import read_regular

ORIGIN = "aios-kernel/audit/v1/archive"  # (a base's statement starts ".../archive-base", a checkpoint's otherwise)


@dataclass(frozen=True)
class ArchiveMarker:
    first: int  # the archive's first record (records before it went to an earlier archive)
    end: int  # its records end before this one
    root: bytes  # the root of the tree of ``end`` records
    signature: bytes = b""  # over marker_statement(first, end, root), by key_id; b"": none (an earlier release's)
    key_id: str = ""


def marker_statement(first: int, end: int, root: bytes) -> bytes:
    """The exact bytes an archive marker's signature covers."""
    return f"{ORIGIN}\n{first}\n{end}\n{base64.b64encode(root).decode()}\n".encode()


def marker_json(origin: Path, first: int, end: int, root: bytes, key) -> str:
    """The marker of an archive of records ``[first, end)`` of the log in ``origin``, signed by ``key``."""
    return json.dumps({
        "archive_of": str(origin.resolve()), "first_record": first, "end_record": end,
        "archived_unix_ns": time.time_ns(), "checkpoint_root": root.hex(),
        "archive_signature": key.sign(marker_statement(first, end, root)).hex(), "archive_key_id": key.key_id,
    }, indent=1) + "\n"


def read_marker(directory: Path) -> ArchiveMarker | None:
    """The directory's marker, or None when it has none; ValueError, OverflowError (1e400 is a JSON number), KeyError
    or TypeError when it is unreadable."""
    path = directory / FILE_NAME
    if not path.is_file():
        return None
    data = json.loads(read_regular(path))
    if not isinstance(data, dict):
        raise TypeError(f"a JSON object was expected, not {type(data).__name__}")
    return ArchiveMarker(int(data.get("first_record", 0)), int(data["end_record"]),
                         bytes.fromhex(data["checkpoint_root"]), bytes.fromhex(data.get("archive_signature", "")),
                         str(data.get("archive_key_id", "")))


def marker_problem(marker: ArchiveMarker, first: int, public_key_for: Callable[[str], bytes | None]) -> str | None:
    """Why a marker signed by a trusted key fails: an edited one, or another archive's (None otherwise; one with no
    signature, or by a key not trusted, only shows nothing: see ``unsigned``)."""
    public = public_key_for(marker.key_id) if marker.signature else None
    if public is None:
        return None
    if not signature_valid(public, marker.signature, marker_statement(marker.first, marker.end, marker.root)):
        return f"its archive signature does not verify with key {marker.key_id}"
    if marker.first != first:
        return (f"it was signed for an archive of records {marker.first}..{marker.end - 1}, but this directory's "
                f"records begin at {first}: it is another archive's")
    return None


def unsigned(marker: ArchiveMarker, public_key_for: Callable[[str], bytes | None]) -> str | None:
    """Why a marker does not show the directory is an archive: no signature, or one by a key not trusted (None when a
    trusted key signed it: ``marker_problem`` checked that signature). Noted, not failed: the cut's note stays."""
    if marker.signature and public_key_for(marker.key_id) is not None:
        return None
    why = (f"is signed by key {marker.key_id or '?'}, which is not among the trusted keys (if it is yours, pass it "
           f"with --from-key)" if marker.signature else
           "carries no archive signature: `aios-kernel audit archive` of a release before 2026-11-28 wrote it, or "
           "someone without the key did")
    return (f"{FILE_NAME} {why}; it does not show that this is an archive rather than a log cut back to record "
            f"{marker.end}: an archive's records continue in the log it came from, whose archive-base.json signs this "
            f"end and root (`aios-kernel audit verify ARCHIVE --min-records B`, B its tree_size)")
