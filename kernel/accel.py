"""Pick the compiled (Cython) implementation of a component, or its pure-Python reference.

The package must import and work without the extensions (slower); when one
is missing the kernel says so once in the log, and ``AIOS_PURE_PYTHON=1``
forces the references (the test suite runs both ways).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger("aios.accel")

FORCE_PURE = os.environ.get("AIOS_PURE_PYTHON", "") not in ("", "0")
_missing_reported = False
# Which implementation each component runs, for the log and the serve banner.
CHOSEN: dict[str, str] = {}


def load(component: str, compiled: str, reference: str) -> ModuleType:
    """Import ``compiled`` if built (and not forced off), else ``reference``."""
    global _missing_reported
    if not FORCE_PURE:
        try:
            module = importlib.import_module(compiled)
            CHOSEN[component] = "cython"
            return module
        except ImportError as exc:
            if not _missing_reported:
                _missing_reported = True
                log.warning(
                    "compiled extensions are not built (%s); running the pure-Python references, slower. "
                    "Build them with `make build` (or `pip install -e .`).", exc,
                )
    CHOSEN[component] = "python"
    return importlib.import_module(reference)


bytes_codec = load("bytes_codec", "kernel._ext.bytes_codec", "kernel.bytes_codec")
wire = load("wire", "kernel._ext.wire", "kernel.wire")
decision_wire = load("decision_wire", "kernel._ext.decision_wire", "kernel.decision_wire")
infer_scan = load("infer_scan", "kernel._ext.infer_scan", "kernel.infer_scan")
