"""The pipeline folder's files as the registry sees them: what a file is, what tells its change, how an upload writes.

Looking at a folder must never mistake "cannot look" for "nothing there" (a folder without read permission was taken
for an empty one, and every pipeline was unloaded: a live-change audit), so a file that is gone and a file that cannot
be looked at are told apart here, and ``FolderUnreadable`` is the registry's cue to change nothing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..durable_files import replace_whole
from ..errors import FailedPrecondition
from ..limits import FileTooLarge, read_bounded
from ..policy import tomlsafe
from .spec import MAX_PIPELINE_FILE_BYTES, PipelineError

# Uploaded text becomes files named after it: keep each name (and its ".<name>.tmp" twin) a
# plain name of the folder, under the file systems' 255-byte limit.
MAX_FILE_NAME_BYTES = 240


def check_file_name(name: str, what: str) -> None:
    if (not name or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES):
        raise PipelineError(f"{what} must be a plain file name for uploads (no '/', '\\', NUL or leading '.', "
                            f"at most {MAX_FILE_NAME_BYTES} bytes), got {name[:80]!r}")


PIPELINE, OTHER, BROKEN = "pipeline", "other", "broken"


def file_kind(path: Path) -> str:
    """PIPELINE (a top-level ``pipeline`` table, however the TOML spells it), OTHER (TOML without one: a
    policy, say) or BROKEN (not readable TOML: which kind it was meant to be cannot be told)."""
    return read_kind(path)[0]


def read_kind(path: Path) -> tuple[str, str | None]:
    """``file_kind`` and, for a PIPELINE, its ``[pipeline].name`` (None if it has none): one read of the file."""
    try:
        data = read_bounded(path, MAX_PIPELINE_FILE_BYTES)
    except FileTooLarge:
        return BROKEN, None  # (refused by its load, without being read)
    except OSError:
        return (OTHER if not path.exists() else BROKEN), None
    try:
        doc = tomlsafe.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomlsafe.TomlError):
        return BROKEN, None
    table = doc.get("pipeline")
    if not isinstance(table, dict):
        return OTHER, None
    name = table.get("name")
    return PIPELINE, (name if isinstance(name, str) else None)


class FolderUnreadable(OSError):
    """The pipeline folder, or a file in it or read by a pipeline, could not be looked at: the look changed nothing."""

    def __init__(self, what: str, then: str):
        super().__init__(f"{what}; {then}")
        self.what = what  # "pipeline folder F cannot be looked at (why: path)"


# A file is gone (or a link to nothing) when its stat fails so; any other failure (no permission on its folder, an I/O
# error) says nothing about the file, and must not unload the pipeline it serves.
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def toml_files(folder: Path) -> list[Path]:
    """The top-level ``*.toml`` entries of ``folder`` (as ``glob("*.toml")`` names them); [] when it does not exist.
    OSError when it exists but cannot be listed (pathlib's glob says [] then)."""
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries if entry.name.endswith(".toml")]
    except OSError as exc:
        if exc.errno in _GONE:
            return []
        raise
    return sorted(folder / name for name in names)


def file_key(path: Path) -> tuple | None:
    """What tells a file's change: (mtime, size, inode, status-change time) of the file and, for a symlink, of
    the link itself (swapped for another one). None if it is gone; OSError if it cannot be looked at."""
    try:
        stat, link = path.stat(), path.lstat()
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns)
    return key if link.st_ino == stat.st_ino else key + (link.st_ino, link.st_ctime_ns)


def absolute(path: Path) -> Path:
    """``path`` made absolute and normal, symlinks left as they are (unlike ``resolve``)."""
    return Path(os.path.abspath(path))


def refuse_link(path: Path) -> None:
    """An upload replaces its files with files of its own: one that is a symbolic link (a policy shared from another
    folder, a Kubernetes ConfigMap's ``..data/`` link) became a plain file, and later changes where the link pointed
    no longer reached this kernel, without a word (a live-change audit). Refused instead; nothing is written."""
    if path.is_symlink():
        raise FailedPrecondition(f"upload valid but not activated: {path} is a symbolic link (to {os.readlink(path)}), "
                                 "which an upload would replace with a file of its own: later changes where it points "
                                 "would no longer reach this kernel. Change the file it points to (the watcher loads "
                                 "it), or remove the link first; nothing was changed")


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` written whole through a dot-file twin (``.<name>.tmp``: the watcher skips it), made afresh."""
    replace_whole(path, data, temporary=path.with_name(f".{path.name}.tmp"))
