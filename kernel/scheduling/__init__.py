"""Scheduling: the step-API scheduler, the lanes that drive it, batch execution."""

from .execute import run_batch
from .lane import Lane
from .reference import ReferenceScheduler
from .types import Batch, WorkItem

__all__ = ["Batch", "Lane", "ReferenceScheduler", "WorkItem", "run_batch", "make_scheduler"]


def make_scheduler(kind: str = "reference"):
    """The scheduler named by the config; only the reference exists until the Cython core lands."""
    if kind != "reference":
        raise ValueError(f"unknown scheduler {kind!r}; available: reference")
    return ReferenceScheduler()


def implementations() -> list:
    """Every scheduler class available here: the reference, and the Cython core when built."""
    found = [ReferenceScheduler]
    try:
        from .._ext.scheduler import CythonScheduler

        found.append(CythonScheduler)
    except ImportError:
        pass
    return found
