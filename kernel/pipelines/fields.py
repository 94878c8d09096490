"""Request fields: declared types, validation, defaults, and encoding into a model input.

A pipeline declares every field a caller may send (``[[field]]`` tables).
``FieldSpec.read`` turns one protobuf ``Value`` into a plain Python value
(or raises ``InvalidArgument`` naming the field); ``encode_rows`` turns many
cases' values into the float32 input tensor the model was trained on.

Encodings (one or more columns per field, in declaration order):

* ``standardize``: ``(transform(x) - mean) / std``, transform ``none`` or ``log1p``;
* ``onehot``: one column per entry of ``values``; a missing value is all zeros;
* ``bool``: 1.0 / 0.0;
* ``raw``: the number as it is;
* ``none``: the field is not fed to the model (the policy may still read it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument, quote

FIELD_TYPES = ("number", "integer", "string", "bool")
ENCODINGS = ("standardize", "onehot", "bool", "raw", "none")
TRANSFORMS = ("none", "log1p")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # model inputs are float32

# Which proto Value kinds each declared type accepts. Integers are numbers too;
# an integral double is accepted as an integer because JSON clients cannot tell.
_ACCEPTS = {
    "number": ("number_value", "int_value"),
    "integer": ("int_value", "number_value"),
    "string": ("string_value",),
    "bool": ("bool_value",),
}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str  # one of FIELD_TYPES
    required: bool = False
    default: object = None  # used when the field is absent and not required
    min: float | None = None
    max: float | None = None
    values: tuple[str, ...] = ()  # allowed strings (and one-hot categories); empty = any
    encode: str = "none"
    transform: str = "none"
    mean: float = 0.0
    std: float = 1.0

    @property
    def width(self) -> int:
        if self.encode == "none":
            return 0
        return len(self.values) if self.encode == "onehot" else 1

    def read(self, value) -> object:
        """The field's Python value from a protobuf ``Value``; raises InvalidArgument naming the field."""
        kind = value.WhichOneof("kind")
        if kind not in _ACCEPTS[self.type]:
            got = kind.removesuffix("_value") if kind else "an empty Value"
            raise InvalidArgument(f"field '{self.name}' must be {self.type}, got {got}")
        raw = getattr(value, kind)
        if self.type == "integer" and kind == "number_value" and not (math.isfinite(raw) and raw == int(raw)):
            raise InvalidArgument(f"field '{self.name}' must be an integer, got {raw}")
        if self.type in ("number", "integer"):
            return self.check_number(raw)
        if self.type == "string" and self.values and raw not in self.values:
            allowed = ", ".join(self.values)
            raise InvalidArgument(f"field '{self.name}' must be one of {allowed}; got {quote(raw)}")
        return raw

    def check_number(self, raw: int | float) -> int | float:
        """``raw`` as this number or integer field's value, or InvalidArgument naming the field.

        Also what a pipeline's ``default`` must pass: everything accepted here
        can be encoded, audited (integers are int64 there) and decided.
        """
        if isinstance(raw, float) and not math.isfinite(raw):
            raise InvalidArgument(f"field '{self.name}' must be a finite number, got {raw}")
        number = float(raw) if self.type == "number" else int(raw)
        if self.type == "integer" and not -(2**63) <= number < 2**63:
            raise InvalidArgument(f"field '{self.name}' must be a 64-bit integer, got {raw}")
        if self.min is not None and number < self.min:
            raise InvalidArgument(f"field '{self.name}' must be >= {show_number(self.min)}, got {show_number(number)}")
        if self.max is not None and number > self.max:
            raise InvalidArgument(f"field '{self.name}' must be <= {show_number(self.max)}, got {show_number(number)}")
        if self.transform == "log1p" and number <= -1:
            raise InvalidArgument(f"field '{self.name}' must be > -1 (its encoding takes log1p), "
                                  f"got {show_number(number)}")
        return number


def show_number(x: int | float) -> str:
    """``x`` in as few digits as tell it apart from every other float (``repr``), without a float's
    ``.0`` when it is a whole number: a limit and a value that differ never print alike (``:g`` printed
    10000000.01 as 1e+07, the limit it broke)."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(x)


def encode_rows(fields: tuple[FieldSpec, ...], cases: list[dict], width: int) -> np.ndarray:
    """The float32 ``(len(cases), width)`` model input for already-validated field values."""
    out = np.zeros((len(cases), width), dtype=np.float32)
    col = 0
    for spec in fields:
        if spec.encode == "none":
            continue
        values = [case[spec.name] for case in cases]
        if spec.encode == "onehot":
            for j, category in enumerate(spec.values):
                out[:, col + j] = [v == category for v in values]
        elif spec.encode == "standardize":
            x = np.array(values, dtype=np.float64)
            if spec.transform == "log1p":
                x = np.log1p(x)
            out[:, col] = (x - spec.mean) / spec.std
        else:  # bool and raw: the value as a number
            out[:, col] = np.array(values, dtype=np.float64)
        col += spec.width
    return out


def encode_one(fields: tuple[FieldSpec, ...], case: dict, width: int) -> np.ndarray:
    """``encode_rows`` for a single case without per-field numpy work (the unary Decide path).

    Same arithmetic as ``encode_rows`` in float64 then one cast to float32, so
    both give bit-identical rows.
    """
    row = []
    for spec in fields:
        encode = spec.encode
        if encode == "none":
            continue
        value = case[spec.name]
        if encode == "onehot":
            row.extend(1.0 if value == category else 0.0 for category in spec.values)
            continue
        if encode == "standardize":
            x = math.log1p(value) if spec.transform == "log1p" else float(value)
            x = (x - spec.mean) / spec.std
        else:
            x = float(value)
        # A column beyond float32 becomes inf and the model's scores NaN, which would fail the
        # policy pass of every decision grouped with this one: refuse it here, by name.
        if not -FLOAT32_MAX <= x <= FLOAT32_MAX:
            raise InvalidArgument(f"field '{spec.name}' = {value!r} is too large for the model's float32 input")
        row.append(x)
    return np.array(row, dtype=np.float32).reshape(1, width)
