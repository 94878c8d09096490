"""A pipeline's fields compiled once into a fast request reader and a one-row encoder.

``FieldSpec.read`` and ``encode_one`` say what reading and encoding mean;
they dispatch on the spec's type and encoding for every field of every
request. A unary decision pays that per field, which made validation and
encoding the largest part of ``prepare``. Here each field gets a closure
specialised for its type, bounds and encoding at load time. The fast path
accepts only the plainly valid case; anything else (a wrong kind, a value
out of range, a non-finite number) goes to ``FieldSpec.read`` /
``encode_one``, so errors and edge cases keep one definition and the
results stay identical (tests/test_pipelines.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidArgument, quote
from . import provenance
from .fields import FLOAT32_MAX, FieldSpec, encode_one

_MISSING = object()


class RowCodec:
    """``read(fields_map) -> dict``, ``encode(values) -> (1, width) float32`` and ``input_hash`` for one pipeline.

    The reference of ``ext/rowcodec.pyx`` (``AIOS_PURE_PYTHON=1`` or no extension built selects it).
    """

    __slots__ = ("pipeline", "fields", "width", "sorted_names", "_plan", "_known", "_columns")

    def __init__(self, pipeline: str, fields: tuple[FieldSpec, ...], width: int):
        self.pipeline, self.fields, self.width = pipeline, fields, width
        self.sorted_names = tuple(sorted(spec.name for spec in fields))  # the order of the input hash
        self._plan = tuple((spec.name, _reader(spec), spec.required, spec.default) for spec in fields)
        self._known = frozenset(spec.name for spec in fields)
        self._columns = tuple(_column(spec) for spec in fields if spec.encode != "none")

    def read(self, given) -> dict:
        """The validated values of a request's field map (defaults filled in), or InvalidArgument naming the field."""
        values = {}
        found = 0
        get = given.get
        for name, read, required, default in self._plan:
            value = get(name, _MISSING)
            if value is _MISSING:
                if required:
                    self._refuse_unknown(given)  # an unknown name is the better message when both apply
                    raise InvalidArgument(f"field '{name}' is required by pipeline '{self.pipeline}'")
                values[name] = default
            else:
                found += 1
                try:
                    values[name] = read(value)
                except InvalidArgument:
                    self._refuse_unknown(given)  # as above: unknown names are reported first
                    raise
        if found != len(given):
            self._refuse_unknown(given)
        return values

    def _refuse_unknown(self, given) -> None:
        for name in given:
            if name not in self._known:
                raise InvalidArgument(
                    f"field {quote(name)} is not a field of pipeline '{self.pipeline}' "  # (the caller's: cut)
                    f"(fields: {', '.join(spec.name for spec in self.fields)})"
                )

    def encode(self, values: dict) -> np.ndarray:
        """``encode_one(fields, values, width)``, bit for bit."""
        row: list[float] = []
        for column in self._columns:
            if not column(values, row):
                return encode_one(self.fields, values, self.width)  # out of float32 range: its error
        return np.array(row, dtype=np.float32).reshape(1, self.width)

    def input_hash(self, values: dict, digests: dict[str, str]) -> str:
        """``provenance.input_hash`` of this pipeline's values (the text audit records and replay compare)."""
        return provenance.input_hash(self.pipeline, values, digests, self.sorted_names)

    def read_encode_hash(self, request, digests: dict[str, str]) -> tuple[dict, np.ndarray, str]:
        """``(values, row, input_hash)`` of a DecisionRequest: ``read(request.fields)``, ``encode``,
        ``input_hash`` in that order (so the same error wins). The compiled codec does it in one pass
        over the request's wire bytes."""
        values = self.read(request.fields)
        return values, self.encode(values), self.input_hash(values, digests)


def _reader(spec: FieldSpec) -> Callable:
    slow = spec.read
    lo = float("-inf") if spec.min is None else spec.min
    hi = float("inf") if spec.max is None else spec.max
    if spec.transform == "log1p":
        lo_open = -1.0  # log1p needs > -1; also checked by check_number on the slow path
    else:
        lo_open = float("-inf")
    if spec.type == "number":
        def read_number(value):
            if value.WhichOneof("kind") == "number_value":
                x = value.number_value
                if lo <= x <= hi and x > lo_open and x - x == 0.0:  # x - x is 0.0 only when finite
                    return x
            return slow(value)
        return read_number
    if spec.type == "integer":
        def read_integer(value):
            if value.WhichOneof("kind") == "int_value":
                x = value.int_value
                if lo <= x <= hi and x > lo_open:
                    return x
            return slow(value)
        return read_integer
    if spec.type == "string":
        allowed = frozenset(spec.values)

        def read_string(value):
            if value.WhichOneof("kind") == "string_value":
                s = value.string_value
                if not allowed or s in allowed:
                    return s
            return slow(value)
        return read_string
    def read_bool(value):
        if value.WhichOneof("kind") == "bool_value":
            return value.bool_value
        return slow(value)
    return read_bool


def _column(spec: FieldSpec) -> Callable[[dict, list], bool]:
    """Appends the field's column(s) to the row; False when a value falls outside float32."""
    name = spec.name
    if spec.encode == "onehot":
        table = {category: tuple(1.0 if other == category else 0.0 for other in spec.values)
                 for category in spec.values}
        zeros = (0.0,) * len(spec.values)

        def onehot(values, row):
            row.extend(table.get(values[name], zeros))
            return True
        return onehot
    if spec.encode == "standardize":
        mean, std = spec.mean, spec.std
        if spec.transform == "log1p":
            from math import log1p

            def standardize_log(values, row):
                x = (log1p(values[name]) - mean) / std
                row.append(x)
                return -FLOAT32_MAX <= x <= FLOAT32_MAX
            return standardize_log

        def standardize(values, row):
            x = (float(values[name]) - mean) / std
            row.append(x)
            return -FLOAT32_MAX <= x <= FLOAT32_MAX
        return standardize

    def as_number(values, row):  # bool and raw
        x = float(values[name])
        row.append(x)
        return -FLOAT32_MAX <= x <= FLOAT32_MAX
    return as_number
