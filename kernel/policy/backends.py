"""Which executor runs compiled policies: the Cython kernel (``ext/rules.pyx``) or numpy.

``DEFAULT`` is the Cython kernel when it is built, else numpy (and numpy
when ``AIOS_PURE_PYTHON=1``), chosen through ``kernel.accel`` like every
other compiled component. ``Policy.using(name)`` picks one explicitly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .. import accel

_MODULES = {"cython": "kernel._ext.rules", "numpy": "kernel.policy.vectorized"}

_chosen = accel.load("policy_rules", _MODULES["cython"], _MODULES["numpy"])
DEFAULT = "cython" if _chosen.__name__ == _MODULES["cython"] else "numpy"


def available() -> list[str]:
    """Executors usable here: numpy always, cython when built (and not forced off)."""
    found = ["numpy"]
    if not accel.FORCE_PURE:
        try:
            importlib.import_module(_MODULES["cython"])
        except ImportError:
            pass
        else:
            found.append("cython")
    return found


def module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown policy backend {name!r}; use one of {', '.join(_MODULES)}")
    if name == "cython" and accel.FORCE_PURE:
        raise ValueError("the cython policy backend is switched off (AIOS_PURE_PYTHON=1)")
    return importlib.import_module(_MODULES[name])
