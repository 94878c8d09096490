"""``model.toml``: what a model version declares about itself.

Layout of a repository::

    models/<name>/<version>/model.onnx
    models/<name>/<version>/model.toml   # optional: derived from the graph when absent
    (files beside the versions are not read: ``unread()`` below says which and what follows)

Schema (every key optional unless marked)::

    name = "claims_triage"     # the model's folder name, if given (another name is refused)
    platform = "onnxruntime_onnx"
    max_batch_size = 64        # rows per batch; 0 = the model has no batch dimension
    instances = 1              # onnxruntime sessions for this version (1..1024)
    provider = "auto"          # auto | cpu | cuda
    cuda_tf32 = false          # let CUDA use TF32 matmuls: faster, but results differ from the CPU's in the 4th digit
    intra_op_threads = 1
    inter_op_threads = 1
    priority = 2               # default request priority, 1..priority_levels: 1 = urgent (may use the lane's
                               # urgent slot), higher = later
    weight = 1.0               # fair share of its lane against other models (0.001 to 1000)
    max_queue_delay_us = 0     # Triton-like static batching window (0 = adaptive)
    preferred_batch_sizes = [] # with a static window: dispatch the largest of these the queue can form, at once
    priority_levels = 3        # request priorities 1..N (1 = most urgent)
    max_queue = 4096           # queued requests per priority level before RESOURCE_EXHAUSTED
    max_tenant_queue = 1024    # queued requests per tenant, across its priority levels

    [[input]]                  # required when model.toml exists
    name = "features"
    datatype = "FP32"          # KServe v2 datatype names
    dims = [12]                # per row (batch dim implied when max_batch_size > 0); -1 = dynamic
                               # (Triton's `optional = true` is refused: every input must be sent)

    [[output]]
    name = "probabilities"
    datatype = "FP32"
    dims = [3]
    labels = ["approve", "review", "deny"]   # optional; one per value of a row (class names for decisions)

    [card]                     # the model card: free text plus metrics
    owner = "..."
    intended_use = "..."
    training_data = "..."
    limitations = "..."
    [card.metrics]
    accuracy = 0.91
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import datatypes
from .errors import ModelConfigError

PLATFORM = "onnxruntime_onnx"
PROVIDERS = ("auto", "cpu", "cuda")
MAX_PRIORITY_LEVELS = 16  # the compiled scheduler keeps per-level counters in a fixed array
DEFAULT_MAX_BATCH_SIZE = 64  # rows; used when the config is derived from a graph with a dynamic batch dim
MIN_WEIGHT, MAX_WEIGHT = 1e-3, 1e3

_TOP_KEYS = {
    "platform", "max_batch_size", "instances", "provider", "intra_op_threads",
    "inter_op_threads", "priority", "weight", "max_queue_delay_us",
    "preferred_batch_sizes", "input", "output", "card", "name", "priority_levels", "max_queue",
    "max_tenant_queue", "cuda_tf32",
}
_TENSOR_KEYS = {"name", "datatype", "dims", "labels", "optional"}
# Triton's config.pbtxt keys a migrating user writes here, with where the kernel takes that setting from.
_TRITON_KEYS = {
    "version_policy": " (Triton's version_policy: every numbered version folder with a model.onnx is served, as "
                      "Triton's `all`; a request without a version gets the highest; to serve fewer, remove the "
                      "others' folders and load the model again)",
    "dynamic_batching": " (Triton's dynamic_batching: batching is adaptive by default; max_queue_delay_us and "
                        "preferred_batch_sizes set a static window)",
    "instance_group": " (Triton's instance_group: instances = N and provider = \"cpu\" | \"cuda\")",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: datatypes.DataType
    dims: tuple[int, ...]  # per row, without the batch dim when the model batches
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelCard:
    owner: str = ""
    intended_use: str = ""
    training_data: str = ""
    limitations: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    instances: int = 1
    provider: str = "auto"
    # Off by default: a decision must replay to the same outputs on any device, and
    # TF32's 10-bit mantissa moves scores by ~1e-3 (enough to flip a threshold).
    cuda_tf32: bool = False
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    priority: int = 2
    weight: float = 1.0
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 3
    max_queue: int = 4096
    max_tenant_queue: int = 1024
    card: ModelCard = field(default_factory=ModelCard)
    derived: bool = False  # True when no model.toml existed and the graph told us
    # Looked up on every request: computed once here.
    inputs_by_name: dict = field(init=False, repr=False, compare=False)
    full_shapes: dict = field(init=False, repr=False, compare=False)
    # The fast path of request decoding (kernel/api/tensors.py): name -> (datatype
    # name, numpy dtype, per-row dims as a list, bytes per row) for every input, or None
    # when some input has a dynamic per-row dim or is BYTES (those take the
    # general path); and the batching shape key all such requests share.
    raw_inputs: dict | None = field(init=False, repr=False, compare=False)
    fixed_shape_key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs_by_name", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "full_shapes", {
            spec.name: (([-1] if self.max_batch_size > 0 else []) + list(spec.dims))
            for spec in (*self.inputs, *self.outputs)
        })
        fixed = bool(self.inputs) and all(
            spec.datatype.name != "BYTES" and -1 not in spec.dims and min(spec.dims, default=1) >= 0
            for spec in self.inputs
        )
        raw_inputs = None
        if fixed:
            raw_inputs = {}
            for spec in self.inputs:
                row_items = 1
                for dim in spec.dims:
                    row_items *= dim
                raw_inputs[spec.name] = (spec.datatype.name, spec.datatype.numpy, list(spec.dims),
                                         row_items * spec.datatype.itemsize)
        object.__setattr__(self, "raw_inputs", raw_inputs)
        object.__setattr__(self, "fixed_shape_key",
                           tuple(spec.dims for spec in self.inputs) if fixed and self.max_batch_size > 0 else ())

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def schedule(self):
        """How the scheduler treats this version."""
        from ..scheduling.policy import ModelSchedule

        return ModelSchedule(
            max_batch_size=self.max_batch_size,
            instances=self.instances,
            weight=self.weight,
            priority_levels=self.priority_levels,
            max_queue=self.max_queue,
            max_tenant_queue=self.max_tenant_queue,
            max_queue_delay_ns=self.max_queue_delay_us * 1000,
            preferred_batch_sizes=self.preferred_batch_sizes,
        )

    def full_shape(self, spec: TensorSpec) -> list[int]:
        """The tensor's shape as a client sees it: -1 for the batch dim when batching."""
        return list(self.full_shapes[spec.name])


def _expect(path: Path, key: str, value: Any, kind: type | tuple, what: str) -> Any:
    # bool is an int subclass in Python; a TOML `true` must not pass as a number.
    if isinstance(value, bool) and kind is not bool:
        raise ModelConfigError(path, key, f"must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ModelConfigError(path, key, f"must be {what}, got {value!r}")
    return value


MAX_QUEUE_DELAY_US = 10_000_000


# Triton's ModelConfig fields (max_batch_size, an instance group's count, max_queue_size), onnxruntime's thread counts
# and the compiled scheduler's counters are 32-bit: max_batch_size = 2**31 loaded and every ModelConfig call answered
# INTERNAL; past 2**63 the scheduler refused it with a traceback at start (a model repository audit).
MAX_INT_SETTING = 2**31 - 1
# onnxruntime sessions of one version, each a whole copy of the model's weights and arena. A lane runs at most its
# slots (kernel.toml's lane_slots, at most 1024) + its urgent one at once, so sessions past that never run on any lane
# and only take memory (the server warns past the lane it got). Within MAX_INT_SETTING, instances = 2**31 - 1 made
# the load create sessions one after another until memory ran out (a review of the model repository audit's bound).
MAX_INSTANCES = 1024


def _int(path: Path, table: dict, key: str, default: int, minimum: int, bounded: bool = True) -> int:
    """``bounded=False``: the caller checks a lower maximum of its own, with its own words."""
    value = _expect(path, key, table.get(key, default), int, "an integer")
    if value < minimum:
        raise ModelConfigError(path, key, f"must be >= {minimum}, got {value}")
    if bounded and value > MAX_INT_SETTING:
        raise ModelConfigError(path, key, f"must be at most {MAX_INT_SETTING}, got {value}")
    return value


def _tensor(path: Path, model: str, where: str, raw: Any) -> TensorSpec:
    _expect(path, where, raw, dict, "a table")
    unknown = set(raw) - _TENSOR_KEYS
    if unknown:
        raise ModelConfigError(path, f"{where}.{sorted(unknown)[0]}", "unknown key")
    name = _expect(path, f"{where}.name", raw.get("name"), str, "a tensor name (string)")
    _refuse_optional(path, model, where, name, raw)
    dt_name = _expect(path, f"{where}.datatype", raw.get("datatype"), str, "a datatype name")
    try:
        dt = datatypes.from_name(dt_name)
    except KeyError:
        raise ModelConfigError(
            path, f"{where}.datatype", f"unknown datatype {dt_name!r}; one of {', '.join(datatypes.NAMES)}"
        ) from None
    dims = _expect(path, f"{where}.dims", raw.get("dims", []), list, "a list of integers")
    for d in dims:
        _expect(path, f"{where}.dims", d, int, "a list of integers")
        if d < -1 or d == 0:
            raise ModelConfigError(path, f"{where}.dims", f"each dim must be > 0 or -1 (dynamic), got {d}")
    labels = _expect(path, f"{where}.labels", raw.get("labels", []), list, "a list of strings")
    for label in labels:
        _expect(path, f"{where}.labels", label, str, "a list of strings")
    if labels and dims and dims[-1] != -1 and len(labels) != dims[-1]:
        # (a decision names a class per score: with fewer names its scores could not all be reported)
        raise ModelConfigError(path, f"{where}.labels",
                               f"{len(labels)} labels for {dims[-1]} values per row (dims {dims}): one label a value")
    return TensorSpec(name=name, datatype=dt, dims=tuple(dims), labels=tuple(labels))


def _refuse_optional(path: Path, model: str, where: str, name: str, raw: dict) -> None:
    """Triton's ``optional`` tensor key. An input left out of a request would have to be fed to onnxruntime
    from somewhere, and a graph input cannot be skipped: so ``true`` is refused here rather than accepted
    and then failing (or being silently required) per request. ``false`` says what is so, and passes."""
    optional = _expect(path, f"{where}.optional", raw.get("optional", False), bool, "true or false")
    if optional:
        raise ModelConfigError(
            path, f"{where}.optional",
            f"model '{model}', tensor '{name}': optional inputs are not supported (every input must be sent "
            "with each request); remove the key",
        )


def _card(path: Path, raw: Any) -> ModelCard:
    _expect(path, "card", raw, dict, "a table")
    metrics = _expect(path, "card.metrics", raw.get("metrics", {}), dict, "a table of numbers")
    for key, value in metrics.items():
        _expect(path, f"card.metrics.{key}", value, (int, float), "a number")
    known = {"owner", "intended_use", "training_data", "limitations", "metrics"}
    text = {}
    for key, value in raw.items():
        if key != "metrics":
            text[key] = str(_expect(path, f"card.{key}", value, str, "a string"))
    return ModelCard(
        owner=text.get("owner", ""),
        intended_use=text.get("intended_use", ""),
        training_data=text.get("training_data", ""),
        limitations=text.get("limitations", ""),
        metrics={k: float(v) for k, v in metrics.items()},
        extra={k: v for k, v in text.items() if k not in known},
    )


def _levels(path: Path, raw: dict) -> int:
    levels = _int(path, raw, "priority_levels", 3, 1)
    if levels > MAX_PRIORITY_LEVELS:
        raise ModelConfigError(path, "priority_levels", f"must be at most {MAX_PRIORITY_LEVELS}, got {levels}")
    return levels


def _instances(path: Path, raw: dict) -> int:
    instances = _int(path, raw, "instances", 1, 1, bounded=False)
    if instances > MAX_INSTANCES:
        raise ModelConfigError(path, "instances", f"must be at most {MAX_INSTANCES} (onnxruntime sessions, each a "
                                                  f"copy of the model in memory), got {instances}")
    return instances


def parse(path: Path, name: str, version: str, raw: dict) -> ModelConfig:
    """Validate a parsed ``model.toml`` table; errors name the file and the field."""
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ModelConfigError(path, key, f"unknown key{_TRITON_KEYS.get(key, '')}; known keys: {', '.join(sorted(_TOP_KEYS))}")
    declared = raw.get("name", name)
    if declared != name:  # as Triton: a model is named by its folder; a second name would only mislead
        raise ModelConfigError(path, "name", f"must be the model's folder name {name!r} (or left out), got {declared!r}")
    platform = raw.get("platform", PLATFORM)
    if platform != PLATFORM:
        raise ModelConfigError(path, "platform", f"only {PLATFORM!r} is supported, got {platform!r}")
    provider = _expect(path, "provider", raw.get("provider", "auto"), str, "a string")
    if provider not in PROVIDERS:
        raise ModelConfigError(path, "provider", f"must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    inputs = _expect(path, "input", raw.get("input"), list, "a list of [[input]] tables (at least one)")
    outputs = _expect(path, "output", raw.get("output"), list, "a list of [[output]] tables (at least one)")
    if not inputs:
        raise ModelConfigError(path, "input", "at least one [[input]] is required")
    if not outputs:
        raise ModelConfigError(path, "output", "at least one [[output]] is required")
    in_specs = tuple(_tensor(path, name, f"input[{i}]", t) for i, t in enumerate(inputs))
    out_specs = tuple(_tensor(path, name, f"output[{i}]", t) for i, t in enumerate(outputs))
    for label, specs in (("input", in_specs), ("output", out_specs)):
        seen = set()
        for index, spec in enumerate(specs):
            if spec.name in seen:
                raise ModelConfigError(path, f"{label}[{index}].name", f"duplicate tensor name {spec.name!r}")
            seen.add(spec.name)
    weight = _expect(path, "weight", raw.get("weight", 1.0), (int, float), "a number")
    # Bounded both ways: fair share adds each batch's time / weight to a virtual clock, and 1e-300 sent it to
    # infinity after a few batches, where every model of the lane ties for good (a scheduling audit).
    if not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):  # (nan fails both comparisons)
        raise ModelConfigError(path, "weight", f"must be a finite number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g} "
                                               f"(a share relative to the lane's other models), got {weight}")
    preferred = _expect(path, "preferred_batch_sizes", raw.get("preferred_batch_sizes", []), list, "a list of integers")
    max_batch = _int(path, raw, "max_batch_size", DEFAULT_MAX_BATCH_SIZE, 0)
    for size in preferred:
        _expect(path, "preferred_batch_sizes", size, int, "a list of integers")
        if not 0 < size <= max(max_batch, 1):
            raise ModelConfigError(path, "preferred_batch_sizes", f"{size} is outside 1..max_batch_size ({max_batch})")
    if len(set(preferred)) != len(preferred):
        raise ModelConfigError(path, "preferred_batch_sizes", f"lists a size twice: {preferred}")
    delay_us = _int(path, raw, "max_queue_delay_us", 0, 0, bounded=False)
    if delay_us > MAX_QUEUE_DELAY_US:  # (a typo in units: a request would wait that long for company)
        raise ModelConfigError(path, "max_queue_delay_us", f"must be at most {MAX_QUEUE_DELAY_US} (10 s), got {delay_us}")
    if not max_batch and (delay_us or preferred):  # a model without a batch dimension runs requests one by one
        key = "max_queue_delay_us" if delay_us else "preferred_batch_sizes"
        raise ModelConfigError(path, key, "applies only to a model that batches: max_batch_size is 0 (no batch "
                                          "dimension), so each request runs alone")
    if preferred and not delay_us:  # preferred sizes shape the static window; adaptive batching has none
        raise ModelConfigError(path, "preferred_batch_sizes", "apply only with a static window: set max_queue_delay_us "
                                                              "> 0 too (without one, batching is adaptive)")
    max_queue = _int(path, raw, "max_queue", 4096, 1)
    max_tenant_queue = _int(path, raw, "max_tenant_queue", 1024, 1)
    levels = _levels(path, raw)
    # max_queue bounds each priority level, max_tenant_queue a tenant across the levels: the model queues at most
    # max_queue x levels, and a tenant bound from there on could never bind. (It was refused from max_queue on: a
    # bound of 6 with max_queue = 4 and three levels, where a tenant can queue 12, was refused as never applying.)
    if "max_tenant_queue" in raw and max_tenant_queue >= max_queue * levels:
        queued = f"max_queue x priority_levels = {max_queue} x {levels}" if levels > 1 else "max_queue"
        raise ModelConfigError(path, "max_tenant_queue", f"must be less than {queued} ({max_queue * levels}: the most "
                                                         f"the model queues), or it would never apply; got {max_tenant_queue}")
    priority = _int(path, raw, "priority", 2, 1)
    if priority > levels:  # the scheduler would clamp it: refuse instead of serving another priority
        if "priority" not in raw:  # (priority_levels = 1 alone: "got 2" named a value the file never set)
            raise ModelConfigError(path, "priority", f"not set: its default, {priority}, must be between 1 and "
                                                     f"priority_levels ({levels}); set priority = 1 (with one level "
                                                     "every request is priority 1: urgent on its lane, ahead of other "
                                                     "models' priority 2)")
        raise ModelConfigError(path, "priority", f"must be between 1 and priority_levels ({levels}), got {priority}")
    return ModelConfig(
        name=name,
        version=version,
        inputs=in_specs,
        outputs=out_specs,
        max_batch_size=max_batch,
        instances=_instances(path, raw),
        provider=provider,
        cuda_tf32=_expect(path, "cuda_tf32", raw.get("cuda_tf32", False), bool, "true or false"),
        intra_op_threads=_int(path, raw, "intra_op_threads", 1, 0),
        inter_op_threads=_int(path, raw, "inter_op_threads", 1, 0),
        priority=priority,
        weight=float(weight),
        max_queue_delay_us=delay_us,
        preferred_batch_sizes=tuple(sorted(preferred)),
        priority_levels=levels,
        max_queue=max_queue,
        max_tenant_queue=max_tenant_queue,
        card=_card(path, raw.get("card", {})),
    )


@dataclass(frozen=True, slots=True)
class UnreadFile:
    """A file in a model's folder that the kernel does not read, and what follows from that."""

    path: Path
    refused: bool  # True: the model is refused; False: it loads and a warning says what was not applied
    why: str  # the whole reason (the load's error or warning)
    brief: str  # the same for a one-line listing, after "<path> is not read: "


def unread(model_dir: Path) -> list[UnreadFile]:
    """The one list of files beside a model's version folders that look like settings but are never read
    (the hub refuses or warns, ``models list`` flags them): a ``model.toml`` there is refused; Triton's
    ``config.pbtxt`` is loaded without its settings, with a warning. Each says where settings go."""
    model_dir = Path(model_dir)
    where = f"{model_dir}/<version>/model.toml"
    found = []
    toml = model_dir / "model.toml"
    if toml.is_file():
        found.append(UnreadFile(
            toml, True,
            f"not read here: a model's settings go in each version's folder, next to its model.onnx ({where})",
            f"settings go in each version's folder ({model_dir.name}/<version>/model.toml): the model is refused"))
    pbtxt = model_dir / "config.pbtxt"
    if pbtxt.is_file():
        found.append(UnreadFile(
            pbtxt, False,
            "Triton's config.pbtxt is not read and none of its settings were applied: the kernel reads "
            f"model.toml in each version's folder ({where}; README, \"Model repository\")",
            f"settings go in each version's folder ({model_dir.name}/<version>/model.toml): "
            "the model loads without them"))
    return found


def misplaced(model_dir: Path) -> Path | None:
    """The first file of ``unread(model_dir)`` that gets the model refused, or None."""
    return next((f.path for f in unread(model_dir) if f.refused), None)


def load(path: Path, name: str, version: str) -> ModelConfig:
    """Read and validate ``model.toml`` at ``path``."""
    return load_with_digest(path, name, version)[0]


def load_with_digest(path: Path, name: str, version: str) -> tuple[ModelConfig, str]:
    """``load``, and the SHA-256 (hex) of the very bytes it parsed.

    One read for both: the labels in this file decide which score means which action, so the audit log
    names the file the kernel applied; hashing the file again later could name a newer edit.
    """
    data = path.read_bytes()
    try:
        # utf-8-sig: a leading byte order mark (Windows editors write one) is not TOML, but the file is
        raw = tomllib.loads(data.decode("utf-8-sig"))
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ModelConfigError(path, "", "not UTF-8 text") from None
    try:
        config = parse(path, name, version, raw)
    except ModelConfigError as exc:
        line = _line_of(data.decode("utf-8-sig"), exc.field)
        if line is None or type(exc) is not ModelConfigError:
            raise
        # ("input[1].dims" alone made an operator count [[input]] tables by hand; a model repository audit)
        raise ModelConfigError(exc.path, exc.field, f"{exc.problem} (line {line})") from None
    return config, hashlib.sha256(data).hexdigest()


_TABLE_FIELD = re.compile(r"(input|output)\[(\d+)\](?:\.(\w+))?$")
_HEADER = re.compile(r"\s*\[")


def _line_of(text: str, field: str) -> int | None:
    """The line (from 1) that ``field`` of a ModelConfigError ("max_batch_size", "input[1].dims", "output[0]") is
    set on in ``text``, or None where it cannot be told by looking (an inline table, the card, a key left out)."""
    lines = text.splitlines()
    first_header = next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))
    table = _TABLE_FIELD.match(field)
    if table is None:
        if not field or "." in field or "[" in field:
            return None
        start, end, key = 0, first_header, field
    else:
        kind, index, key = table.group(1), int(table.group(2)), table.group(3)
        headers = [i for i, line in enumerate(lines) if re.match(rf"\s*\[\[\s*{kind}\s*\]\]", line)]
        if index >= len(headers):
            return None
        start = headers[index]
        if key is None:
            return start + 1
        end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
    pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
    return next((i + 1 for i in range(start, end) if pattern.match(lines[i])), None)
