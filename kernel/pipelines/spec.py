"""A pipeline file: fields → model input, the model, the policy, the escalation rules.

One TOML file per pipeline, content-hashed (the hash is the pipeline's
version in every decision's provenance); the policy it names is a file of
its own with its own hash. Every error names file, line and field and
nothing is half-loaded. Format (see ``examples/claims/pipelines/claims_triage.toml``)::

    [pipeline]
    name = "claims_triage"            # what DecisionRequest.pipeline names
    version = "2026-11-25.1"          # the author's label; the content hash is the real version
    description = "..."
    text_fields = ["description"]     # optional: the free-text fields a request may carry (digested into
                                      # the audit record, never sent to a model); without it any name that
                                      # is not a [[field]] is taken

    [model]
    name = "claims_triage"            # a model in the repository
    version = ""                      # "" = the newest loaded version
    input = "features"                # the input tensor the fields are encoded into
    output = "probabilities"          # class scores; labels from the model's output `labels`
    priority = 0                      # scheduler priority; 0 = the model's default
    timeout_ms = 0                    # per-decision deadline when the caller gives none; 0 = none
    fallback_action = "review"        # optional: when the model fails, decide this (outcome FALLBACK) and
                                      # send the case to a human; without it a model fault is INTERNAL

    [policy]
    file = "policy.toml"              # relative to this file

    [escalation]
    min_confidence = 0.7              # below it, the case goes to a human
    review_sla_s = 14400              # how long a review may stay open
    review_actions = ["approve", "deny"]   # what a reviewer may decide; default: the policy's actions

    [[field]]                         # one per request field, in model-column order
    name = "claim_amount"
    type = "number"                   # number | integer | string | bool
    required = false                  # absent and not required -> `default` (mandatory then)
    default = 3200.0
    min = 0.0
    max = 10000000.0
    encode = "standardize"            # standardize | onehot | bool | raw | none
    transform = "log1p"               # standardize only: none | log1p
    mean = 8.1
    std = 0.9
    values = []                       # string fields only: the allowed values (empty = any); with
                                      # encode = "onehot", one column each, in this order
"""

from __future__ import annotations

import difflib
import hashlib
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import accel
from ..policy import tomlsafe
from ..policy.errors import PolicyInputError
from ..policy.reference import coerce
from ..policy.syntax import string_literals
from ..policy.types import MAX_NAMES_SHOWN, MAX_SUGGESTION_NAMES, shown
from ..errors import InvalidArgument
from ..limits import FileTooLarge, authored_text_problem, is_pipeline_name, read_bounded
from .fields import ENCODINGS, FIELD_TYPES, TRANSFORMS, FieldSpec, encode_one
from .rowcodec import RowCodec
from .tomlpos import line_of

# ext/rowcodec.pyx when built, else the reference; read as `.RowCodec` when a pipeline is made (not here:
# importing the extension first imports this module while the extension is still half-initialised).
_row_codecs = accel.load("row_codec", "kernel._ext.rowcodec", "kernel.pipelines.rowcodec")

# A pipeline file is a page of settings; its whole text goes into the POLICY_CHANGE audit record of each version
# (a 60 MiB one made a 60 MB record), as a policy's does, which has the same limit (kernel/policy/loader.py).
MAX_PIPELINE_FILE_BYTES = 1 << 20
MAX_PRIORITY = 2**32 - 1  # a DecisionRequest's priority is a uint32; the scheduler takes no more
MAX_REVIEW_SLA_S = 100 * 365 * 86_400.0  # SLA deadlines are int64 wall-clock ns: keep them far from overflow


class PipelineError(ValueError):
    """An invalid pipeline or policy file; the message starts with ``FILE:LINE:``."""


@dataclass(frozen=True, slots=True)
class Escalation:
    min_confidence: float = 0.0
    review_sla_s: float = 4 * 3600.0
    review_actions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: str
    label: str  # the author's version label
    hash: str  # sha256 of the pipeline file: the version in provenance
    path: str
    description: str
    model: str
    model_version: str
    input: str
    output: str
    priority: int
    timeout_ms: int
    fallback_action: str  # "" = none: a model fault answers INTERNAL
    fields: tuple[FieldSpec, ...]
    width: int  # columns of the encoded input
    policy: object  # kernel.policy.Policy
    escalation: Escalation
    codec: RowCodec  # the fields compiled for the request path (or its compiled twin, kernel._ext.rowcodec)
    # [pipeline].text_fields: the free-text fields a request may carry; None = not declared (any name
    # that is not a typed field's). Names are checked only when a request has text fields at all.
    text_fields: frozenset[str] | None = None
    typed_names: frozenset[str] = frozenset()
    # The line of each [model] key in the file (the table's header line for one not written), for the
    # errors only the registry can find: those binding the pipeline to the loaded model.
    model_lines: tuple[tuple[str, int], ...] = field(default=(), compare=False)
    # The file's text exactly as loaded (its UTF-8 bytes are what ``hash`` covers): it goes into the
    # POLICY_CHANGE record, so the log alone shows what was served, with no archive of old files.
    text: str = field(default="", compare=False, repr=False)
    # Settings in the file that do nothing or likely not what was meant (``_Reader.warn``): logged at activation.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # The model version the registry checked this pipeline against (``PipelineRegistry._bind``): decisions run
    # on it, not on whatever version is newest. A newer version the pipeline does not fit (another input
    # width, other labels) was refused while decisions went on running on it, every one a FALLBACK.
    bound_version: str = field(default="", compare=False)

    @property
    def actions(self) -> tuple[str, ...]:
        return self.escalation.review_actions

    def model_error(self, key: str, message: str) -> PipelineError:
        """``FILE:LINE: [model].KEY: message``: an error in binding the pipeline to its model."""
        line = dict(self.model_lines).get(key, 0)
        return PipelineError(f"{self.path}:{line}: [model].{key}: {message}")

    def check_text(self, names) -> None:
        """INVALID_ARGUMENT for a text field the pipeline does not take: a typed field's name (its text
        would be ignored and the field's default decided on), or one outside declared ``text_fields``."""
        for name in names:
            if name in self.typed_names:
                raise InvalidArgument(f"text_fields['{name}']: '{name}' is a typed field of pipeline '{self.name}'; "
                                      "send it in fields")
            if self.text_fields is not None and name not in self.text_fields:
                allowed = ", ".join(sorted(self.text_fields)) or "none"
                raise InvalidArgument(f"text_fields['{name}'] is not a text field of pipeline '{self.name}' "
                                      f"(text fields: {allowed})")


_SECTIONS = {
    "pipeline": {"name", "version", "description", "text_fields"},
    "model": {"name", "version", "input", "output", "priority", "timeout_ms", "fallback_action"},
    "policy": {"file"},
    "escalation": {"min_confidence", "review_sla_s", "review_actions"},
    "field": {"name", "type", "required", "default", "min", "max", "values", "encode", "transform", "mean", "std"},
}


class _Reader:
    """Typed access to the parsed document that raises PipelineError with file and line."""

    def __init__(self, path: str, text: str):
        self.path, self.text = path, text
        self.warnings: list[str] = []  # (``Pipeline.warnings``)

    def warn(self, table: str | None, key: str | None, message: str, index: int = 0) -> None:
        """A setting that does nothing or likely not what was meant: said at activation (and by an upload and
        ``pipelines check``), not refused — a file that served before an upgrade must serve after it."""
        self.warnings.append(str(self.fail(table, key, message, index)))

    def fail(self, table: str | None, key: str | None, message: str, index: int = 0) -> PipelineError:
        where = f"[[{table}]] #{index + 1}" if table == "field" else f"[{table}]" if table else ""
        line = line_of(self.text, table, index, key)
        name = f"{where}.{key}" if key else where
        return PipelineError(f"{self.path}:{line}: {name}: {message}")

    def get(self, raw: dict, table: str, key: str, kind, default=None, index: int = 0, required=False):
        if key not in raw:
            if required:
                raise self.fail(table, None, f"missing required key '{key}'", index)
            return default
        value = raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(table, key, f"must be {_kind_name(kinds)}, got {value!r}", index)
        if not isinstance(value, kinds):
            raise self.fail(table, key, f"must be {_kind_name(kinds)}, got {value!r}", index)
        return value

    def number(self, raw: dict, table: str, key: str, default: float | None, index: int = 0) -> float | None:
        """A finite float (TOML allows nan, inf and integers beyond any float), or ``default`` when absent."""
        value = self.get(raw, table, key, (int, float), default, index)
        if value is None:
            return None
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise self.fail(table, key, f"must be a finite number, got {raw[key]!r:.40}", index)
        return value

    def printable(self, value: str, table: str, key: str, multiline: bool = False, index: int = 0) -> str:
        """``value``, refused if it holds a control or invisible character or is too long
        (``limits.authored_text_problem``): labels, names and descriptions reach logs, listings, reviewers and
        audit records, where a newline or escape sequence could forge a line or rewrite a terminal. A
        description may span lines (newline and tab only)."""
        problem = authored_text_problem(value, multiline)
        if problem is not None:
            raise self.fail(table, key, problem, index)
        return value

    def check_keys(self, raw: dict, table: str, index: int = 0) -> None:
        unknown = sorted(set(raw) - _SECTIONS[table])
        if unknown:
            raise self.fail(table, unknown[0], f"unknown key (allowed: {', '.join(sorted(_SECTIONS[table]))})", index)


def _kind_name(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load_pipeline(path: str | Path, load_policy) -> Pipeline:
    """Read and validate one pipeline file and the policy it names (``load_policy(path)``)."""
    path = Path(path)
    try:
        data = read_bounded(path, MAX_PIPELINE_FILE_BYTES)
    except FileTooLarge as exc:
        raise PipelineError(f"{path}:0: file: is {exc.size:,} bytes; a pipeline file may have at most "
                            f"{MAX_PIPELINE_FILE_BYTES:,} (it was not read)") from None
    except OSError as exc:
        raise PipelineError(f"{path}:0: cannot read: {exc.strerror}") from None
    return parse_pipeline(data, str(path), lambda name: load_policy(path.parent / name))


def parse_pipeline(data: bytes, path: str, load_policy) -> Pipeline:
    if len(data) > MAX_PIPELINE_FILE_BYTES:
        raise PipelineError(f"{path}:0: file: is {len(data):,} bytes; a pipeline file may have at most "
                            f"{MAX_PIPELINE_FILE_BYTES:,}")
    try:
        text = data.decode("utf-8")  # (not errors="replace": the hash must be of the file that is served)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PipelineError(f"{path}:{line}: file: is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        doc = tomlsafe.loads(text)  # (its every failure, hostile nesting and digits too, is a located TomlError)
    except tomlsafe.TomlError as exc:
        column = f", column {exc.column}" if exc.column else ""
        line = exc.line or text.count("\n") + 1  # (no line: the document ended too soon, i.e. at its last line)
        raise PipelineError(f"{path}:{line}: not valid TOML: {exc.message}{column}") from None
    r = _Reader(path, text)
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise r.fail(unknown[0], None, f"unknown table (allowed: {', '.join(sorted(_SECTIONS))})")
    for table in ("pipeline", "model", "policy"):
        if not isinstance(doc.get(table), dict):
            raise PipelineError(f"{path}:1: [{table}]: missing table")
    head, model, policy_table = doc["pipeline"], doc["model"], doc["policy"]
    escalation_raw = doc.get("escalation", {})
    if not isinstance(escalation_raw, dict):
        raise r.fail("escalation", None, "must be a table ([escalation])")
    for table, raw in (("pipeline", head), ("model", model), ("policy", policy_table), ("escalation", escalation_raw)):
        r.check_keys(raw, table)
    name = r.get(head, "pipeline", "name", str, required=True)
    if not is_pipeline_name(name):
        raise r.fail("pipeline", "name", "must be letters, digits, '_' or '-'")
    _warn_lookalike_name(r, name)
    fields = _fields(r, doc.get("field"))
    text_fields = _text_fields(r, head, fields)
    policy_file = r.get(policy_table, "policy", "file", str, required=True)
    try:
        policy = load_policy(policy_file)
    except Exception as exc:  # the policy's own error already names its file and line
        raise PipelineError(f"{path}:{line_of(text, 'policy', 0, 'file')}: [policy].file: {exc}") from None
    _check_policy_inputs(r, policy, fields)
    escalation = _escalation(r, escalation_raw, policy)
    priority = r.get(model, "model", "priority", int, 0)
    timeout_ms = r.get(model, "model", "timeout_ms", int, 0)
    if not 0 <= priority <= MAX_PRIORITY:
        raise r.fail("model", "priority", f"must be 0..{MAX_PRIORITY} (1 = most urgent, 0 = the model's default)")
    if timeout_ms < 0:
        raise r.fail("model", "timeout_ms", "must be >= 0")
    fallback = r.get(model, "model", "fallback_action", str, "")
    if fallback and fallback not in policy.actions:
        raise r.fail("model", "fallback_action", f"{fallback!r} is not an action of the policy "
                                                 f"({', '.join(policy.actions)})")
    return Pipeline(
        name=name,
        label=r.printable(str(r.get(head, "pipeline", "version", (str, int), "")), "pipeline", "version"),
        hash=hashlib.sha256(data).hexdigest(),
        path=path,
        description=r.printable(r.get(head, "pipeline", "description", str, ""), "pipeline", "description",
                                multiline=True),
        model=r.get(model, "model", "name", str, required=True),
        model_version=str(r.get(model, "model", "version", (str, int), "")),
        input=r.get(model, "model", "input", str, required=True),
        output=r.get(model, "model", "output", str, required=True),
        priority=priority,
        timeout_ms=timeout_ms,
        fallback_action=fallback,
        fields=fields,
        width=sum(f.width for f in fields),
        policy=policy,
        escalation=escalation,
        codec=_row_codecs.RowCodec(name, fields, sum(f.width for f in fields)),
        text_fields=text_fields,
        typed_names=frozenset(f.name for f in fields),
        model_lines=tuple((key, line_of(text, "model", 0, key)) for key in _SECTIONS["model"]),
        text=text,
        warnings=tuple(r.warnings),
    )


def _text_fields(r: _Reader, head: dict, fields) -> frozenset[str] | None:
    if "text_fields" not in head:
        return None
    names = r.get(head, "pipeline", "text_fields", list, [])
    typed = {f.name for f in fields}
    for name in names:
        if not isinstance(name, str) or not name:
            raise r.fail("pipeline", "text_fields", f"must be a list of field names, got {name!r}")
        r.printable(name, "pipeline", "text_fields")
        if name in typed:
            raise r.fail("pipeline", "text_fields", f"'{name}' is also a [[field]]: a field is typed or free text")
    if len(set(names)) != len(names):
        raise r.fail("pipeline", "text_fields", "lists a name twice")
    return frozenset(names)


# The audit record keeps free text under 'text:<name>' (an author's walk-through: a [[field]] named 'text:notiz'
# lost its value there). Other names stay as they were (a policy reads only identifiers, and says so itself).
TEXT_PREFIX = "text:"


def _fields(r: _Reader, raw_fields) -> tuple[FieldSpec, ...]:
    if not isinstance(raw_fields, list) or not raw_fields:
        raise PipelineError(f"{r.path}:1: [[field]]: a pipeline needs at least one field")
    fields, seen = [], set()
    for i, raw in enumerate(raw_fields):
        if not isinstance(raw, dict):  # `field = [1]`: a list, but not of tables
            raise r.fail("field", None, f"must be a table (write each field as a [[field]] table), got {raw!r:.40}", i)
        r.check_keys(raw, "field", i)
        name = r.get(raw, "field", "name", str, required=True, index=i)
        r.printable(name, "field", "name", index=i)
        if not name or name.startswith(TEXT_PREFIX):
            raise r.fail("field", "name", f"must be a name, not empty nor starting with {TEXT_PREFIX!r} (the audit "
                                          f"record's prefix for free text), got {name!r:.60}", i)
        if name in seen:
            raise r.fail("field", "name", f"duplicate field '{name}'", i)
        seen.add(name)
        kind = r.get(raw, "field", "type", str, required=True, index=i)
        if kind not in FIELD_TYPES:
            raise r.fail("field", "type", f"must be one of {', '.join(FIELD_TYPES)}, got {kind!r}", i)
        encode = r.get(raw, "field", "encode", str, "none", index=i)
        if encode not in ENCODINGS:
            raise r.fail("field", "encode", f"must be one of {', '.join(ENCODINGS)}, got {encode!r}", i)
        transform = r.get(raw, "field", "transform", str, "none", index=i)
        if transform not in TRANSFORMS:
            raise r.fail("field", "transform", f"must be one of {', '.join(TRANSFORMS)}, got {transform!r}", i)
        values = tuple(r.get(raw, "field", "values", list, [], index=i))
        if any(not isinstance(v, str) for v in values):
            raise r.fail("field", "values", "must be a list of strings", i)
        if values and kind != "string":
            raise r.fail("field", "values", f"only string fields list values; '{name}' is {kind}", i)
        repeated = sorted(v for v, n in Counter(values).items() if n > 1)  # (values.count per value: quadratic)
        if repeated:  # (onehot: a second column for one category, which no request ever sets)
            r.warn("field", "values", f"lists {', '.join(map(repr, repeated))} twice: its second column is never set", i)
        if encode == "onehot" and not values:
            raise r.fail("field", "encode", "onehot needs `values` (the categories, in column order)", i)
        if encode in ("standardize", "raw") and kind not in ("number", "integer"):
            raise r.fail("field", "encode", f"{encode} needs a number or integer field; '{name}' is {kind}", i)
        if encode == "bool" and kind != "bool":
            raise r.fail("field", "encode", f"bool encoding needs a bool field; '{name}' is {kind}", i)
        lo = r.number(raw, "field", "min", None, index=i)
        hi = r.number(raw, "field", "max", None, index=i)
        if (lo is not None or hi is not None) and kind not in ("number", "integer"):
            raise r.fail("field", "min" if lo is not None else "max", f"only number fields have ranges; '{name}' is {kind}", i)
        if lo is not None and hi is not None and lo > hi:
            raise r.fail("field", "min", f"min {lo} is above max {hi}", i)
        if transform == "log1p" and lo is not None and not lo > -1:
            r.warn("field", "min", f"{lo:g} with transform = \"log1p\": a request at or below -1 is refused all the "
                                   "same (log1p of it is not a number); make min above -1", i)
        if transform != "none" and encode != "standardize":
            r.warn("field", "transform", f"does nothing: it applies only with encode = \"standardize\" ('{name}' "
                                         f"is encoded {encode})", i)
        for key in ("mean", "std"):  # (read only by standardize: elsewhere a value that does nothing)
            if key in raw and encode != "standardize":
                r.warn("field", key, f"does nothing: it applies only with encode = \"standardize\" ('{name}' is "
                                     f"encoded {encode})", i)
        std = r.number(raw, "field", "std", 1.0, index=i)
        if not std > 0:
            raise r.fail("field", "std", "must be a positive finite number", i)
        required = r.get(raw, "field", "required", bool, False, index=i)
        if required and "default" in raw:
            r.warn("field", "default", f"does nothing: '{name}' is required, so a request without it is refused "
                                       "(drop one of the two)", i)
        spec = FieldSpec(
            name=name, type=kind, required=required, default=None,
            min=lo, max=hi, values=values, encode=encode, transform=transform,
            mean=r.number(raw, "field", "mean", 0.0, index=i), std=std,
        )
        if not required:
            spec = _with_default(r, raw, spec, i)
        fields.append(spec)
    return tuple(fields)


_PYTHON_TYPES = {"number": (int, float), "integer": (int,), "string": (str,), "bool": (bool,)}


def _with_default(r: _Reader, raw: dict, spec: FieldSpec, i: int) -> FieldSpec:
    if "default" not in raw:
        raise r.fail("field", None, f"'{spec.name}' is optional (required = false) so it needs a `default`", i)
    default = raw["default"]
    if isinstance(default, bool) != (spec.type == "bool") or not isinstance(default, _PYTHON_TYPES[spec.type]):
        article = "an" if spec.type[0] in "aeiou" else "a"
        raise r.fail("field", "default", f"must be {article} {spec.type}, got {default!r}", i)
    if spec.values and default not in spec.values and not (spec.encode == "onehot" and default == ""):
        raise r.fail("field", "default", f"{default!r} is not one of the field's values", i)
    if spec.type in ("number", "integer"):
        try:
            default = spec.check_number(default)  # what a request's value must pass, the default passes too
        except InvalidArgument as exc:
            raise r.fail("field", "default", exc.message, i) from None
    spec = FieldSpec(**{**{k: getattr(spec, k) for k in FieldSpec.__slots__}, "default": default})
    # Encoded too, as every request that omits the field will be: a default the model's float32 input
    # cannot hold (a tiny `std`) would otherwise refuse each such request as the caller's error. Both row
    # codecs leave such a value to encode_one, so this is the verdict of either.
    if spec.width:
        try:
            encode_one((spec,), {spec.name: default}, spec.width)
        except InvalidArgument:
            scaled = f" with mean = {spec.mean!r} and std = {spec.std!r}" if spec.encode == "standardize" else ""
            raise r.fail("field", "default", f"'{spec.name}' = {default!r} (its default) encodes{scaled} to a "
                                              "value beyond the model's float32 input", i) from None
    return spec


# Policy input type -> the field types that can feed it. A policy `number` takes an integer field's values;
# a policy `integer` takes only an integer field (a number field's 1.5 would fail every decision).
_POLICY_TYPES = {"number": ("number", "integer"), "integer": ("integer",), "string": ("string",), "bool": ("bool",)}


def _check_policy_inputs(r: _Reader, policy, fields: tuple[FieldSpec, ...]) -> None:
    by_name = {f.name: f for f in fields}
    # The values a request may send, and the default a request that leaves the field out gets ('' for "no tier" with
    # one-hot values): a rule on the default matches every such request (it was refused as never matching).
    allowed = {f.name: frozenset(f.values) | ({f.default} if isinstance(f.default, str) else set())
               for f in fields if f.values}  # (a frozenset: a policy may compare thousands of strings)
    for name, kind in getattr(policy, "inputs", {}).items():
        spec = by_name.get(name)
        if spec is None:
            raise PipelineError(
                f"{r.path}:{line_of(r.text, 'policy', 0, 'file')}: [policy].file: the policy reads input "
                f"'{name}', which is not a field of this pipeline"
            )
        if spec.type not in _POLICY_TYPES.get(kind, (kind,)):
            raise r.fail("field", "type", f"the policy reads '{name}' as {kind} but the pipeline declares it "
                                          f"{spec.type}", fields.index(spec))
        if spec.default is not None and name in getattr(policy, "reads", {name: None}):
            try:  # (what the policy refuses in a request, it would refuse in every request that leaves the field out)
                coerce(name, kind, spec.default)
            except PolicyInputError as exc:
                raise r.fail("field", "default", f"the policy cannot read it: {exc.message}",
                             fields.index(spec)) from None
    for rule, name, value in compared_strings(policy):
        spec = by_name.get(name)
        if spec is not None and spec.values and value not in allowed[name]:
            raise PipelineError(
                f"{r.path}:{line_of(r.text, 'policy', 0, 'file')}: [policy].file: rule {rule.id} "
                f"({getattr(policy, 'source', 'the policy')}:{rule.line}) compares '{name}' with {value!r}, which "
                f"is not one of the field's values ({', '.join(spec.values)}): the rule could never match on it")


def compared_strings(policy):
    """(rule, field name, string) for each string a rule's condition compares a field with."""
    for rule in getattr(policy, "rules", ()):
        node = getattr(rule, "node", None)
        if node is not None:
            for name, value in string_literals(node):
                yield rule, name, value


def _warn_lookalike_name(r: _Reader, name: str) -> None:
    """A pipeline name that can read like another: compatibility forms ('ｐｉｐｅ' is 'pipe' to the eye), or ASCII
    beside letters that pass for Latin ones or non-ASCII digits ('сlaims' with a Cyrillic 'с'; 'p١٢'). Names are
    matched exactly, so it is not a refusal (such names served before), but listings, reviews and audit exports
    show them as their look-alikes (security review L1)."""
    folded = unicodedata.normalize("NFKC", name)
    if folded != name:
        r.warn("pipeline", "name", f"{name!r} is written with compatibility characters and reads as {folded!r}")
        return
    if any(ch.isascii() and ch.isalnum() for ch in name):
        alike = sorted({ch for ch in name if not ch.isascii() and (ch.isdecimal() or unicodedata.name(ch, "")
                        .startswith(_LATIN_LOOKALIKE_SCRIPTS))})
        if alike:
            r.warn("pipeline", "name", f"{name!r} mixes ASCII with {', '.join(map(ascii, alike))}, which can read as "
                                       f"ASCII letters or digits")


# Scripts whose letters pass for Latin ones ('с', 'ο'); CJK or Hangul beside Latin ('保険_claims') confuse no one.
_LATIN_LOOKALIKE_SCRIPTS = ("CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC")


def _warn_review_actions(r: _Reader, actions: list[str], policy_actions: tuple[str, ...]) -> None:
    """Warnings, not refusals. An action no rule takes is often meant (the demo's "request_info": a reviewer asks
    for more), so only one that reads like a misspelt policy action is said ("aprove"): it would otherwise reach
    reviewers and downstream systems silently (noticed in session 24's walk-through). Linear in the lists' lengths
    and bounded in what it searches (an uploaded file may list 100,000: the security review's M1)."""
    repeated = sorted(a for a, n in Counter(actions).items() if n > 1)
    if repeated:
        r.warn("escalation", "review_actions", f"lists {shown(map(repr, repeated))} more than once")
    if len(policy_actions) > MAX_SUGGESTION_NAMES:
        return
    known = set(policy_actions)
    foreign = [action for action in dict.fromkeys(actions) if action not in known]
    for action in foreign[:MAX_NAMES_SHOWN]:
        close = difflib.get_close_matches(action, policy_actions, n=1, cutoff=0.8)
        if close:
            r.warn("escalation", "review_actions", f"offers reviewers {action!r}, which no rule takes; did you mean "
                                                   f"the policy's {close[0]!r}?")


def _escalation(r: _Reader, raw: dict, policy) -> Escalation:
    minimum = r.number(raw, "escalation", "min_confidence", 0.0)
    if not 0.0 <= minimum <= 1.0:
        raise r.fail("escalation", "min_confidence", "must be between 0 and 1")
    sla = r.number(raw, "escalation", "review_sla_s", 4 * 3600.0)
    if not 0 < sla <= MAX_REVIEW_SLA_S:
        raise r.fail("escalation", "review_sla_s", f"must be > 0 and at most {MAX_REVIEW_SLA_S:g} seconds")
    actions = r.get(raw, "escalation", "review_actions", list, None)
    if actions is None:
        actions = list(getattr(policy, "actions", ()))
    if not actions or any(not isinstance(a, str) or not a for a in actions):
        raise r.fail("escalation", "review_actions", "must be a non-empty list of action names")
    for action in actions:  # (shown to reviewers, written on resolutions' records)
        r.printable(action, "escalation", "review_actions")
    _warn_review_actions(r, actions, tuple(getattr(policy, "actions", ())))
    return Escalation(min_confidence=minimum, review_sla_s=sla, review_actions=tuple(actions))
