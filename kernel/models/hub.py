"""The live set of loaded model versions: load, reload, unload with drain.

The repository directory is the source of truth for what *can* be loaded;
the hub holds what *is* loaded. Listeners (the scheduler, health status)
hear about every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KernelError
from ..limits import MAX_MODEL_NAME_BYTES
from . import config as model_config
from .errors import ModelConfigError
from .runtime import OnnxModel
from .stats import ModelStats

log = logging.getLogger("aios.models")

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False, slots=True, weakref_slot=True)
class ModelVersion:
    """One loaded version. Compared by identity: a reload makes a new object. (Weakly referenced by the lanes
    once unloaded: kernel/scheduling/lanes.py.)"""

    name: str
    version: str
    runtime: OnnxModel
    stats: ModelStats = field(default_factory=ModelStats)
    # The runtime's config, as a plain attribute: read several times per request.
    config: model_config.ModelConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.config = self.runtime.config


@dataclass(slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str = ""


def could_be_folder(name: str) -> bool:
    """Whether ``name`` could be a model folder's name: not empty, ".", ".." or hidden, no '/' or NUL, at
    most MAX_MODEL_NAME_BYTES. Checked before the file system is asked (which raises for a name too long)."""
    return (bool(name) and not name.startswith(".") and "/" not in name and "\x00" not in name
            and (len(name) * 4 <= MAX_MODEL_NAME_BYTES or len(name.encode("utf-8")) <= MAX_MODEL_NAME_BYTES))


def _version_sort_key(version: str):
    # Numeric versions sort numerically ("10" after "9"); others after, by name.
    return (0, int(version), "") if is_version_number(version) else (1, 0, version)


@dataclass(slots=True)
class ModelFolder:
    """One model's folder in the repository: the versions that can be loaded, and why the others cannot."""

    path: Path
    versions: list[str]  # version folders holding a model.onnx, oldest first
    skipped: dict[str, str]  # version folder -> why it is not served ("version 3 has no model.onnx ...")

    @property
    def version_folders(self) -> list[str]:
        """Every version folder, served or not, oldest first."""
        return sorted([*self.versions, *self.skipped], key=_version_sort_key)

    @property
    def problem(self) -> str:
        """Why no version of this model can be served; "" when some can."""
        if self.versions:
            return ""
        if not self.skipped:
            return f"no version folders (expected {self.path.name}/<version>/model.onnx)"
        return "; ".join(self.skipped.values())


def is_version_number(name: str) -> bool:
    """A version folder's name as Triton reads it: ASCII digits, no leading zero. ``str.isdigit`` alone let
    "²" through to ``int()``, which crashed the start; "01" beside "1" served the same number twice."""
    return name.isascii() and name.isdigit() and (name == "0" or not name.startswith("0"))


def requested_version(version: str) -> str | None:
    """A request's version string as the version folder it names: Triton reads it as an integer, so "01" is
    version 1 (it was NOT_FOUND); None for anything but ASCII digits ("1.0", " 1", "-1", "latest"), which
    Triton's ``std::stol`` would read a leading number from or refuse, and the kernel refuses rather than guess."""
    if not (version.isascii() and version.isdigit()):
        return None
    return version.lstrip("0") or "0"  # (not int(): a 5,000-digit string is over Python's int-parsing limit)


def scan_folder(model_dir: Path) -> ModelFolder:
    """What ``model_dir`` holds: every non-hidden folder in it is a version folder, served if it is a number
    and has model.onnx."""
    versions, skipped = [], {}
    subdirs = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for version in sorted(subdirs, key=_version_sort_key):
        if not is_version_number(version):  # Triton reads numbered folders only; "latest" would win as newest
            skipped[version] = (f"version folder {model_dir.name}/{version} is not a number: versions are "
                                "numbered folders (<name>/1/model.onnx, no leading zeros), as in Triton's layout")
        elif (model_dir / version / "model.onnx").is_file():
            versions.append(version)
        else:
            skipped[version] = (f"version {version} has no model.onnx "
                                f"(expected {model_dir.name}/{version}/model.onnx)")
    return ModelFolder(model_dir, versions, skipped)


class ModelHub:
    """Loaded versions by name; thread-safe; reload swaps atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.RLock()
        self._models: dict[str, dict[str, ModelVersion]] = {}
        # name -> its newest loaded version: every request without a version looks
        # it up, so it is chosen once per load/unload, not per call.
        self._latest: dict[str, ModelVersion] = {}
        self._failures: dict[str, str] = {}  # name -> why its last load failed
        self._skipped: dict[str, dict[str, str]] = {}  # name -> version folders its last load could not serve, and why
        self._listeners: list[Callable[[list[ModelVersion], list[ModelVersion]], None]] = []
        self._preparers: list[Callable[[list[ModelVersion]], None]] = []
        self._checkers: list[Callable[[list[ModelVersion]], None]] = []
        self._loads = 0  # loads in progress (wait_for_loads)
        self._loads_done = threading.Condition(threading.Lock())
        # name -> [its lock, callers holding or waiting for it]: one load or unload of a model at a time
        # (``_one_at_a_time``); an entry lives only while someone holds or waits for it.
        self._changing: dict[str, list] = {}

    # -- discovery --------------------------------------------------------
    def scan(self) -> dict[str, ModelFolder]:
        """Every model folder in the repository (hidden ones aside), servable or not."""
        if not self.root.is_dir():
            return {}
        return {p.name: scan_folder(p)
                for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")}

    def available(self) -> dict[str, list[str]]:
        """Model names in the repository with their version folders (those holding model.onnx)."""
        return {name: folder.versions for name, folder in self.scan().items() if folder.versions}

    def add_listener(self, listener: Callable[[list[ModelVersion], list[ModelVersion]], None]) -> None:
        """``listener(added, removed)`` is called after every load/unload, outside the hub lock."""
        self._listeners.append(listener)

    def add_preparer(self, preparer: Callable[[list[ModelVersion]], None]) -> None:
        """``preparer(fresh)`` is called with the versions a load made, before they are published: what must
        be ready before the first request can reach them (their lanes) is made there. Publishing first let a
        request find a reloaded version with no lane yet (UNAVAILABLE during every reload under load). An
        error fails the load; the previous versions stay live."""
        self._preparers.append(preparer)

    def add_checker(self, checker: Callable[[list[ModelVersion]], None]) -> None:
        """``checker(fresh)`` is called with the versions a load made (oldest first), before anything is prepared or
        published: a ``ModelConfigError`` it raises fails the load as a bad file does, and the versions loaded
        before keep serving. (The pipelines: a reload of the version they decide on must still fit them.)"""
        self._checkers.append(checker)

    # -- lookup -----------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelVersion | None:
        """A loaded version; ``version=""`` means the latest loaded one."""
        if not version:
            return self._latest.get(name)
        versions = self._models.get(name)
        if not versions:
            return None
        found = versions.get(version)
        if found is None and version[0] == "0" and (number := requested_version(version)) is not None:
            return versions.get(number)  # "01" is version 1, as Triton reads it
        return found

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_sort_key)

    def loaded_versions(self, name: str) -> list[ModelVersion]:
        """Every loaded version of ``name``, oldest first (empty when none is)."""
        with self._lock:
            versions = self._models.get(name, {})
            return [versions[v] for v in sorted(versions, key=_version_sort_key)]

    def loaded(self) -> list[ModelVersion]:
        with self._lock:
            return [mv for versions in self._models.values() for mv in versions.values()]

    def versions_not_served(self, name: str) -> dict[str, str]:
        """The numbered version folders of loaded ``name`` that its last load could not serve, with why (no
        model.onnx, a file that did not load), oldest first; folders that are not numbers are not versions."""
        with self._lock:
            skipped = self._skipped.get(name, {})
            return {version: skipped[version] for version in sorted(skipped, key=_version_sort_key)
                    if is_version_number(version)}

    def unavailable_reason(self, name: str, version: str = "") -> str:
        """Why ``name`` (``version``), in the repository, is not served: its last load's error, or what is
        wrong with its (version) folder; "" when it is loaded, not in the repository, or only unloaded."""
        with self._lock:
            if self._models.get(name):
                return self._skipped.get(name, {}).get(version, "") if version else ""
            failure = self._failures.get(name)
        if failure:
            return failure
        if not could_be_folder(name):  # (never asks the file system about a name no folder can have)
            return ""
        model_dir = self.root / name
        try:
            if not model_dir.is_dir():
                return ""
            problem = scan_folder(model_dir).problem
        except OSError:  # (a folder that went meanwhile, or one the kernel may not read: not served either way)
            return ""
        return str(ModelConfigError(model_dir, "", problem)) if problem else ""

    def load_failures(self) -> dict[str, str]:
        """The models whose last load failed, and why (the versions loaded before, if any, still serve)."""
        with self._lock:
            return dict(self._failures)

    def index(self) -> list[IndexEntry]:
        """Every model in the repository or loaded, with its state and, if unavailable, why; a version folder
        that cannot be served (no model.onnx) is listed UNAVAILABLE beside its model's loaded versions."""
        entries = []
        folders = self.scan()
        with self._lock:
            names = set(folders) | set(self._models) | set(self._failures)
            for name in sorted(names):
                loaded = self._models.get(name)
                if loaded:
                    # A reload that failed leaves these serving: say so beside them, or an operator reading the
                    # index sees READY and never learns the new files were refused.
                    failure = self._failures.get(name, "")
                    note = f"serving the versions loaded before; the last load failed: {failure}" if failure else ""
                    versions = [IndexEntry(name, v, READY, note) for v in loaded]
                    versions += [IndexEntry(name, v, UNAVAILABLE, why)
                                 for v, why in self._skipped.get(name, {}).items() if v not in loaded]
                    entries += sorted(versions, key=lambda e: _version_sort_key(e.version))
                    continue
                reason = self._failures.get(name, "")
                if not reason and name in folders and folders[name].problem:
                    reason = str(ModelConfigError(folders[name].path, "", folders[name].problem))
                entries.append(IndexEntry(name, "", UNAVAILABLE, reason or "not loaded"))
        return entries

    # -- load / unload ----------------------------------------------------
    def load(self, name: str, not_served: dict[str, str] | None = None,
             serving: list[str] | None = None) -> list[ModelVersion]:
        """Load (or reload) every version of ``name``; on error the previous versions stay live.

        Any error is kept as the model's reason (``index``, ``unavailable_reason``) and raised: a
        ``ModelConfigError`` for what is wrong with the model's files, anything else is a kernel bug.
        ``not_served``, if given, gets the numbered version folders this load could not serve
        (``versions_not_served`` as this load left them: read later, another load or unload of ``name``
        may have changed them, and RepositoryModelLoad answered for that one). ``serving``, if given, gets the
        versions a failed load left serving (the ones loaded before), read before the model's lock is let go too."""
        with self._loads_done:
            self._loads += 1
        try:
            with self._one_at_a_time(name):
                try:
                    loaded = self._load(name)
                except Exception:
                    if serving is not None:
                        serving.extend(mv.version for mv in self.loaded_versions(name))
                    raise
                if not_served is not None:
                    not_served.update(self.versions_not_served(name))
                return loaded
        finally:
            with self._loads_done:
                self._loads -= 1
                self._loads_done.notify_all()

    @contextmanager
    def _one_at_a_time(self, name: str) -> Iterator[None]:
        """Hold ``name``'s own lock: loads and unloads of one model run one after the other, as Triton
        runs them, each reading the files when its turn comes. Two at once published in the order they
        *ended*: a reload that read the files first but took longer (a slower model to profile) replaced
        what a later reload had loaded from the files as they are now, and served the stale model after
        both answered OK; an unload that answered OK while a load ran was undone when that load ended (a
        lifecycle audit)."""
        with self._lock:
            entry = self._changing.get(name)
            if entry is None:
                entry = self._changing[name] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._changing[name]

    def wait_for_loads(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the loads in progress to end; whether none is left. A stop must: a
        process that exits while a thread is inside onnxruntime's session creation aborts ("terminate called
        without an active exception", exit 134: a drain audit cut a RepositoryModelLoad with a second signal)."""
        with self._loads_done:
            return self._loads_done.wait_for(lambda: self._loads == 0, timeout_s)

    def _load(self, name: str) -> list[ModelVersion]:
        started = time.monotonic_ns()
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelConfigError(model_dir, "", "no such model folder in the repository")
        fresh: dict[str, ModelVersion] = {}
        try:
            folder = scan_folder(model_dir)
            if folder.problem:
                raise ModelConfigError(model_dir, "", folder.problem)
            for unread in model_config.unread(model_dir):
                if unread.refused:  # refused, not silently ignored
                    raise ModelConfigError(unread.path, "", unread.why)
                log.warning("model %s: %s: %s", name, unread.path, unread.why)
            failed = self._load_versions(name, model_dir, folder.versions, fresh)
            # A version that cannot be loaded is not served, and the others are (Triton's `version_policy:
            # all`): one corrupt version 2 made version 1 unavailable too, and every pipeline on the model with
            # it. But a reload never takes away a version that serves now: then the whole reload fails.
            serving = self._models.get(name, {})
            lost = [version for version in failed if version in serving]
            if failed and (not fresh or lost):
                raise failed[lost[0] if lost else next(iter(failed))]
            for checker in self._checkers:
                checker(list(fresh.values()))
            # (inside: a preparer that failed, the scheduler refusing a setting, left the index saying "not loaded"
            # with no reason, and requests NOT_FOUND; a model repository audit)
            for preparer in self._preparers:
                preparer(list(fresh.values()))
        except Exception as exc:
            with self._lock:
                self._failures[name] = _reason(model_dir, exc)
            raise
        with self._lock:
            serving = self._models.get(name, {})
            old = list(serving.values())
            for version, mv in fresh.items():
                if version in serving:
                    # A reloaded version keeps counting where it was, and what the retired object still
                    # finishes (queued at the reload) is counted too (a statistics audit: a reload zeroed
                    # ModelStatistics, and those requests' successes were counted nowhere).
                    mv.stats = serving[version].stats
            # The latest first: ``get`` reads without the lock, and a default-version request arriving
            # between the two would find versions but no latest ("no loaded version ''; loaded versions: 1").
            self._latest[name] = fresh[max(fresh, key=_version_sort_key)]
            self._models[name] = fresh
            self._failures.pop(name, None)
            skipped = dict(folder.skipped)
            skipped.update((version, _reason(model_dir / version, exc)) for version, exc in failed.items())
            self._skipped[name] = skipped
        for version, why in skipped.items():
            log.warning("model %s: %s: that version is not served", name, why)
        for mv in fresh.values():
            log.info(
                "loaded %s/%s on %s (max_batch_size=%d, instances=%d%s) in %.1f ms",
                name, mv.version, mv.runtime.provider, mv.config.max_batch_size, mv.config.instances,
                ", config derived from graph" if mv.config.derived else "",
                (time.monotonic_ns() - started) / 1e6,
            )
        self._notify(list(fresh.values()), old)
        return list(fresh.values())

    @staticmethod
    def _load_versions(name: str, model_dir: Path, versions: list[str], fresh: dict) -> dict[str, Exception]:
        """Load each of ``versions`` into ``fresh``; returns the ones that failed, with their errors."""
        failed: dict[str, Exception] = {}
        for version in versions:
            version_dir = model_dir / version
            toml = version_dir / "model.toml"
            try:
                config, config_sha256 = (model_config.load_with_digest(toml, name, version) if toml.is_file()
                                         else (None, ""))
                runtime = OnnxModel.load(version_dir / "model.onnx", config, name, version, config_sha256)
            except Exception as exc:
                failed[version] = exc
                continue
            fresh[version] = ModelVersion(name, version, runtime)
        return failed

    def unload(self, name: str) -> list[ModelVersion]:
        """Stop routing new requests to ``name``; in-flight batches finish on their own. A load of ``name``
        in progress ends first (``_one_at_a_time``)."""
        with self._one_at_a_time(name):
            return self._unload(name)

    def _unload(self, name: str) -> list[ModelVersion]:
        with self._lock:
            old = list(self._models.pop(name, {}).values())  # (before the latest: the reverse of load's order)
            self._latest.pop(name, None)
            self._skipped.pop(name, None)
            # (an unload ends what a failed load said too: a request for it then heard that stale load error
            # as UNAVAILABLE, not "not loaded"; a model operator's audit)
            self._failures.pop(name, None)
        if old:
            log.info("unloaded %s (versions %s)", name, ", ".join(mv.version for mv in old))
            self._notify([], old)
        return old

    def load_all(self) -> tuple[list[ModelVersion], dict[str, str]]:
        """Load every model folder in the repository; returns what loaded and why the others failed.
        One model that cannot be loaded, for whatever reason, never keeps the others from serving."""
        loaded, failed = [], {}
        for name in self.scan():
            try:
                loaded += self.load(name)
            except ModelConfigError as exc:
                failed[name] = str(exc)
                log.error("model %s not loaded: %s", name, exc)
            except (KernelError, OSError) as exc:  # its deployment not on the record (a full disk): said in one line
                failed[name] = str(exc)
                log.error("model %s not loaded: %s", name, getattr(exc, "message", None) or exc)
            except Exception:  # a kernel bug, met by this model only: its traceback, and the others load
                failed[name] = self._failures.get(name, "could not be loaded")
                log.exception("model %s not loaded: unexpected error", name)
        return loaded, failed

    def _notify(self, added: list[ModelVersion], removed: list[ModelVersion]) -> None:
        for listener in self._listeners:
            listener(added, removed)


def _reason(where: Path, exc: BaseException) -> str:
    """Why a model (version) could not be loaded, as the index and UNAVAILABLE answers say it."""
    if isinstance(exc, ModelConfigError):
        return str(exc)
    return f"{where}: could not be loaded: {type(exc).__name__}: {exc}"
