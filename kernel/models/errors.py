"""Errors raised while reading a model repository or loading a model."""

from __future__ import annotations

from pathlib import Path


class ModelConfigError(ValueError):
    """A model's files are wrong; the message names the file and the field."""

    def __init__(self, path: Path | str, field: str, problem: str):
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}: {field}: " if field else f"{self.path}: "
        super().__init__(where + problem)


class ModelInUse(ModelConfigError):
    """A reload whose files are valid but would no longer fit what serves on the version it replaces (a pipeline
    bound to it): refused, the version loaded before keeps serving. The caller's FAILED_PRECONDITION, not a file
    that is wrong in itself."""
