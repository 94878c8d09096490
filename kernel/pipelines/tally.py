"""Decisions counted per pipeline, by outcome, since the kernel started: what ListPipelines reports.

A dashboard built on the kernel's statistics had model counters and nothing
for decisions (a statistics audit: no count by outcome, none of decisions
recorded too late to act on). Counted once per finished group, under one
lock round; replays from the idempotency store are not new decisions and
are not counted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import KernelError

__all__ = ["DecisionCounts", "DecisionTally"]

_OUTCOME_FIELD = {kpb.AUTOMATED: "automated", kpb.ESCALATED: "escalated", kpb.FALLBACK: "fallback"}


@dataclass(slots=True)
class DecisionCounts:
    automated: int = 0
    escalated: int = 0
    fallback: int = 0  # the model failed: the pipeline's fallback action, sent to a person
    failed: int = 0  # answered with an error after the request was accepted (the model, the audit log, ...)
    # of the decided ones: recorded after the request's deadline, or recorded in time with the answer ready only
    # after it (group_finish.in_time); answered DEADLINE_EXCEEDED
    late: int = 0


class DecisionTally:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_pipeline: dict[str, DecisionCounts] = {}

    def add(self, group: list, results: list, late) -> None:
        """One finished group: ``results`` (a Decision or a KernelError per pending of ``group``) before late
        ones were turned into DEADLINE_EXCEEDED; ``late``, None or their ``(index, ns late)``."""
        with self._lock:
            by_pipeline = self._by_pipeline
            for pending, result in zip(group, results):
                name = pending.pipeline.name
                counts = by_pipeline.get(name)
                if counts is None:
                    counts = by_pipeline[name] = DecisionCounts()
                if isinstance(result, KernelError):
                    counts.failed += 1
                else:
                    field = _OUTCOME_FIELD.get(result.outcome)
                    if field is not None:
                        setattr(counts, field, getattr(counts, field) + 1)
            for index, _overdue in late or ():
                by_pipeline[group[index].pipeline.name].late += 1

    def snapshot(self) -> dict[str, DecisionCounts]:
        """Every pipeline's counts (copies), those of pipelines since removed too: the metrics endpoint's."""
        with self._lock:
            return {name: replace(counts) for name, counts in self._by_pipeline.items()}

    def add_late(self, pipeline: str) -> None:
        """One decision of ``pipeline``, counted when its group finished, whose answer was ready only after
        its deadline (``GroupFinish.in_time``)."""
        with self._lock:
            counts = self._by_pipeline.get(pipeline)
            if counts is None:
                counts = self._by_pipeline[pipeline] = DecisionCounts()
            counts.late += 1

    def get(self, pipeline: str) -> DecisionCounts:
        with self._lock:
            counts = self._by_pipeline.get(pipeline)
            return replace(counts) if counts is not None else DecisionCounts()
