"""Tensor datatypes: the Open Inference Protocol names and their numpy/ONNX/Triton forms.

One table, so every conversion (request parsing, metadata, Triton's
ModelConfig, validation against the ONNX graph) agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class DataType:
    name: str  # KServe v2 / OIP name, e.g. "FP32"
    numpy: np.dtype  # dtype of the numpy array we hand to onnxruntime
    onnx: str  # onnxruntime's type string, e.g. "tensor(float)"
    triton: str  # Triton ModelConfig enum name, e.g. "TYPE_FP32"
    contents_field: str | None  # InferTensorContents field for typed (non-raw) inputs

    @property
    def itemsize(self) -> int:
        """Bytes per element in ``raw_input_contents``; 0 for variable-length BYTES."""
        return 0 if self.name == "BYTES" else self.numpy.itemsize


_TABLE = [
    DataType("BOOL", np.dtype(np.bool_), "tensor(bool)", "TYPE_BOOL", "bool_contents"),
    DataType("UINT8", np.dtype(np.uint8), "tensor(uint8)", "TYPE_UINT8", "uint_contents"),
    DataType("UINT16", np.dtype(np.uint16), "tensor(uint16)", "TYPE_UINT16", "uint_contents"),
    DataType("UINT32", np.dtype(np.uint32), "tensor(uint32)", "TYPE_UINT32", "uint_contents"),
    DataType("UINT64", np.dtype(np.uint64), "tensor(uint64)", "TYPE_UINT64", "uint64_contents"),
    DataType("INT8", np.dtype(np.int8), "tensor(int8)", "TYPE_INT8", "int_contents"),
    DataType("INT16", np.dtype(np.int16), "tensor(int16)", "TYPE_INT16", "int_contents"),
    DataType("INT32", np.dtype(np.int32), "tensor(int32)", "TYPE_INT32", "int_contents"),
    DataType("INT64", np.dtype(np.int64), "tensor(int64)", "TYPE_INT64", "int64_contents"),
    # FP16 has no typed-contents field in the protocol: raw_input_contents only.
    DataType("FP16", np.dtype(np.float16), "tensor(float16)", "TYPE_FP16", None),
    DataType("FP32", np.dtype(np.float32), "tensor(float)", "TYPE_FP32", "fp32_contents"),
    DataType("FP64", np.dtype(np.float64), "tensor(double)", "TYPE_FP64", "fp64_contents"),
    DataType("BYTES", np.dtype(object), "tensor(string)", "TYPE_STRING", "bytes_contents"),
]

BY_NAME: dict[str, DataType] = {dt.name: dt for dt in _TABLE}
BY_ONNX: dict[str, DataType] = {dt.onnx: dt for dt in _TABLE}
BY_TRITON: dict[str, DataType] = {dt.triton: dt for dt in _TABLE}
NAMES = tuple(BY_NAME)


def from_name(name: str) -> DataType:
    """Look up an OIP datatype name; ``KeyError`` when unknown (callers word the error)."""
    return BY_NAME[name]


def from_numpy(dtype: np.dtype) -> DataType:
    """The OIP datatype of a numpy array (object and bytes arrays are BYTES)."""
    if dtype.kind in ("O", "S", "U"):
        return BY_NAME["BYTES"]
    for dt in _TABLE:
        if dt.numpy == dtype:
            return dt
    raise KeyError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
