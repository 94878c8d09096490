"""Scheduling: the step-API scheduler, the lanes that drive it, batch execution."""

from .execute import run_batch
from .lane import Lane
from .lanes import Lanes, device_of
from .reference import ReferenceScheduler
from .types import Batch, WorkItem

__all__ = ["Batch", "Lane", "Lanes", "ReferenceScheduler", "WorkItem", "device_of", "run_batch", "make_scheduler"]


def make_scheduler(kind: str = "auto"):
    """The scheduler named by the config: ``auto`` (the Cython core when built), ``cython`` or ``reference``."""
    if kind == "reference":
        return ReferenceScheduler()
    from .. import accel

    core = accel.load("scheduler", "kernel._ext.scheduler", "kernel.scheduling.reference")
    if hasattr(core, "CythonScheduler"):
        return core.CythonScheduler()
    if kind == "cython":
        raise ValueError("scheduler = 'cython' but the extension is not built (run `make build`)")
    return ReferenceScheduler()


def implementations() -> list:
    """Every scheduler class available here: the reference, and the Cython core when built.

    Each has ``item_class``: the WorkItem class it is tested with (the
    reference runs on the pure-Python items, the core on its own).
    """
    from .. import accel

    found = [ReferenceScheduler]
    if not accel.FORCE_PURE:
        try:
            from .._ext.scheduler import CythonScheduler
        except ImportError:
            pass
        else:
            found.append(CythonScheduler)
    return found
