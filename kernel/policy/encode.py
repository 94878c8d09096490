"""Turn a batch's fields into the arrays the compiled evaluator compares.

Encoded form, per field type (``MISSING`` is 0 in every code array):

* numbers: float64, NaN = missing;
* strings: small ints: 0 missing, 1 a value no condition mentions, 2 + i the
  i-th string the policy compares this field with (``label``: 2 + class index
  when the classes are declared);
* bools: 0 missing, 1 false, 2 true (codes are int32: the C kernel reads C ints).

The value rules are the reference evaluator's (``reference.coerce``): a
number field takes any real number (bools count as 0/1, as in Python; NaN is
missing) but a whole number past 2**53 that no float holds, an integer field
refuses fractions too, a bool field takes true/false
(and 0/1), a string field takes any hashable value (a non-string equals no
string in the policy), ``label`` must be a declared class, and model outputs
may not be missing. Every refusal is a ``PolicyInputError`` naming the field.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from .errors import PolicyInputError
from .reference import MAX_EXACT_INTEGER, coerce, inexact_integer
from .types import BOOL, INTEGER, NUMBER, STRING, Schema

MISSING_CODE, OTHER_CODE, FIRST_CODE = 0, 1, 2
_BOOL_CODES = {True: 2, False: 1, None: 0}
_BAD = -1


class FieldCodec:
    """How one field is read and encoded."""

    __slots__ = ("name", "ftype", "model_output", "codes", "classes", "code_dtype")

    def __init__(self, name: str, ftype: str, literals: list, classes: tuple[str, ...] | None):
        self.name = name
        self.ftype = ftype
        self.model_output = Schema.is_model_output(name)
        self.classes = classes if name == "label" else None
        if ftype == STRING:
            ordered = list(self.classes) if self.classes is not None else sorted(set(literals))
            self.codes = {value: FIRST_CODE + i for i, value in enumerate(ordered)}
            self.codes[None] = MISSING_CODE
        elif ftype == BOOL:
            self.codes = _BOOL_CODES
        else:
            self.codes = None
        self.code_dtype = np.int32  # the C kernel reads codes as C ints

    def code_of(self, value) -> int:
        return self.codes[value]

    def scalar(self, value):
        """One value encoded (float, NaN = missing, or a code), or ``PolicyInputError``: the
        compiled row encoder's fallback for anything it does not handle itself."""
        if self.codes is None:
            number = coerce(self.name, self.ftype, value, None, self.model_output)
            return np.nan if number is None else number
        if self.ftype == BOOL:
            code = self.checked(np.array([_BOOL_CODES.get(value, _BAD) if _hashable(value) else _BAD]))
            return int(code[0])
        value = coerce(self.name, self.ftype, value, self.classes, self.model_output)
        return self.codes.get(value, OTHER_CODE)

    def flags(self, flag_bits: dict[str, int]) -> int:
        """This field's flags for the compiled row encoder (``ext/rules.pyx``)."""
        bits = 0
        if self.codes is not None:
            bits |= flag_bits["CODED"]
            if self.ftype == STRING and self.classes is None:
                bits |= flag_bits["OTHER_OK"]
        if self.ftype == INTEGER:
            bits |= flag_bits["INTEGER"]
        if self.model_output:
            bits |= flag_bits["REQUIRED"]
        return bits

    # -- from a column (numpy array or sequence)
    def encode_column(self, column, n: int) -> np.ndarray:
        arr = column if isinstance(column, np.ndarray) else np.asarray(column, dtype=object)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise PolicyInputError(self.name, f"column has shape {arr.shape}, expected ({n},)")
        if self.ftype in (NUMBER, INTEGER):
            return self.numbers(arr)
        if self.ftype == BOOL:
            return self.bools(arr)
        return self.strings(arr)

    def numbers(self, arr: np.ndarray) -> np.ndarray:
        kind = arr.dtype.kind
        if kind in "iub":
            if arr.dtype.itemsize >= 8 and len(arr):  # (only 64-bit integers go past 2**53)
                self.refuse_inexact(arr)
            return arr.astype(np.float64)
        if kind == "f":
            x = arr.astype(np.float64, copy=False)
            present = ~np.isnan(x)
            if self.ftype == INTEGER:
                bad = present & ((x != np.floor(x)) | np.isinf(x))
                if bad.any():
                    raise PolicyInputError(self.name, f"is an integer field, got {x[np.argmax(bad)]!r}")
            if self.model_output and not present.all():
                raise PolicyInputError(self.name, "is a model output and must be present in every row")
            return x
        if kind == "O":
            name, ftype, model = self.name, self.ftype, self.model_output
            values = [coerce(name, ftype, v, None, model) for v in arr.tolist()]
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        article = "an" if self.ftype[:1] in "aeiou" else "a"
        raise PolicyInputError(self.name, f"is {article} {self.ftype} field, got an array of {arr.dtype}")

    def refuse_inexact(self, arr: np.ndarray) -> None:
        """PolicyInputError for a whole number past 2**53 that no float holds (``reference.coerce`` says why)."""
        big = arr > MAX_EXACT_INTEGER
        if arr.dtype.kind == "i":
            big |= arr < -MAX_EXACT_INTEGER
        for value in arr[big].tolist():  # (Python ints: float() != int is exact)
            if float(value) != value:
                raise PolicyInputError(self.name, inexact_integer(self.ftype, value, float(value)))

    def bools(self, arr: np.ndarray) -> np.ndarray:
        kind = arr.dtype.kind
        if kind == "b":
            return arr.astype(np.int32) + 1
        if kind in "iuf":
            if not np.isin(arr, (0, 1)).all():
                raise PolicyInputError(self.name, "is a bool field, got numbers other than 0 and 1")
            return arr.astype(np.int32) + 1
        if kind == "O":
            return self.bool_codes(arr.tolist(), len(arr))
        raise PolicyInputError(self.name, f"is a bool field, got an array of {arr.dtype}")

    def strings(self, arr: np.ndarray) -> np.ndarray:
        kind = arr.dtype.kind
        n = len(arr)
        if kind == "U":
            codes = np.full(n, OTHER_CODE, dtype=self.code_dtype)
            for value, code in self.codes.items():
                if value is not None:
                    codes[arr == value] = code
            return self.checked(codes)
        if kind in "iu" and self.classes is not None:  # label as class indices
            if n and (arr.min() < 0 or arr.max() >= len(self.classes)):
                raise PolicyInputError(self.name, f"class index out of range 0..{len(self.classes) - 1}")
            return (arr + FIRST_CODE).astype(self.code_dtype)
        if kind != "O":
            arr = arr.astype(object)
        return self.codes_of(arr.tolist())

    def codes_of(self, values) -> np.ndarray:
        try:
            codes = np.fromiter(map(self.codes.get, values, repeat(OTHER_CODE)), self.code_dtype)
        except TypeError as exc:
            raise PolicyInputError(self.name, f"is a string field, got an unhashable value ({exc})") from None
        return self.checked(codes)

    def bool_codes(self, values, n: int) -> np.ndarray:
        try:
            codes = np.fromiter(map(_BOOL_CODES.get, values, repeat(_BAD)), np.int32, n)
        except TypeError:  # an unhashable value
            codes = np.full(n, _BAD, dtype=np.int32)
        return self.checked(codes)

    def checked(self, codes: np.ndarray) -> np.ndarray:
        """Refuse what the reference refuses: bad bools, labels outside the classes, missing model outputs."""
        if self.ftype == BOOL:
            if (codes == _BAD).any():
                raise PolicyInputError(self.name, "is a bool field, got a value that is not true/false")
        elif self.classes is not None and (codes == OTHER_CODE).any():
            raise PolicyInputError(self.name, f"a value is not one of the model's classes ({', '.join(self.classes)})")
        if self.model_output and (codes == MISSING_CODE).any():
            raise PolicyInputError(self.name, "is a model output and must be present in every row")
        return codes

    # -- straight from request dicts
    def encode_rows(self, rows: list) -> np.ndarray:
        values = map(dict.get, rows, repeat(self.name))
        if self.ftype == STRING:
            return self.codes_of(values)
        if self.ftype == BOOL:
            return self.bool_codes(values, len(rows))
        listed = list(values)
        try:
            arr = np.array(listed) if listed else np.empty(0, dtype=np.float64)
        except (ValueError, TypeError):  # ragged sequences among the values: let the per-value rules refuse them
            arr = np.empty(0, dtype=np.str_)
        if arr.dtype.kind == "f" and arr.ndim == 1 and len(arr) and not np.abs(arr).max() < MAX_EXACT_INTEGER:
            arr = np.empty(0, dtype=np.str_)  # (ints and floats mixed became floats: an int past 2**53 may have been
            # rounded there, so such a batch is read value by value, by the rules)
        if arr.dtype.kind not in "fiubO" or arr.ndim != 1:
            arr = np.empty(len(listed), dtype=object)
            arr[:] = listed
        return self.numbers(arr)

    def column_from_rows(self, rows: list) -> np.ndarray:
        """The public column (float64 for numbers, object arrays otherwise) of ``rows``."""
        if self.ftype in (NUMBER, INTEGER):
            return self.encode_rows(rows)
        values = list(map(dict.get, rows, repeat(self.name)))
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
