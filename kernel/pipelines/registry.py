"""The pipelines the kernel serves: a folder of ``*.toml`` files, reloaded on change.

A changed file is validated in full (its policy too, and against the model
it names) before it replaces the running version; an invalid one is
refused, logged with file and line, and the running version keeps serving.
``put`` is the same path for uploads over the API: the new text is checked,
then written atomically (temp file, fsync, rename) and activated.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument, NotFound
from .spec import Pipeline, PipelineError, load_pipeline, parse_pipeline

log = logging.getLogger("aios.pipelines")


class PipelineRegistry:
    def __init__(self, folder: str | Path, hub, load_policy, parse_policy=None, poll_s: float = 1.0):
        self.folder = Path(folder)
        self.hub = hub
        self._load_policy = load_policy
        self._parse_policy = parse_policy
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._active: dict[str, Pipeline] = {}
        self._seen: dict[Path, tuple[int, int]] = {}  # file -> (mtime_ns, size) last looked at
        self._reads: dict[Path, set[Path]] = {}  # pipeline file -> the files its last load read (its policy)
        self.errors: dict[str, str] = {}  # file -> why its latest content was refused
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.listeners = []  # fn(old: Pipeline | None, new: Pipeline): audited as policy changes

    # -- lookup ------------------------------------------------------------------
    def get(self, name: str) -> Pipeline:
        if not name:
            raise InvalidArgument("field 'pipeline' is empty")
        pipeline = self._active.get(name)
        if pipeline is None:
            names = ", ".join(sorted(self._active)) or "(none)"
            raise NotFound(f"pipeline '{name}' is not loaded; loaded pipelines: {names}")
        return pipeline

    def all(self) -> list[Pipeline]:
        return sorted(self._active.values(), key=lambda p: p.name)

    # -- loading ---------------------------------------------------------------
    def reload(self) -> list[str]:
        """Look at every file once; returns the names (re)activated. Never raises for a bad file.

        A pipeline is loaded again when its own file changed or a file it reads
        (its policy) did: a policy edited on disk, or uploaded with another
        pipeline, reaches every pipeline bound to it.
        """
        if not self.folder.is_dir():
            return []
        touched = []
        for path in sorted(self.folder.glob("*.toml")):
            try:
                stat = path.stat()
            except OSError:
                continue
            key = (stat.st_mtime_ns, stat.st_size)
            if self._seen.get(path) != key:
                self._seen[path] = key
                touched.append(path)
        if not touched:
            return []
        touched_files = {path.resolve() for path in touched}
        to_load = {path for path in touched if _looks_like_pipeline(path)}  # policies and other TOML live here too
        to_load |= {path for path, reads in self._reads.items() if reads & touched_files and path.exists()}
        changed = []
        for path in sorted(to_load):
            reads: set[Path] = set()

            def load_policy(policy_path, reads=reads):
                reads.add(Path(policy_path).resolve())
                return self._load_policy(policy_path)

            try:
                pipeline = self._bind(load_pipeline(path, load_policy))
            except PipelineError as exc:
                self.errors[str(path)] = str(exc)
                running = "; the running version keeps serving" if self._owner(path) else ""
                log.error("pipeline refused: %s%s", exc, running)
                continue
            finally:
                self._reads[path] = reads  # (a refused pipeline too: fixing its policy loads it again)
            self.errors.pop(str(path), None)
            if self._activate(pipeline):
                changed.append(pipeline.name)
        return changed

    def put(self, pipeline_text: bytes, policy_text: bytes | None = None) -> Pipeline:
        """Validate and activate uploaded pipeline (and optionally policy) text; refused whole if invalid."""
        if self._parse_policy is None:
            raise FailedPrecondition("this kernel was started without policy uploads")
        pending_policy = {}

        def policy_for(name: str):
            _check_file_name(name, "the name")
            if policy_text is not None:
                if _looks_like_pipeline(self.folder / name):
                    raise PipelineError(f"{name!r} is a pipeline file; a policy needs a file of its own")
                policy = self._parse_policy(policy_text.decode("utf-8", errors="replace"), source=name)
                pending_policy[name] = policy_text
                return policy
            return self._load_policy(self.folder / name)

        try:
            pipeline = self._bind(parse_pipeline(pipeline_text, "<upload>", policy_for))
            target = self.folder / f"{pipeline.name}.toml"
            _check_file_name(target.name, f"{pipeline.path}: [pipeline].name: its file name")
            if target.name in pending_policy or (target.exists() and not _looks_like_pipeline(target)):
                raise PipelineError(f"{pipeline.path}: [pipeline].name: {target.name!r} in the pipeline folder is "
                                    "another kind of file (a policy?); choose another name")
        except PipelineError as exc:
            raise InvalidArgument(f"refused, the running version keeps serving: {exc}") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, text in pending_policy.items():
            _write_atomically(self.folder / name, text)
        _write_atomically(target, pipeline_text)
        pipeline = _relocated(pipeline, str(target))
        stat = target.stat()
        self._seen[target] = (stat.st_mtime_ns, stat.st_size)
        self._activate(pipeline)
        return pipeline

    def _bind(self, pipeline: Pipeline) -> Pipeline:
        """Check the pipeline against the model it names (loaded, input width, output labels)."""
        mv = self.hub.get(pipeline.model, pipeline.model_version)
        where = f"{pipeline.path}: [model]"
        if mv is None:
            raise PipelineError(f"{where}.name: model '{pipeline.model}' version '{pipeline.model_version or 'latest'}' is not loaded")
        config = mv.config
        inputs = {spec.name: spec for spec in config.inputs}
        outputs = {spec.name: spec for spec in config.outputs}
        if pipeline.input not in inputs:
            raise PipelineError(f"{where}.input: model '{mv.name}' has no input '{pipeline.input}' (has {', '.join(inputs)})")
        if len(inputs) != 1:
            raise PipelineError(f"{where}.input: model '{mv.name}' takes {len(inputs)} inputs; pipelines feed exactly one")
        dims = inputs[pipeline.input].dims
        if tuple(dims) not in ((pipeline.width,), (-1,)):
            raise PipelineError(
                f"{where}.input: the fields encode {pipeline.width} columns but '{pipeline.input}' takes {list(dims)}"
            )
        if pipeline.output not in outputs:
            raise PipelineError(f"{where}.output: model '{mv.name}' has no output '{pipeline.output}' (has {', '.join(outputs)})")
        if not outputs[pipeline.output].labels:
            raise PipelineError(f"{where}.output: output '{pipeline.output}' of '{mv.name}' has no class `labels` in its model.toml")
        if not config.batching:
            raise PipelineError(f"{where}.name: model '{mv.name}' does not batch (max_batch_size = 0); pipelines need a batch dim")
        return pipeline

    def _owner(self, path: Path) -> Pipeline | None:
        return next((p for p in self._active.values() if p.path == str(path)), None)

    def _activate(self, pipeline: Pipeline) -> bool:
        with self._lock:
            old = self._active.get(pipeline.name)
            if old is not None and old.hash == pipeline.hash and old.policy.hash == pipeline.policy.hash:
                return False
            self._active = {**self._active, pipeline.name: pipeline}  # readers never see a half-updated dict
        log.info("pipeline %s active: version %s (%s), policy %s %s (%s)", pipeline.name, pipeline.label,
                 pipeline.hash[:12], pipeline.policy.name, pipeline.policy.version, pipeline.policy.hash[:12])
        for listener in self.listeners:
            listener(old, pipeline)
        return True

    # -- watching ----------------------------------------------------------------
    def start(self) -> None:
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
        while not self._stop.wait(self._poll_s):
            try:
                self.reload()
            except Exception:  # a watcher that dies silently would freeze every pipeline
                log.exception("pipeline reload failed")
                time.sleep(self._poll_s)


# Uploaded text becomes files named after it: keep each name (and its ".<name>.tmp" twin) a
# plain name of the folder, under the file systems' 255-byte limit.
MAX_FILE_NAME_BYTES = 240


def _check_file_name(name: str, what: str) -> None:
    if (not name or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES):
        raise PipelineError(f"{what} must be a plain file name for uploads (no '/', '\\', NUL or leading '.', "
                            f"at most {MAX_FILE_NAME_BYTES} bytes), got {name[:80]!r}")


def _looks_like_pipeline(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.strip() == "[pipeline]" for line in head.splitlines())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _relocated(pipeline: Pipeline, path: str) -> Pipeline:
    from dataclasses import replace

    return replace(pipeline, path=path)
