"""The live set of loaded model versions: load, reload, unload with drain.

The repository directory is the source of truth for what *can* be loaded;
the hub holds what *is* loaded. Listeners (the scheduler, health status)
hear about every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import config as model_config
from .errors import ModelConfigError
from .runtime import OnnxModel
from .stats import ModelStats

log = logging.getLogger("aios.models")

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False, slots=True)
class ModelVersion:
    """One loaded version. Compared by identity: a reload makes a new object."""

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


def _version_sort_key(version: str):
    # Numeric versions sort numerically ("10" after "9"); others after, by name.
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


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
        self._listeners: list[Callable[[list[ModelVersion], list[ModelVersion]], None]] = []

    # -- discovery --------------------------------------------------------
    def available(self) -> dict[str, list[str]]:
        """Model names in the repository with their version folders (those holding model.onnx)."""
        found: dict[str, list[str]] = {}
        if not self.root.is_dir():
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = [v.name for v in model_dir.iterdir() if (v / "model.onnx").is_file()]
            if versions:
                found[model_dir.name] = sorted(versions, key=_version_sort_key)
        return found

    def add_listener(self, listener: Callable[[list[ModelVersion], list[ModelVersion]], None]) -> None:
        """``listener(added, removed)`` is called after every load/unload, outside the hub lock."""
        self._listeners.append(listener)

    # -- lookup -----------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelVersion | None:
        """A loaded version; ``version=""`` means the latest loaded one."""
        if not version:
            return self._latest.get(name)
        versions = self._models.get(name)
        return versions.get(version) if versions else None

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=_version_sort_key)

    def loaded(self) -> list[ModelVersion]:
        with self._lock:
            return [mv for versions in self._models.values() for mv in versions.values()]

    def index(self) -> list[IndexEntry]:
        """Every model in the repository or loaded, with its state and, if unavailable, why."""
        entries = []
        with self._lock:
            names = set(self.available()) | set(self._models) | set(self._failures)
            for name in sorted(names):
                loaded = self._models.get(name)
                if loaded:
                    entries += [IndexEntry(name, v, READY) for v in sorted(loaded, key=_version_sort_key)]
                else:
                    entries.append(IndexEntry(name, "", UNAVAILABLE, self._failures.get(name, "not loaded")))
        return entries

    # -- load / unload ----------------------------------------------------
    def load(self, name: str) -> list[ModelVersion]:
        """Load (or reload) every version of ``name``; on error the previous versions stay live."""
        started = time.monotonic_ns()
        model_dir = self.root / name
        versions = self.available().get(name)
        if not versions:
            raise ModelConfigError(model_dir, "", "no <version>/model.onnx found under this model folder")
        fresh: dict[str, ModelVersion] = {}
        try:
            stray = model_config.misplaced(model_dir)
            if stray is not None:  # refused, not silently ignored
                raise ModelConfigError(stray, "", "not read here: a model's settings go in each version's folder, "
                                       f"next to its model.onnx ({model_dir}/<version>/model.toml)")
            for version in versions:
                folder = model_dir / version
                toml = folder / "model.toml"
                config = model_config.load(toml, name, version) if toml.is_file() else None
                runtime = OnnxModel.load(folder / "model.onnx", config, name, version)
                fresh[version] = ModelVersion(name, version, runtime)
        except ModelConfigError as exc:
            with self._lock:
                self._failures[name] = str(exc)
            raise
        with self._lock:
            old = list(self._models.get(name, {}).values())
            self._models[name] = fresh
            self._latest[name] = fresh[max(fresh, key=_version_sort_key)]
            self._failures.pop(name, None)
        for mv in fresh.values():
            log.info(
                "loaded %s/%s on %s (max_batch_size=%d, instances=%d%s) in %.1f ms",
                name, mv.version, mv.runtime.provider, mv.config.max_batch_size, mv.config.instances,
                ", config derived from graph" if mv.config.derived else "",
                (time.monotonic_ns() - started) / 1e6,
            )
        self._notify(list(fresh.values()), old)
        return list(fresh.values())

    def unload(self, name: str) -> list[ModelVersion]:
        """Stop routing new requests to ``name``; in-flight batches finish on their own."""
        with self._lock:
            old = list(self._models.pop(name, {}).values())
            self._latest.pop(name, None)
        if old:
            log.info("unloaded %s (%d versions)", name, len(old))
            self._notify([], old)
        return old

    def load_all(self) -> tuple[list[ModelVersion], dict[str, str]]:
        """Load every model in the repository; returns what loaded and why the others failed."""
        loaded, failed = [], {}
        for name in self.available():
            try:
                loaded += self.load(name)
            except ModelConfigError as exc:
                failed[name] = str(exc)
                log.error("model %s not loaded: %s", name, exc)
        return loaded, failed

    def _notify(self, added: list[ModelVersion], removed: list[ModelVersion]) -> None:
        for listener in self._listeners:
            listener(added, removed)
