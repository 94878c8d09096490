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
