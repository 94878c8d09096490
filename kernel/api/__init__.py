"""Thin gRPC servicers and the converters between protos and internal types."""

from .frontends import aio_servicer, sync_servicer
from .inference import InferenceService

__all__ = ["InferenceService", "aio_servicer", "sync_servicer"]
