"""onnxruntime sessions for one model version: provider choice, graph checks, execution.

A version owns ``instances`` sessions. The scheduler never runs more batches
of one version at once than it has instances, so each batch takes a free
session from a small pool without waiting.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..threads import compute_levels, set_thread_nice
from . import datatypes
from .config import DEFAULT_MAX_BATCH_SIZE, ModelConfig, TensorSpec
from .errors import ModelConfigError

log = logging.getLogger("aios.models")

try:  # raised by a session whose execution provider failed; the public run handles it
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail as _EP_FAIL
except ImportError:  # another onnxruntime layout: use the public run only
    _EP_FAIL = None

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def choose_providers(preference: str, path: Path) -> list[str]:
    """onnxruntime providers for a ``provider`` preference, CUDA first when asked and present."""
    available = ort.get_available_providers()
    if preference == "cpu":
        return [CPU]
    if preference == "cuda":
        if CUDA not in available:
            raise ModelConfigError(
                path, "provider", f"'cuda' requested but onnxruntime offers only {', '.join(available)} "
                "(install the `gpu` extra on a machine with an NVIDIA GPU, or set provider = \"auto\")"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def provider_options(providers: list[str], config: ModelConfig) -> list:
    """``providers`` as onnxruntime takes them, with CUDA's options: TF32 only where the config allows it
    (onnxruntime's CUDA provider turns it on by default, so outputs would differ from the CPU's)."""
    return [(CUDA, {"use_tf32": "1" if config.cuda_tf32 else "0"}) if p == CUDA else p for p in providers]


def _session_options(config: ModelConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Explicit thread counts: onnxruntime's default (one thread per core) fights
    # the gRPC threads and other models for the same cores.
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Fatal only: run-time faults are raised to us and logged once, with request ids,
    # by the executor; onnxruntime's own copy on stderr would only duplicate them.
    options.log_severity_level = 4
    return options


def _graph_dims(shape: list) -> list[int]:
    """onnxruntime reports symbolic dims as strings or None: those are dynamic (-1)."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


# skl2onnx's default classifier export ends in ZipMap: a list of {class: score} maps per row.
_ZIPMAP_HINT = ("; scikit-learn classifiers exported by skl2onnx end in ZipMap: export with zipmap=False "
                "(options={id(model): {'zipmap': False}}) to get a tensor of probabilities")


def graph_datatype(path: Path, where: str, arg, label: str) -> datatypes.DataType:
    """The datatype of graph input/output ``arg``, or why the kernel cannot serve it (``where``: the field,
    ``label``: "input" or "output"). Only tensors of the element types in ``datatypes`` cross the wire."""
    found = datatypes.BY_ONNX.get(arg.type)
    if found is not None:
        return found
    served = ", ".join(datatypes.NAMES)
    if not arg.type.startswith("tensor("):
        hint = _ZIPMAP_HINT if arg.type.startswith("seq(map(") else ""
        if label == "output":
            hint += "; or declare only the tensor outputs in the version's model.toml"
        raise ModelConfigError(path, where, f"{label} {arg.name!r} is {arg.type}: only tensor inputs and outputs "
                               f"are served (of {served}){hint}")
    raise ModelConfigError(path, where, f"{label} {arg.name!r} is {arg.type}: the kernel has no datatype for that "
                           f"element type; served tensor types: {served}")


def derive_config(session: ort.InferenceSession, name: str, version: str,
                  path: Path | str = "model.onnx") -> ModelConfig:
    """A config read off the graph, for a version directory without ``model.toml`` (``path``: the graph's
    file, named by the error when a tensor cannot be served)."""
    args = list(session.get_inputs()) + list(session.get_outputs())
    batching = all(len(a.shape) >= 1 and _graph_dims(a.shape)[0] == -1 for a in args)

    def specs(label: str, graph_args) -> tuple[TensorSpec, ...]:
        found = []
        for index, arg in enumerate(graph_args):
            datatype = graph_datatype(path, f"{label}[{index}]", arg, label)
            dims = _graph_dims(arg.shape)
            found.append(TensorSpec(arg.name, datatype, tuple(dims[1:] if batching else dims)))
        return tuple(found)

    return ModelConfig(
        name=name,
        version=version,
        inputs=specs("input", session.get_inputs()),
        outputs=specs("output", session.get_outputs()),
        max_batch_size=DEFAULT_MAX_BATCH_SIZE if batching else 0,
        derived=True,
    )


def _check_tensor(path: Path, where: str, spec: TensorSpec, arg, batching: bool) -> None:
    graph_type = graph_datatype(path, f"{where}.datatype", arg, where.partition("[")[0])
    if graph_type is not spec.datatype:
        raise ModelConfigError(
            path, f"{where}.datatype", f"{spec.name!r} is {graph_type.name} in the graph, config says {spec.datatype.name}"
        )
    graph = _graph_dims(arg.shape)
    if batching:
        if not graph or graph[0] != -1:
            raise ModelConfigError(
                path, "max_batch_size",
                f"{spec.name!r} has no dynamic first (batch) dim in the graph (shape {arg.shape}); set max_batch_size = 0",
            )
        graph = graph[1:]
    if len(graph) != len(spec.dims):
        raise ModelConfigError(
            path, f"{where}.dims", f"{spec.name!r} has {len(graph)} per-row dims in the graph {arg.shape}, config says {list(spec.dims)}"
        )
    for want, have in zip(spec.dims, graph):
        if have != -1 and want != have:
            raise ModelConfigError(
                path, f"{where}.dims", f"{spec.name!r} is {arg.shape} in the graph, config says {list(spec.dims)}"
            )


def check_against_graph(config: ModelConfig, session: ort.InferenceSession, path: Path) -> None:
    """Refuse a config whose tensors disagree with the ONNX graph's real inputs/outputs."""
    for label, specs, args in (
        ("input", config.inputs, session.get_inputs()),
        ("output", config.outputs, session.get_outputs()),
    ):
        by_name = {a.name: a for a in args}
        for index, spec in enumerate(specs):
            if spec.name not in by_name:
                raise ModelConfigError(
                    path, f"{label}[{index}].name", f"{spec.name!r} is not a graph {label}; the graph has {sorted(by_name)}"
                )
            _check_tensor(path, f"{label}[{index}]", spec, by_name[spec.name], config.batching)
        if label == "input":
            missing = set(by_name) - {s.name for s in specs}
            if missing:
                first = sorted(missing)[0]
                graph_datatype(path, "input", by_name[first], "input")  # one it could not declare: say why
                raise ModelConfigError(path, "input", f"graph input {first!r} is not declared")


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks (a model can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_MODEL_FILES = {"model.onnx", "model.toml"}


def _tensors(graph):
    """Every tensor a graph holds, its subgraphs' (a Loop's, an If's) included: where external data is named."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def external_data_files(onnx_path: Path) -> list[str]:
    """The files ``onnx_path``'s tensors keep their values in (ONNX external data, relative to its folder), sorted;
    [] when it holds them all. The graph is parsed only when its folder holds some other file: external data
    must lie under the model's folder (onnx and onnxruntime refuse '..'), so a folder of model.onnx and
    model.toml alone has none."""
    folder = onnx_path.parent
    try:
        if {entry.name for entry in folder.iterdir()} <= _MODEL_FILES:
            return []
    except OSError:
        return []
    import onnx  # (here: a model in one file never needs it)

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # (onnxruntime's own load says what is wrong with the file)
        return []
    locations = sorted({entry.value for tensor in _tensors(graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
                        for entry in tensor.external_data if entry.key == "location"})
    for location in locations:
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise ModelConfigError(onnx_path, "", f"external data location {location!r} is outside the model's folder "
                                                  f"{folder}: its files must lie in it (a relative path without '..')")
    return locations


def model_files(onnx_path: Path) -> list[Path]:
    """``onnx_path`` and its external data files: what a session reads, so what its digest must cover."""
    return [onnx_path] + [onnx_path.parent / location for location in external_data_files(onnx_path)]


def model_sha256(files: list[Path]) -> str:
    """What names the model in ``files`` (``model_files``): model.onnx's own SHA-256 (hex) when it holds its weights,
    so `sha256sum model.onnx` checks it; else the SHA-256 of that and a line "<location> <sha256>" per side file.
    The weights decide too: hashing model.onnx alone named a model whose weights.bin was replaced with the same
    digest as before (a model repository audit)."""
    digest = file_sha256(files[0])
    if len(files) == 1:
        return digest
    folder = files[0].parent
    combined = hashlib.sha256(digest.encode())
    for path in files[1:]:
        combined.update(f"\n{path.relative_to(folder).as_posix()} {file_sha256(path)}".encode())
    return combined.hexdigest()


def _identity(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced: inode, size, modification time."""
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


# The load-time profile times batches up to this many rows, and of at most this many bytes in and out; the latency
# fit extrapolates beyond (it is a line). A ``max_batch_size = 4000000`` made the profile allocate and run 4M
# rows: 17.8 s and 3.7 GB at load (a scheduling audit), and a slightly larger one would kill the server.
PROFILE_MAX_ROWS = 256
PROFILE_MAX_BYTES = 16 << 20
# ... and of at most this much time in all: it stops before a size it predicts would go past it. A model taking
# 0.3 s a call held its load for 7 s, one taking seconds for minutes (a model repository audit).
PROFILE_BUDGET_NS = 2_000_000_000
PROFILE_ONE_RUN_NS = 20_000_000  # a call at least this long is timed once: best-of-repeats is for noise in short ones


def profile_rows(config) -> int:
    """The largest batch the load-time profile runs for ``config`` (1 for a model without a batch dim)."""
    if not config.batching:
        return 1
    row_bytes = sum(max(1, math.prod(spec.dims)) * max(1, spec.datatype.itemsize or 1) for spec in config.inputs)
    # What it answers too: a model answering 4 MiB a row for 4 bytes in was profiled up to 64 rows, 256 MiB of output
    # at each load (a model repository audit). (An output of a dynamic size is left out: it cannot be told here.)
    row_bytes += sum(math.prod(spec.dims) * max(1, spec.datatype.itemsize) for spec in config.outputs
                     if -1 not in spec.dims)
    return max(1, min(config.max_batch_size, PROFILE_MAX_ROWS, PROFILE_MAX_BYTES // max(1, row_bytes)))


class OnnxModel:
    """The executable part of a loaded version: its sessions and output order.

    ``onnx_sha256`` and ``config_sha256`` (hex; "" for a config derived from the graph) name the bytes
    this object was loaded from, hashed once at load: the audit log must name what decided, and the
    files on disk may have been replaced since.
    """

    __slots__ = ("config", "path", "provider", "output_names", "_free", "_direct", "onnx_sha256", "config_sha256", "probed_ranges")

    def __init__(self, config: ModelConfig, path: Path, sessions: list[ort.InferenceSession],
                 onnx_sha256: str = "", config_sha256: str = ""):
        self.config = config
        self.path = path
        self.onnx_sha256 = onnx_sha256
        self.config_sha256 = config_sha256
        self.provider = sessions[0].get_providers()[0]
        self.output_names = [spec.name for spec in config.outputs]
        # output name -> (lowest, highest) value it gave for an all-zeros and an all-ones row at the load-time
        # profile: what a pipeline's binding checks class scores against (probabilities stay in [0, 1]).
        self.probed_ranges: dict[str, tuple[float, float]] = {}
        self._free = list(sessions)
        # Call the session's binding directly when this onnxruntime has one where
        # we expect it (checked once); otherwise the public run.
        self._direct = _EP_FAIL is not None and all(callable(getattr(getattr(s, "_sess", None), "run", None))
                                                   for s in sessions)

    @classmethod
    def load(cls, onnx_path: Path, config: ModelConfig | None, name: str, version: str,
             config_sha256: str = "") -> "OnnxModel":
        """Create the sessions; with ``config=None`` the config is derived from the graph.

        ``config_sha256``: the hash of the model.toml bytes ``config`` was parsed from
        (``config.load_with_digest``), kept on the model with the ONNX file's own.
        """
        files = model_files(onnx_path)
        try:
            before = [_identity(path) for path in files]
            onnx_sha256 = model_sha256(files)
        except OSError as exc:
            where = onnx_path if exc.filename in (None, str(onnx_path)) else Path(exc.filename)
            raise ModelConfigError(where, "", f"cannot be read: {exc.strerror or exc}"
                                   + ("" if where == onnx_path else f" (external data of {onnx_path})")) from None
        preference = config.provider if config else "auto"
        providers = choose_providers(preference, onnx_path.with_name("model.toml"))
        first_config = config or _defaults(name, version)
        try:
            first = ort.InferenceSession(str(onnx_path), _session_options(first_config),
                                         providers=provider_options(providers, first_config))
        except Exception as exc:  # onnxruntime raises several exception types for a bad file
            raise ModelConfigError(onnx_path, "", f"onnxruntime cannot load it: {exc}") from None
        if config is None:
            config = derive_config(first, name, version, onnx_path)
        else:
            check_against_graph(config, first, onnx_path.with_name("model.toml"))
        sessions = [first] + [
            ort.InferenceSession(str(onnx_path), _session_options(config), providers=provider_options(providers, config))
            for _ in range(config.instances - 1)
        ]
        _check_unchanged(files, before)
        model = cls(config, onnx_path, sessions, onnx_sha256, config_sha256)
        _check_rows_independent(model, onnx_path)
        if CUDA in providers and model.provider != CUDA:
            log.warning("%s/%s: CUDA was available but onnxruntime placed the model on %s", name, version, model.provider)
        return model

    def _zeros(self, rows: int) -> dict[str, np.ndarray]:
        """Feeds of ``rows`` rows of zeros (empty strings for BYTES)."""
        config = self.config
        return {spec.name: np.full(([rows] if config.batching else []) + list(spec.dims),
                                   "" if spec.datatype.name == "BYTES" else 0, dtype=spec.datatype.numpy)
                for spec in config.inputs}

    def probe(self) -> None:
        """The load-time probe alone (``probed_ranges``; the profile runs it first), for a check that serves
        nothing (``aios-kernel pipelines check``). A model that cannot run on zeros is left unprobed."""
        if any(-1 in spec.dims for spec in self.config.inputs):
            return
        try:
            self._probe(self._zeros(1))
        except Exception as exc:  # (as the profile: a model may reject zeros)
            log.debug("%s/%s: no probe (%s)", self.config.name, self.config.version, exc)

    def _probe(self, zeros: dict[str, np.ndarray]) -> None:
        """Run ``zeros`` (the profile's first batch) and the same shapes filled with ones; note each float
        output's range (``probed_ranges``)."""
        self._note_ranges(self.run(zeros))
        if all(feed.dtype.kind in "biuf" for feed in zeros.values()):
            try:  # (a model that runs on zeros but not on ones, an index into a one-row table, keeps its profile)
                self._note_ranges(self.run({name: np.ones_like(feed) for name, feed in zeros.items()}))
            except Exception as exc:
                log.debug("%s/%s: no all-ones probe (%s)", self.config.name, self.config.version, exc)

    def _note_ranges(self, outputs) -> None:
        for name, out in zip(self.output_names, outputs):
            out = np.asarray(out)
            if out.dtype.kind == "f" and out.size and np.isfinite(out).all():
                low, high = float(out.min()), float(out.max())
                seen = self.probed_ranges.get(name, (low, high))
                self.probed_ranges[name] = (min(seen[0], low), max(seen[1], high))

    def profile(self, repeats: int = 3) -> list[tuple[int, int]]:
        """Time batches of 1, 2, 4, ... max rows on zeros: the latency model's warm start, within
        ``PROFILE_BUDGET_NS``.

        Returns [(rows, ns)] (best of ``repeats`` per size); empty when the
        model cannot run on zeros (data-dependent shapes) or has dynamic
        per-row dims the profile cannot guess.
        """
        config = self.config
        if any(-1 in spec.dims for spec in config.inputs):
            return []
        largest = profile_rows(config)
        sizes = [1]
        while config.batching and sizes[-1] * 2 <= largest:
            sizes.append(sizes[-1] * 2)
        if config.batching and sizes[-1] != largest:
            sizes.append(largest)
        samples = []
        began = time.monotonic_ns()
        try:
            for rows in sizes:
                if samples:
                    # Linear from the last size through zero: no less than the fitted line (its fixed cost) predicts.
                    last_rows, last_ns = samples[-1]
                    predicted = last_ns * rows // last_rows
                    runs = 1 if predicted >= PROFILE_ONE_RUN_NS else repeats
                    if time.monotonic_ns() - began + predicted * runs > PROFILE_BUDGET_NS:
                        break
                feeds = self._zeros(rows)
                if not samples:  # the first run pays one-off allocations: keep it out of the fit
                    self._probe(feeds)
                best = None
                for _ in range(repeats):
                    started = time.monotonic_ns()
                    self.run(feeds)
                    elapsed = time.monotonic_ns() - started
                    best = elapsed if best is None else min(best, elapsed)
                    if elapsed >= PROFILE_ONE_RUN_NS:
                        break
                samples.append((rows, best))
        except Exception as exc:  # a model may reject zeros; the fit then learns from live traffic
            log.debug("%s/%s: no load-time profile (%s)", config.name, config.version, exc)
            return []
        return samples

    def run(self, feeds: dict[str, np.ndarray], options=None) -> list[np.ndarray]:
        """Run one batch; the caller guarantees no more concurrent runs than instances. ``options``: an onnxruntime
        ``RunOptions`` whose ``terminate`` another thread may set to stop the run (scheduling/stopping.py)."""
        free = self._free
        # list.pop/append are atomic under the GIL: no lock needed for the pool.
        session = free.pop()
        # A lower-priority batch next to urgent traffic computes at a lower OS priority
        # (Lane batch_nice); onnxruntime lets go of the GIL while it computes.
        levels = compute_levels()
        if levels is not None:
            set_thread_nice(levels[0])
        try:
            inner = session._sess if self._direct else None
            if inner is None:
                return session.run(self.output_names, feeds, options)
            try:
                # The binding under InferenceSession.run, without its per-call checks
                # (~1 µs here): our feeds are numpy arrays for exactly the graph's
                # inputs, already validated by the caller.
                return inner.run(self.output_names, feeds, options)
            except _EP_FAIL:
                # The public run falls back to the next provider (once), as it would have.
                return session.run(self.output_names, feeds, options)
        finally:
            if levels is not None:
                set_thread_nice(levels[1])
            free.append(session)


def _check_unchanged(files: list[Path], before: list[tuple[int, int, int]]) -> None:
    """The sessions read the files after they were hashed: refuse a load during which one was replaced, since
    the hash would then name bytes the sessions never ran."""
    for path, identity in zip(files, before):
        try:
            same = _identity(path) == identity
        except OSError:
            same = False
        if not same:
            raise ModelConfigError(path, "", "the file changed while it was being loaded; load the model again")


def _same_rows(batched: np.ndarray, alone: np.ndarray) -> bool:
    if batched.shape != alone.shape:
        return False
    if batched.dtype.kind in "fc":
        # A batched GEMM (a GPU's kernels most) may round differently in the last bits: that is no mixing. So a few
        # units in the last place of the dtype (FP16's are 1e-3) at the outputs' scale, never under 1e-3 relative.
        tolerance = max(1e-3, 16 * float(np.finfo(batched.dtype).eps))
        finite = np.abs(np.concatenate([batched.ravel(), alone.ravel()]).astype(np.float64))
        finite = finite[np.isfinite(finite)]
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        return bool(np.allclose(batched, alone, rtol=tolerance, atol=max(1e-5, tolerance * scale), equal_nan=True))
    return bool(np.array_equal(batched, alone))


def _check_rows_independent(model: OnnxModel, onnx_path: Path) -> None:
    """Refuse to batch a model whose output rows depend on the other rows of their batch: an all-zeros and an
    all-ones row, each run alone, then both in one batch. A batch-wide step (a mean over the batch, BatchNorm in
    training mode) keeps the batch dim, so its outputs slice back one row a request, each made from the other
    requests' inputs too, and nothing at run time can tell (a model repository audit). Skipped where such rows
    cannot be made (dynamic per-row dims, BYTES) or the model does not run on them: those are left to live traffic,
    as is a batch answered with the wrong number of rows (never sliced out: kernel/scheduling/execute.py)."""
    config = model.config
    if config.max_batch_size < 2:  # (1: one row a call, never two requests together)
        return
    if any(-1 in spec.dims or spec.datatype.name == "BYTES" for spec in config.inputs):
        return
    zeros = model._zeros(1)
    ones = {name: np.ones_like(feed) for name, feed in zeros.items()}
    try:
        alone = (model.run(zeros), model.run(ones))
    except Exception as exc:  # (a model may reject such rows: an index into a one-row table)
        log.debug("%s/%s: no batch check (%s)", config.name, config.version, exc)
        return
    where = (onnx_path, "max_batch_size") if config.derived else (onnx_path.with_name("model.toml"), "max_batch_size")
    try:
        together = model.run({name: np.concatenate([zeros[name], ones[name]]) for name in zeros})
    except Exception as exc:
        # Each row ran alone: two together failing is the batch itself (a graph exported with its batch fixed at 1).
        # Loaded, every batch of several requests failed and ran again one by one, for good (a model repository audit).
        raise ModelConfigError(
            *where, f"the model runs one row alone but fails on two rows ({str(exc).strip()}): it cannot batch requests; set "
                    f"max_batch_size = 1 in {config.name}/{config.version}/model.toml (or 0)") from None
    for index, name in enumerate(model.output_names):
        out = np.asarray(together[index])
        if out.ndim == 0 or out.shape[0] != 2:
            continue
        for row, single in enumerate(alone):
            if not _same_rows(out[row:row + 1], np.asarray(single[index])):
                try:  # (a model drawing random numbers answers a row differently each call, in a batch or not)
                    again = model.run(ones if row else zeros)
                except Exception:
                    return
                if not _same_rows(np.asarray(again[index]), np.asarray(single[index])):
                    return
                raise ModelConfigError(
                    *where,
                    f"output '{name}' of a row changes with the other rows in its batch (an all-{'ones' if row else 'zeros'} "
                    f"row gave {np.asarray(single[index]).ravel()[:4].tolist()} alone, "
                    f"{out[row:row + 1].ravel()[:4].tolist()} beside another row): the graph has a batch-wide step (a "
                    "mean or normalization over the batch), so batching would mix requests' answers; set "
                    f"max_batch_size = 0 in {config.name}/{config.version}/model.toml (dims: the whole tensor, each request "
                    "runs alone), or 1")


def _defaults(name: str, version: str) -> ModelConfig:
    return ModelConfig(name=name, version=version, inputs=(), outputs=())
