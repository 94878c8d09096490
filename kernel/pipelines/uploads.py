"""Pipelines (and their policies) uploaded over the API: checked whole, written atomically, then served.

The same path as a file the watcher finds, with what an upload adds: a deadline the caller may give up at (nothing is
activated behind a caller told the call failed), a policy shared with other pipelines checked against each of them,
and files that are never written over something else (another pipeline's file, a symlink, a file of the author's).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from ..errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from .folder_files import (BROKEN, OTHER, PIPELINE, FolderUnreadable, absolute, check_file_name, file_key, file_kind,
                           read_kind, refuse_link, write_atomically)
from .spec import Pipeline, PipelineError, load_pipeline, parse_pipeline

log = logging.getLogger("aios.pipelines")


class PipelineUploads:
    """``PipelineRegistry.put`` (a part of it: it uses the registry's state, lock and activation)."""

    def put(self, pipeline_text: bytes, policy_text: bytes | None = None, *, time_left=None,
            warnings: list[str] | None = None) -> Pipeline:
        """Validate and activate uploaded pipeline (and optionally policy) text; refused whole if invalid.

        An uploaded policy replaces the policy file for every pipeline that reads it, so it must suit
        each of those serving too: an upload that would break one is refused, naming it, and one that
        suits them is served by them at once.

        ``time_left``: a callable giving the seconds the caller still waits (a gRPC context's
        ``time_remaining``), or None. An upload whose caller has given up (its deadline passed while it
        waited for other uploads or was validated) changes nothing and answers DEADLINE_EXCEEDED: the
        caller was told the call failed, so nothing may be activated behind its back. ``warnings``: what the
        activation warned about (a changed policy under its old version label) is appended there too, for the
        caller (it went only to the kernel's log: an operator walk-through)."""
        if self._parse_policy is None:
            raise FailedPrecondition("this kernel was started without policy uploads")
        waited = _remaining(time_left)
        if not self._work.acquire(timeout=-1 if waited is None else max(waited, 0.0)):
            raise DeadlineExceeded("upload not validated: the call's deadline passed while other uploads or "
                                   "reloads ran; nothing was changed")
        try:
            return self._put(pipeline_text, policy_text, time_left, warnings)
        finally:
            self._work.release()

    def _put(self, pipeline_text: bytes, policy_text: bytes | None, time_left,
             warnings: list[str] | None = None) -> Pipeline:
        try:
            # The folder as the watcher looks at it: one the kernel cannot read was the caller's INVALID_ARGUMENT
            # ("[policy].file: [Errno 13] Permission denied"), or, listable but not readable, the file was renamed
            # into place and the answer said "nothing was changed" (a live-change audit).
            self._look()
        except FolderUnreadable as exc:
            raise FailedPrecondition(f"upload not validated: the {exc.what}: make it readable by the user the kernel "
                                     "runs as; nothing was changed") from None
        pending_policy: dict[str, tuple[bytes, object]] = {}
        reads: set[Path] = set()

        def policy_for(name: str):
            if policy_text is not None:  # (written by the upload: a plain name of the folder)
                check_file_name(name, "the name")
            else:  # read where it is: a subfolder of the folder may hold it, as a folder load reads it there
                for part in name.split("/"):  # (a pipeline author's walk-through: 'policies/x.toml' was refused)
                    check_file_name(part, f"each part of the policy's path {name!r}")
            reads.add(absolute(self.folder / name))
            if policy_text is not None:
                if file_kind(self.folder / name) == PIPELINE:
                    raise PipelineError(f"{name!r} is a pipeline file; a policy needs a file of its own")
                policy = self._parse_policy(policy_text, source=name)  # bytes: not UTF-8 is refused there
                pending_policy[name] = (policy_text, policy)
                return policy
            return self._load_policy(self.folder / name)

        try:
            pipeline = self._bind(parse_pipeline(pipeline_text, "<upload>", policy_for), upload=True)
            target = self._upload_target(pipeline, pending_policy)
            for name, (text, policy) in pending_policy.items():
                self._check_sharers(self.folder / name, text, policy, pipeline.name, target)
        except PipelineError as exc:
            raise InvalidArgument(f"refused, the running version keeps serving: {exc}") from None
        except (RecursionError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # A defect the checks missed, set off by this text: the caller's file is refused (it is what
            # differs from every upload that works), and the traceback is logged for the maintainers.
            log.error("upload refused: it could not be validated", exc_info=True)
            raise InvalidArgument(f"refused, the running version keeps serving: <upload>:0: could not be "
                                  f"validated ({type(exc).__name__}: {str(exc)[:200]})") from None
        for path in [*(self.folder / name for name in pending_policy), target]:
            refuse_link(path)
        left = _remaining(time_left)
        if left is not None and left <= 0:
            raise DeadlineExceeded("upload valid but not activated: the call's deadline passed while it was "
                                   "validated; nothing was changed")
        written = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name, (text, _) in pending_policy.items():
                write_atomically(self.folder / name, text)
                written.append(self.folder / name)
            write_atomically(target, pipeline_text)
        except OSError as exc:  # (a docs audit: a folder the kernel's user cannot write answered INTERNAL)
            done = (f"; written before that: {', '.join(path.name for path in written)}, which the folder's "
                    f"next look loads") if written else "; nothing was changed"
            raise FailedPrecondition(
                f"upload valid but not activated: the pipelines folder {self.folder} cannot be written by the "
                f"kernel ({exc.strerror or exc}: {exc.filename or self.folder}): make it writable by the user "
                f"the kernel runs as{done}") from None
        written.append(target)
        for path in written:  # validated here: the next look must not load (and log) them a second time
            try:
                self._seen[path] = file_key(path)
            except OSError:
                self._seen[path] = None  # (cannot be looked at: the next look that can reads it again)
            self._settling.pop(path, None)
            self._strays.discard(path)
        pipeline = replace(pipeline, path=str(target))
        self._reads[target] = reads  # as a load from the folder records it: an edited policy reaches it
        self.errors.pop(str(target), None)
        self._waiting.pop(target, None)
        self._gone.discard(target)
        self._activate(pipeline, warnings)
        # The other pipelines reading an uploaded policy take it now (_check_sharers found it suits them):
        # the next look sees the policy file as already seen and would not reload them.
        shared = {absolute(self.folder / name) for name in pending_policy}
        sharers = [path for path, read in self._reads.items() if path != target and read & shared]
        self._list_strays()
        self._load_files(sorted(sharers))
        return pipeline

    def _upload_target(self, pipeline: Pipeline, pending_policy) -> Path:
        """The file an upload of ``pipeline`` is written to: the one serving its name now, wherever it is in the
        folder, else ``<name>.toml`` unless that holds something else. (An operator walk-through: an upload of a
        pipeline served from another file wrote ``<name>.toml`` beside it, and the next start served the old file
        again, as it comes first; one whose ``<name>.toml`` held another pipeline, or a file of the author's own,
        overwrote it.)"""
        active = self._active.get(pipeline.name)
        if (active is not None and absolute(Path(active.path).parent) == absolute(self.folder)
                and Path(active.path).exists()):
            return Path(active.path)
        target = self.folder / f"{pipeline.name}.toml"
        where = f"{pipeline.path}: [pipeline].name"
        check_file_name(target.name, f"{where}: its file name")
        if target.name in pending_policy:
            raise PipelineError(f"{where}: {target.name!r} is the name of the policy file uploaded with it; "
                                "choose another name")
        if not target.exists():
            return target
        kind, named = read_kind(target)
        served = self._owner(target)
        if served is not None:
            held = f"serves pipeline {served.name!r}"
        elif kind == PIPELINE and named != pipeline.name:
            held = (f"holds pipeline {named!r}" if named else "holds a [pipeline] table with no name") + \
                f" (not served: {self.errors.get(str(target), 'refused')[:200]})"
        elif kind == OTHER:
            held = ("is a policy a pipeline reads" if absolute(target) in self._read_files()
                    else "is a file that is no pipeline (a policy, or notes?)")
        elif kind == BROKEN:
            held = "is a file that is not readable TOML, so what it holds cannot be told"
        else:
            return target  # a refused version of this very pipeline: the upload replaces it
        raise PipelineError(f"{where}: {target.name!r} in the pipeline folder {held}; an upload does not overwrite "
                            f"it: choose another name, or move that file away first")

    def _check_sharers(self, policy_path: Path, text: bytes, policy, name: str, target: Path) -> None:
        """Refuse an uploaded policy that would break another serving pipeline reading ``policy_path``."""
        try:
            if policy_path.read_bytes() == text:
                return  # the same bytes: nothing changes for the others
        except OSError:
            pass
        shared = absolute(policy_path)

        def with_upload(path):
            return policy if absolute(Path(path)) == shared else self._load_policy(path)

        for path, reads in sorted(self._reads.items()):
            other = self._owner(path)
            if shared not in reads or path == target or other is None or other.name == name:
                continue
            try:
                self._bind(load_pipeline(path, with_upload))
            except PipelineError as exc:
                try:
                    self._bind(load_pipeline(path, self._load_policy))
                except PipelineError:
                    continue  # its file is refused with the policy there now too: the upload breaks nothing
                raise PipelineError(f"{policy_path.name} is also the policy of pipeline '{other.name}' ({path}), "
                                    f"which the uploaded policy would break: {exc}") from None


def _remaining(time_left) -> float | None:
    """Seconds the caller still waits; None when it waits for good (no deadline: gRPC's time_remaining is then
    huge, and a lock's wait longer than threading.TIMEOUT_MAX raises OverflowError: a review audit's INTERNAL)."""
    if time_left is None:
        return None
    left = time_left()
    return None if left is None or left >= threading.TIMEOUT_MAX else left
