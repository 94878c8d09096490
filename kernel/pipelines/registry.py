"""The pipelines the kernel serves: a folder of ``*.toml`` files, reloaded on change.

A changed file is validated in full (its policy too, and against the model
it names: input width, output labels, the policy's classes and the
``score.<class>`` it reads) before it replaces the running version; an
invalid one is refused, logged with file and line, and the running version
keeps serving. ``put`` is the same path for uploads over the API: the new
text is checked, then written atomically (temp file, fsync, rename) and
activated; an uploaded policy is checked against every other pipeline that
reads its file first. Uploads and files are one kind of thing afterwards:
a later edit of the policy file reaches both.

A pipeline refused because it did not fit the models loaded (none loaded
under its name, another input width) is tried again when a version of its
model loads. A pipeline whose file is gone stops being served at the next
look that still finds it gone (Decide: NOT_FOUND); until then ``errors``
lists it, since an editor's save can remove a file and write it anew.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from ..errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, quote
from ..observability.repeats import RepeatedFailure
from ..limits import FileTooLarge, read_bounded
from ..models.errors import ModelInUse
from ..policy import tomlsafe
from .binding import bind, binding_warnings
from .spec import MAX_PIPELINE_FILE_BYTES, Pipeline, PipelineError, load_pipeline, parse_pipeline
from .tomlpos import line_of

log = logging.getLogger("aios.pipelines")


class PipelineRegistry:
    def __init__(self, folder: str | Path, hub, load_policy, parse_policy=None, poll_s: float = 1.0):
        self.folder = Path(folder)
        self.hub = hub
        self._load_policy = load_policy
        self._parse_policy = parse_policy
        self._poll_s = poll_s
        self._lock = threading.Lock()  # guards swaps of _active
        # One look, upload or model-load retry at a time: each reads and writes the bookkeeping below.
        self._work = threading.RLock()
        self._active: dict[str, Pipeline] = {}
        self._seen: dict[Path, tuple] = {}  # file -> its _file_key last looked at
        # pipeline file -> the files its last load read (its policy), absolute, as named (not resolved: a symlink
        # swapped for another is a change of what it reads); watched wherever they are
        self._reads: dict[Path, set[Path]] = {}
        self._settling: dict[Path, tuple] = {}  # changed files waiting for a second look (reload(settle=True))
        self._strays: set[Path] = set()  # top-level files that are no pipeline: refused unless a pipeline reads them
        self._waiting: dict[Path, str] = {}  # pipeline file refused by the models loaded -> the model it names
        self._gone: set[Path] = set()  # serving pipelines' files the last look did not find
        self._duplicates: dict[Path, str] = {}  # files refused for a name another file serves -> that name
        self.errors: dict[str, str] = {}  # file -> why its latest content was refused
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._hearing_models = False
        self.listeners = []  # fn(old: Pipeline | None, new: Pipeline): audited as policy changes
        self.removed_listeners = []  # fn(old: Pipeline): a pipeline no longer served (its file is gone)

    # -- lookup ------------------------------------------------------------------
    def get(self, name: str) -> Pipeline:
        if not name:
            raise InvalidArgument("field 'pipeline' is empty")
        pipeline = self._active.get(name)
        if pipeline is None:
            names = ", ".join(sorted(self._active)) or "(none)"
            refused = len(self.errors)  # (a file refused at start: the caller's pipeline may be one of them)
            also = (f"; {refused} file{'s' if refused != 1 else ''} in the pipeline folder "
                    f"{'are' if refused != 1 else 'is'} refused (`aios-kernel pipelines list` says why)"
                    if refused else "")
            raise NotFound(f"pipeline {quote(name)} is not loaded; loaded pipelines: {names}{also}")
        return pipeline

    def all(self) -> list[Pipeline]:
        return sorted(self._active.values(), key=lambda p: p.name)

    # -- loading ---------------------------------------------------------------
    def reload(self, settle: bool = False) -> list[str]:
        """Look at every file once; returns the names (re)activated. Never raises for a bad file.

        A pipeline is loaded again when its own file changed or a file it reads
        (its policy, in the folder or not) did or is gone: a policy edited on
        disk, or uploaded with another pipeline, reaches every pipeline bound
        to it, uploaded or not. A change is any of a file's modification time,
        size, inode or status-change time (``cp -p`` keeps the first two).

        ``settle`` (the watcher's looks): a changed file is taken only once a
        second look finds it unchanged, so that a file caught half-written is
        not served; replacing files atomically (write a temporary file, then
        rename it over) is still what makes a change safe.
        """
        with self._work:
            top, present = self._look()
            touched = [path for path, key in present.items() if self._seen.get(path) != key]
            if settle:
                touched = self._settled(touched, present)
            gone = [path for path in self._seen if path not in present]
            for path in gone:
                del self._seen[path]
            self._forget(gone, present)
            if not touched and not gone:
                return []
            changed_files = {_absolute(path) for path in touched} | {_absolute(path) for path in gone}
            ours = set(top)
            kinds = {path: _file_kind(path) for path in touched if path in ours}
            read = self._read_files()
            # Pipelines, files that were (one now emptied or cut short is refused, its running version serving)
            # and unreadable TOML no pipeline reads as its policy: refused, named, never silently skipped.
            to_load = {path for path, kind in kinds.items()
                       if kind == PIPELINE or (kind == OTHER and self._owner(path) is not None)
                       or (kind == BROKEN and _absolute(path) not in read)}
            to_load |= {path for path, reads in self._reads.items() if reads & changed_files and path in present}
            # A file counts as seen once handled (loaded or refused), each on its own: should this look stop
            # half-way, the files it did not get to are looked at again by the next one, not skipped.
            changed = self._load_files(sorted(to_load), present)
            for path in touched:  # policies and other files: handled once the pipelines reading them are
                self._seen[path] = present[path]
            self._strays = (self._strays - set(kinds) - set(gone)) | {
                path for path, kind in kinds.items() if kind == OTHER and path not in to_load}
            self._list_strays()
            return changed

    def _look(self) -> tuple[list[Path], dict[Path, tuple]]:
        """The folder's top-level ``*.toml`` files, and the key of each file there and of each file the pipelines
        read. FolderUnreadable when the folder or one of them cannot be looked at (no permission, an I/O error):
        then nothing is known to have changed or gone. (pathlib's glob took a folder it could not list for an
        empty one, and the next look unloaded every pipeline: Decide NOT_FOUND for all, a live-change audit.)"""
        try:
            top = _toml_files(self.folder)
            present = {path: key for path in top if (key := _file_key(path)) is not None}
            # The files pipelines read that are not the folder's own (a policy in a subfolder or elsewhere).
            own = {_absolute(path) for path in top}
            for path in sorted(self._read_files() - own):
                if (key := _file_key(path)) is not None:
                    present[path] = key
        except OSError as exc:
            then = ("nothing changes until it can: the pipelines served keep serving" if self._active
                    else "no pipeline is loaded from it until it can")
            core = (f"pipeline folder {self.folder} cannot be looked at ({exc.strerror or exc}: "
                    f"{exc.filename or self.folder})")
            self.errors[str(self.folder)] = f"{core}; {then}"
            raise FolderUnreadable(core, then) from None
        self.errors.pop(str(self.folder), None)
        return top, present

    def _read_files(self) -> set[Path]:
        """Every file the pipelines' last loads read (their policies), absolute, as named."""
        return set().union(*self._reads.values())

    def _settled(self, touched: list[Path], present: dict) -> list[Path]:
        """The changed files a second look found as the first one did; the others wait for the next look."""
        ready = [path for path in touched if self._settling.get(path) == present[path]]
        self._settling = {path: present[path] for path in touched if path not in ready}
        return ready

    def _list_strays(self) -> None:
        """A top-level file that is no pipeline and no pipeline reads is listed as refused (a pipeline whose
        ``[pipeline]`` table was lost, a policy nothing names): it is not served, and the listing says so."""
        read = self._read_files()
        for path in self._strays:
            if _absolute(path) in read:
                self.errors.pop(str(path), None)
            else:
                self.errors[str(path)] = (f"{path}:0: not served: it has no [pipeline] table, and no pipeline in "
                                          "this folder reads it as its policy")

    def _load_files(self, paths, present: dict[Path, tuple[int, int]] | None = None) -> list[str]:
        """Load each file in ``paths``; one that fails in any way is refused (``errors``), never the others.
        ``present``: the (mtime, size) this look found, recorded in ``_seen`` as each file is handled."""
        changed = []
        for path in paths:
            pipeline = self._load_one(path)
            if present is not None and path in present:
                self._seen[path] = present[path]
            if pipeline is not None and not self._taken_elsewhere(pipeline, path) and self._activate(pipeline):
                changed.append(pipeline.name)
        return changed

    def _taken_elsewhere(self, pipeline: Pipeline, path: Path) -> bool:
        """Refuse ``path`` when its pipeline's name is served from another file still in the folder (a copy
        edited as a draft, say): the two silently took it from each other, and removing the copy took the
        pipeline down though its own file was still there. A file that moved (the old one gone) takes over;
        the refused file is tried again once the other no longer serves the name."""
        other = self._active.get(pipeline.name)
        if other is None or other.path == str(path):
            self._duplicates.pop(path, None)
            return False
        if not Path(other.path).exists() or Path(other.path) in self._gone:
            return False
        try:
            line = line_of(path.read_text(encoding="utf-8"), "pipeline", 0, "name")
        except (OSError, UnicodeDecodeError):
            line = 0
        self.errors[str(path)] = (f"{path}:{line}: [pipeline].name: pipeline {pipeline.name!r} is already served "
                                  f"from {other.path}; a pipeline name belongs to one file (rename this one)")
        self._duplicates[path] = pipeline.name
        log.error("pipeline refused: %s", self.errors[str(path)])
        return True

    def _retry_duplicates_of(self, name: str) -> None:
        """``name`` is no longer served: a file refused for naming it too may serve it now."""
        waiting = sorted(path for path, other in self._duplicates.items() if other == name and path.exists())
        if waiting:
            self._load_files(waiting)

    def _load_one(self, path: Path) -> Pipeline | None:
        """The pipeline in ``path``, bound to its model; None when refused (recorded in ``errors``, logged)."""
        reads: set[Path] = set()

        def load_policy(policy_path):
            reads.add(_absolute(Path(policy_path)))
            return self._load_policy(policy_path)

        parsed = None
        try:
            parsed = load_pipeline(path, load_policy)
            pipeline = self._bind(parsed)
        except PipelineError as exc:
            self.errors[str(path)] = str(exc)
            if parsed is not None:  # it did not fit the models loaded: a version of its model may, later
                self._waiting[path] = parsed.model
            else:
                self._waiting.pop(path, None)
            log.error("pipeline refused: %s%s", exc, self._still_serving(path))
            return None
        except Exception as exc:  # a defect the checks missed: refuse this file, named, and go on with the rest
            self.errors[str(path)] = f"{path}:0: cannot be loaded ({type(exc).__name__}: {exc})"[:2000]
            self._waiting.pop(path, None)
            log.error("pipeline refused: %s: cannot be loaded%s", path, self._still_serving(path), exc_info=True)
            return None
        finally:
            if not reads and self._owner(path) is not None:
                # Refused before it named a policy (not TOML, unreadable): its running version still reads the one it
                # read, which `pipelines list` called "not served: no pipeline in this folder reads it" (an audit).
                reads = self._reads.get(path, reads)
            self._reads[path] = reads  # (a refused pipeline too: fixing its policy loads it again)
        self.errors.pop(str(path), None)
        self._waiting.pop(path, None)
        return pipeline

    def _still_serving(self, path: Path) -> str:
        return "; the running version keeps serving" if self._owner(path) else ""

    def _forget(self, gone: list[Path], present) -> None:
        """Files this look did not find. A serving pipeline's is listed in ``errors`` at the first such
        look and unloaded at the next one that does not find it either: an editor's save may remove a
        file and write it anew, and a look between the two must not take the pipeline down. A refused
        or other file's is simply forgotten."""
        for path in sorted(self._gone):
            self._gone.discard(path)
            self.errors.pop(str(path), None)
            if path in present:
                continue  # back (and reloaded as a changed file)
            self._reads.pop(path, None)
            owner = self._owner(path)
            if owner is not None:
                self._unload(owner, f"its file {path} is gone")
        for path in gone:
            self._waiting.pop(path, None)
            self._duplicates.pop(path, None)
            owner = self._owner(path)
            if owner is None:
                self._reads.pop(path, None)
                self.errors.pop(str(path), None)
                continue
            self._gone.add(path)
            self.errors[str(path)] = (f"{path}: the file is gone; pipeline '{owner.name}' is no longer served "
                                      "from the next look on unless the file is back by then")
            log.warning("pipeline file %s is gone: pipeline %s is no longer served from the next look on unless "
                        "the file is back by then", path, owner.name)

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
                _check_file_name(name, "the name")
            else:  # read where it is: a subfolder of the folder may hold it, as a folder load reads it there
                for part in name.split("/"):  # (a pipeline author's walk-through: 'policies/x.toml' was refused)
                    _check_file_name(part, f"each part of the policy's path {name!r}")
            reads.add(_absolute(self.folder / name))
            if policy_text is not None:
                if _file_kind(self.folder / name) == PIPELINE:
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
            _refuse_link(path)
        left = _remaining(time_left)
        if left is not None and left <= 0:
            raise DeadlineExceeded("upload valid but not activated: the call's deadline passed while it was "
                                   "validated; nothing was changed")
        written = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name, (text, _) in pending_policy.items():
                _write_atomically(self.folder / name, text)
                written.append(self.folder / name)
            _write_atomically(target, pipeline_text)
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
                self._seen[path] = _file_key(path)
            except OSError:
                self._seen[path] = None  # (cannot be looked at: the next look that can reads it again)
            self._settling.pop(path, None)
            self._strays.discard(path)
        pipeline = _relocated(pipeline, str(target))
        self._reads[target] = reads  # as a load from the folder records it: an edited policy reaches it
        self.errors.pop(str(target), None)
        self._waiting.pop(target, None)
        self._gone.discard(target)
        self._activate(pipeline, warnings)
        # The other pipelines reading an uploaded policy take it now (_check_sharers found it suits them):
        # the next look sees the policy file as already seen and would not reload them.
        shared = {_absolute(self.folder / name) for name in pending_policy}
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
        if (active is not None and _absolute(Path(active.path).parent) == _absolute(self.folder)
                and Path(active.path).exists()):
            return Path(active.path)
        target = self.folder / f"{pipeline.name}.toml"
        where = f"{pipeline.path}: [pipeline].name"
        _check_file_name(target.name, f"{where}: its file name")
        if target.name in pending_policy:
            raise PipelineError(f"{where}: {target.name!r} is the name of the policy file uploaded with it; "
                                "choose another name")
        if not target.exists():
            return target
        kind, named = _read_kind(target)
        served = self._owner(target)
        if served is not None:
            held = f"serves pipeline {served.name!r}"
        elif kind == PIPELINE and named != pipeline.name:
            held = (f"holds pipeline {named!r}" if named else "holds a [pipeline] table with no name") + \
                f" (not served: {self.errors.get(str(target), 'refused')[:200]})"
        elif kind == OTHER:
            held = ("is a policy a pipeline reads" if _absolute(target) in self._read_files()
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
        shared = _absolute(policy_path)

        def with_upload(path):
            return policy if _absolute(Path(path)) == shared else self._load_policy(path)

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

    def _bind(self, pipeline: Pipeline, upload: bool = False) -> Pipeline:
        return bind(pipeline, self.hub, upload)

    def unavailable_reason(self, pipeline: Pipeline) -> str:
        """"" while the model version ``pipeline`` decides on is loaded, else why it cannot decide now (an operator
        walk-through: ListPipelines showed it serving while every Decide answered UNAVAILABLE)."""
        if self.hub.get(pipeline.model, pipeline.bound_version) is not None:
            return ""
        return (f"model {pipeline.model} version {pipeline.bound_version} is not loaded: Decide answers UNAVAILABLE "
                f"until it is (RepositoryModelLoad, `aios-kernel models load`)")

    def _owner(self, path: Path) -> Pipeline | None:
        return next((p for p in self._active.values() if p.path == str(path)), None)

    def _activate(self, pipeline: Pipeline, warnings: list[str] | None = None) -> bool:
        with self._lock:
            old = self._active.get(pipeline.name)
            # A file now naming another pipeline: the one it named before is no longer in the folder.
            renamed = [p for p in self._active.values() if p.path == pipeline.path and p.name != pipeline.name]
            same = (old is not None and old.hash == pipeline.hash and old.policy.hash == pipeline.policy.hash
                    and old.bound_version == pipeline.bound_version)
            # The same pipeline from another file (moved, the old one gone: _taken_elsewhere): served from there
            # now, or the old file's absence would unload it at the next look. Not a new version.
            moved = same and old.path != pipeline.path
            if renamed or not same or moved:
                active = {name: p for name, p in self._active.items() if all(p is not r for r in renamed)}
                if not same or moved:
                    active[pipeline.name] = pipeline
                self._active = active  # readers never see a half-updated dict
        for gone in renamed:
            self._removed(gone, f"its file {pipeline.path} now names pipeline '{pipeline.name}'")
        if moved:
            log.info("pipeline %s is served from %s now (moved from %s; the same version)", pipeline.name,
                     pipeline.path, old.path)
            self._gone.discard(Path(old.path))
            self.errors.pop(old.path, None)
        if same:
            return False
        log.info("pipeline %s active: version %r (%s), policy %s %r (%s), model %s version %s", pipeline.name,
                 pipeline.label, pipeline.hash[:12], pipeline.policy.name, pipeline.policy.version,
                 pipeline.policy.hash[:12], pipeline.model, pipeline.bound_version)
        found = [_unchanged_label(old, pipeline) if old is not None else None, *binding_warnings(pipeline, self.hub)]
        for warning in filter(None, found):
            log.warning("%s", warning)
            if warnings is not None:
                warnings.append(warning)
        for listener in self.listeners:
            listener(old, pipeline)
        return True

    def _unload(self, pipeline: Pipeline, why: str) -> None:
        with self._lock:
            if self._active.get(pipeline.name) is not pipeline:
                return
            self._active = {name: p for name, p in self._active.items() if p is not pipeline}
        self._removed(pipeline, why)

    def _removed(self, pipeline: Pipeline, why: str) -> None:
        log.warning("pipeline %s (version %r, %s) is no longer served: %s; Decide answers NOT_FOUND for it",
                    pipeline.name, pipeline.label, pipeline.hash[:12], why)
        for listener in self.removed_listeners:
            listener(pipeline)
        self._retry_duplicates_of(pipeline.name)

    # -- models --------------------------------------------------------------------
    def _models_changed(self, added, removed) -> None:
        """The hub's listener: a model (version) loaded, so the pipeline files refused for want of it are
        tried again, and those serving on it are checked against the version now loaded."""
        names = {mv.name for mv in added}
        if not names or self._stop.is_set():
            return
        try:
            with self._work:
                paths = {path for path, model in self._waiting.items() if model in names}
                paths |= {Path(p.path) for p in self._active.values() if p.model in names}
                activated = self._load_files(sorted(path for path in paths if path in self._seen))
            if activated:
                log.info("model %s loaded: pipelines %s active", ", ".join(sorted(names)), ", ".join(activated))
        except Exception:  # a listener that raises would cut the hub's other listeners off
            log.exception("retrying the pipelines of model %s failed", ", ".join(sorted(names)))

    def _check_model_reload(self, fresh) -> None:
        """The hub's checker: refuse a load that replaces the model version a serving pipeline decides on with one
        that no longer fits it (a model.toml edited in place: labels renamed, another input width). Loaded, the
        pipeline's new binding was refused but its running version went on deciding on the replaced version: every
        Decide failed (INVALID_ARGUMENT "field 'label'...", a live-change audit). A pipeline that follows the
        newest version and fits the newest one loaded is not held to the version it leaves."""
        if not fresh:
            return
        name, newest = fresh[0].name, fresh[-1]
        reloaded = {mv.version: mv for mv in fresh}
        for pipeline in self.all():
            mv = reloaded.get(pipeline.bound_version)
            if pipeline.model != name or mv is None:
                continue
            if not pipeline.model_version and newest is not mv and _fits(pipeline, newest) is None:
                continue
            why = _fits(pipeline, mv)
            if why is not None:
                raise ModelInUse(Path(self.hub.root) / name / mv.version / "model.toml", "",
                                 f"version {mv.version} as it is now would no longer fit pipeline {pipeline.name!r} "
                                 f"({pipeline.path}), which decides on it: {why}. Load the change as a new version "
                                 f"folder and move the pipeline to it, or restore the files of version {mv.version}")

    def _move_off_dropped_versions(self, fresh) -> None:
        """The hub's preparer: a load that drops the version a pipeline following the newest decides on (its folder
        removed, then RepositoryModelLoad) first moves that pipeline to a version it fits that serves both now and
        after the load. Moved only by the listener, after the load was published, every Decide in between found its
        version gone: UNAVAILABLE (13 in one live-change run). One the pipeline fits that loads for the first time is
        taken by the listener, as before."""
        if not fresh or self._stop.is_set():
            return
        name, kept = fresh[0].name, {mv.version for mv in fresh}
        try:
            with self._work:
                for pipeline in self.all():
                    if pipeline.model != name or pipeline.model_version or pipeline.bound_version in kept:
                        continue
                    for mv in reversed(fresh):  # (newest first)
                        now = self.hub.get(name, mv.version)
                        if now is not None and _fits(pipeline, now) is None and _fits(pipeline, mv) is None:
                            self._activate(replace(pipeline, bound_version=mv.version))
                            break
        except Exception:  # (a preparer that raises fails the load: this one only spares callers a retry)
            log.exception("moving the pipelines of model %s off the versions its load drops failed", name)

    # -- watching ----------------------------------------------------------------
    def start(self) -> None:
        if not self._hearing_models and hasattr(self.hub, "add_listener"):
            # (here, not in __init__: the kernel's own model listener, which audits the load, goes first)
            self.hub.add_listener(self._models_changed)
            if hasattr(self.hub, "add_checker"):
                self.hub.add_checker(self._check_model_reload)
                self.hub.add_preparer(self._move_off_dropped_versions)
            self._hearing_models = True
        self.reload()
        if self._poll_s > 0 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="pipeline-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def _watch(self) -> None:
        # Out of file descriptors, say, every look fails the same way: one traceback, then a line now and then.
        failures = RepeatedFailure(log, f"looking at the pipeline folder {self.folder}")
        while not self._stop.wait(self._poll_s):
            try:
                self.reload(settle=True)
            except FolderUnreadable as exc:  # (its message says it all: no traceback)
                failures.failed(str(exc), traceback=False)
            except Exception as exc:  # a watcher that dies silently would freeze every pipeline
                failures.failed(f"{type(exc).__name__}: {exc}")
                time.sleep(self._poll_s)
            else:
                failures.succeeded()


def _remaining(time_left) -> float | None:
    """Seconds the caller still waits; None when it waits for good (no deadline: gRPC's time_remaining is then
    huge, and a lock's wait longer than threading.TIMEOUT_MAX raises OverflowError: a review audit's INTERNAL)."""
    if time_left is None:
        return None
    left = time_left()
    return None if left is None or left >= threading.TIMEOUT_MAX else left


# Uploaded text becomes files named after it: keep each name (and its ".<name>.tmp" twin) a
# plain name of the folder, under the file systems' 255-byte limit.
MAX_FILE_NAME_BYTES = 240


def _check_file_name(name: str, what: str) -> None:
    if (not name or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES):
        raise PipelineError(f"{what} must be a plain file name for uploads (no '/', '\\', NUL or leading '.', "
                            f"at most {MAX_FILE_NAME_BYTES} bytes), got {name[:80]!r}")


PIPELINE, OTHER, BROKEN = "pipeline", "other", "broken"


def _file_kind(path: Path) -> str:
    """PIPELINE (a top-level ``pipeline`` table, however the TOML spells it), OTHER (TOML without one: a
    policy, say) or BROKEN (not readable TOML: which kind it was meant to be cannot be told)."""
    return _read_kind(path)[0]


def _read_kind(path: Path) -> tuple[str, str | None]:
    """``_file_kind`` and, for a PIPELINE, its ``[pipeline].name`` (None if it has none): one read of the file."""
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


def _toml_files(folder: Path) -> list[Path]:
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


def _file_key(path: Path) -> tuple | None:
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


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normal, symlinks left as they are (unlike ``resolve``)."""
    return Path(os.path.abspath(path))


def _refuse_link(path: Path) -> None:
    """An upload replaces its files with files of its own: one that is a symbolic link (a policy shared from another
    folder, a Kubernetes ConfigMap's ``..data/`` link) became a plain file, and later changes where the link pointed
    no longer reached this kernel, without a word (a live-change audit). Refused instead; nothing is written."""
    if path.is_symlink():
        raise FailedPrecondition(f"upload valid but not activated: {path} is a symbolic link (to {os.readlink(path)}), "
                                 "which an upload would replace with a file of its own: later changes where it points "
                                 "would no longer reach this kernel. Change the file it points to (the watcher loads "
                                 "it), or remove the link first; nothing was changed")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # (a full disk: no half-written twin left in the folder)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _OneVersion:
    """A hub holding just ``mv``: what a pipeline is bound against to check it fits a version not yet published."""

    def __init__(self, mv):
        self.mv = mv

    def get(self, name: str, version: str = ""):
        return self.mv if name == self.mv.name and version in ("", self.mv.version) else None


def _fits(pipeline: Pipeline, mv) -> str | None:
    """None when ``pipeline`` binds to model version ``mv``, else why not (the binding's own refusal)."""
    try:
        bind(replace(pipeline, model_version=mv.version), _OneVersion(mv))
    except PipelineError as exc:
        return str(exc)
    return None


def _relocated(pipeline: Pipeline, path: str) -> Pipeline:
    return replace(pipeline, path=path)


def _unchanged_label(old: Pipeline, new: Pipeline) -> str:
    """Changed content under an unchanged declared version: decisions then carry one version label for two rule
    sets, told apart only by hash. Served all the same (the hash is on every decision and record), but said
    ("" when the labels moved with the content)."""
    if new.policy.hash != old.policy.hash and new.policy.version == old.policy.version:
        return (f"pipeline {new.name}: policy {new.policy.name} changed ({old.policy.hash[:12]} -> "
                f"{new.policy.hash[:12]}) but still declares version {new.policy.version!r}; decisions under either "
                f"are told apart only by policy_hash: give the changed policy a new version")
    if new.hash != old.hash and new.label == old.label and new.label:
        return (f"pipeline {new.name} changed ({old.hash[:12]} -> {new.hash[:12]}) but still declares version "
                f"{new.label!r}; decisions under either are told apart only by pipeline_version (the file's hash): "
                f"give the changed file a new version")
    return ""
