"""The registry's side of model loads: pipelines retried, checked and moved as the model versions under them change.

The model hub calls these around a load (``ModelHub.add_checker``, ``add_preparer``, ``add_listener``): a load that
would no longer fit a serving pipeline is refused before it is published, a pipeline following the newest version
moves before the version it decides on goes, and pipeline files refused for want of a model are tried again once it
loads.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from ..models.errors import ModelInUse
from .binding import bind
from .spec import Pipeline, PipelineError

log = logging.getLogger("aios.pipelines")


class ModelChanges:
    """``PipelineRegistry``'s hub hooks (a part of it: it uses the registry's state and lock)."""

    def _models_changed(self, added, removed) -> None:
        """The hub's listener: a model (version) loaded, so the pipeline files refused for want of it are
        tried again, and those serving on it are checked against the version now loaded."""
        names = {mv.name for mv in added}
        if not names or self._stop.is_set():
            return
        try:
            with self._work:
                paths = {path for path, (model, _) in self._waiting.items() if model in names}
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
            if not pipeline.model_version and newest is not mv and fits(pipeline, newest) is None:
                continue
            why = fits(pipeline, mv)
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
                        if now is not None and fits(pipeline, now) is None and fits(pipeline, mv) is None:
                            self._activate(replace(pipeline, bound_version=mv.version))
                            break
        except Exception:  # (a preparer that raises fails the load: this one only spares callers a retry)
            log.exception("moving the pipelines of model %s off the versions its load drops failed", name)


class _OneVersion:
    """A hub holding just ``mv``: what a pipeline is bound against to check it fits a version not yet published."""

    def __init__(self, mv):
        self.mv = mv

    def get(self, name: str, version: str = ""):
        return self.mv if name == self.mv.name and version in ("", self.mv.version) else None


def fits(pipeline: Pipeline, mv) -> str | None:
    """None when ``pipeline`` binds to model version ``mv``, else why not (the binding's own refusal)."""
    try:
        bind(replace(pipeline, model_version=mv.version), _OneVersion(mv))
    except PipelineError as exc:
        return str(exc)
    return None
