from collections.abc import Mapping
from typing import Any

import numpy as np

from kernel.pipelines.fields import FieldSpec

class RowCodec:
    pipeline: str
    fields: tuple[FieldSpec, ...]
    width: int
    sorted_names: tuple[str, ...]
    def __init__(self, pipeline: str, fields: tuple[FieldSpec, ...], width: int) -> None: ...
    def read(self, given: Mapping[str, Any]) -> dict[str, Any]: ...
    def encode(self, values: dict[str, Any]) -> np.ndarray: ...
    def input_hash(self, values: dict[str, Any], digests: Mapping[str, str]) -> str: ...
    def read_encode_hash(self, request: Any, digests: Mapping[str, str]) -> tuple[dict[str, Any], np.ndarray, str]: ...
