"""One lane per device: the CPU lane (slots = usable cores) and one per GPU.

A model version runs on the lane of the device onnxruntime placed it on; each
lane has its own scheduler, so models compete for a device only with the
models on that device.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from .lane import Lane, remember_weakly
from .policy import ModelSchedule

GPU_LANE_SLOTS = 1  # batches at once per GPU: one stream keeps the device busy without thrashing it


def device_of(provider: str, device_id: int = 0) -> str:
    """The lane name for an onnxruntime provider: ``cpu`` or ``cuda:N``."""
    return f"cuda:{device_id}" if provider.startswith("CUDA") else "cpu"


class Lanes:
    def __init__(self, make_scheduler: Callable[[], object], execute, cpu_slots: int, on_batch=None, on_item=None,
                 batch_nice: int = 0):
        self._make_scheduler = make_scheduler
        self._batch_nice = batch_nice
        self._execute = execute
        self._cpu_slots = cpu_slots
        self._hooks = (on_batch, on_item)
        self._lanes: dict[str, Lane] = {}
        self._by_model: dict[object, Lane] = {}
        self._left: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unloaded versions -> their lane
        self._lock = threading.Lock()
        self.lane("cpu")

    def lane(self, device: str) -> Lane:
        """The lane of ``device``, created on first use."""
        with self._lock:
            lane = self._lanes.get(device)
            if lane is None:
                slots = self._cpu_slots if device == "cpu" else GPU_LANE_SLOTS
                lane = Lane(self._make_scheduler(), self._execute, slots=slots, name=device,
                            on_batch=self._hooks[0], on_item=self._hooks[1], batch_nice=self._batch_nice)
                self._lanes[device] = lane
            return lane

    @property
    def cpu(self) -> Lane:
        return self._lanes["cpu"]

    def all(self) -> list[Lane]:
        return list(self._lanes.values())

    def devices_in_use(self) -> list[str]:
        """The devices that run at least one model version now."""
        return sorted({lane.name for lane in self._by_model.values()})

    def add_model(self, model, device: str, schedule: ModelSchedule, profile=()) -> Lane:
        lane = self.lane(device)
        lane.add_model(model, schedule, profile)
        self._by_model[model] = lane
        return lane

    def remove_model(self, model) -> None:
        lane = self._by_model.pop(model, None)
        if lane is not None:
            # A request that looked the version up before it was unloaded still finds its lane: it runs
            # there on the old version, as the requests queued at the reload do (Lane.remove_model).
            remember_weakly(self._left, model, lane)
            lane.remove_model(model)

    def for_model(self, model) -> Lane:
        """The lane running ``model`` (or that ran it, while anything still holds the unloaded version);
        KeyError for a model it never ran."""
        try:
            return self._by_model[model]
        except KeyError:
            return self._left[model]

    def load(self, model) -> tuple[int, int]:
        lane = self._by_model.get(model)
        return lane.load(model) if lane is not None else (0, 0)

    def stats(self) -> dict:
        """Scheduler counters of every model on every lane."""
        models = {}
        for lane in self.all():
            models.update(lane.stats()["models"])
        return {"models": models, "lanes": {lane.name: lane.slots for lane in self.all()}}

    def version_counters(self) -> dict[int, dict[str, int]]:
        """Scheduler counters per model version, since it was loaded and across its reloads, keyed by ``id`` of its
        ``ModelStats`` (``Lane.version_counters``), with its requests queued and batches running on all its copies:
        what the metrics endpoint and ListModels report."""
        counters: dict[int, dict[str, int]] = {}
        for lane in self.all():
            lane.version_counters(counters)
        return counters

    def close(self) -> None:
        for lane in self.all():
            lane.close()
