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

Uploads are in ``uploads.py``, the model hub's hooks in ``model_changes.py`` (both parts of this class), and what
a file in the folder is in ``folder_files.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..errors import InvalidArgument, NotFound, quote
from ..observability.repeats import RepeatedFailure
from .binding import bind, binding_warnings
from .folder_files import BROKEN, OTHER, PIPELINE, FolderUnreadable, absolute, file_key, file_kind, toml_files
from .model_changes import ModelChanges
from .spec import Pipeline, PipelineError, load_pipeline
from .tomlpos import line_of
from .uploads import PipelineUploads

log = logging.getLogger("aios.pipelines")


class PipelineRegistry(PipelineUploads, ModelChanges):
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
        self._seen: dict[Path, tuple] = {}  # file -> its file_key last looked at
        # pipeline file -> the files its last load read (its policy), absolute, as named (not resolved: a symlink
        # swapped for another is a change of what it reads); watched wherever they are
        self._reads: dict[Path, set[Path]] = {}
        self._settling: dict[Path, tuple] = {}  # changed files waiting for a second look (reload(settle=True))
        self._strays: set[Path] = set()  # top-level files that are no pipeline: refused unless a pipeline reads them
        # pipeline file refused by the models loaded -> (the model it names, the pipeline's name)
        self._waiting: dict[Path, tuple[str, str]] = {}
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

    def waits_for_model(self, name: str) -> bool:
        """Whether pipeline ``name`` is not served only because no version of the model it names fits the models
        loaded (none at the start, say): it is tried again when one loads."""
        return name not in self._active and any(waiting == name for _, waiting in self._waiting.values())

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
            changed_files = {absolute(path) for path in touched} | {absolute(path) for path in gone}
            ours = set(top)
            kinds = {path: file_kind(path) for path in touched if path in ours}
            read = self._read_files()
            # Pipelines, files that were (one now emptied or cut short is refused, its running version serving)
            # and unreadable TOML no pipeline reads as its policy: refused, named, never silently skipped.
            to_load = {path for path, kind in kinds.items()
                       if kind == PIPELINE or (kind == OTHER and self._owner(path) is not None)
                       or (kind == BROKEN and absolute(path) not in read)}
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
            top = toml_files(self.folder)
            present = {path: key for path in top if (key := file_key(path)) is not None}
            # The files pipelines read that are not the folder's own (a policy in a subfolder or elsewhere).
            own = {absolute(path) for path in top}
            for path in sorted(self._read_files() - own):
                if (key := file_key(path)) is not None:
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
            if absolute(path) in read:
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
            reads.add(absolute(Path(policy_path)))
            return self._load_policy(policy_path)

        parsed = None
        try:
            parsed = load_pipeline(path, load_policy)
            pipeline = self._bind(parsed)
        except PipelineError as exc:
            self.errors[str(path)] = str(exc)
            if parsed is not None:  # it did not fit the models loaded: a version of its model may, later
                self._waiting[path] = (parsed.model, parsed.name)
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
