"""Model repository, onnxruntime runtime and the hub of loaded versions."""

from .config import ModelCard, ModelConfig, TensorSpec
from .datatypes import DataType
from .errors import ModelConfigError, ModelInUse
from .hub import READY, UNAVAILABLE, IndexEntry, ModelHub, ModelVersion
from .runtime import OnnxModel
from .stats import ModelStats

__all__ = [
    "DataType", "IndexEntry", "ModelCard", "ModelConfig", "ModelConfigError", "ModelHub", "ModelInUse",
    "ModelStats", "ModelVersion", "OnnxModel", "READY", "TensorSpec", "UNAVAILABLE",
]
