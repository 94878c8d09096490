"""The reference scheduler: plain Python, first-come-first-served per model.

It implements the step API every scheduler implements (ARCHITECTURE.md §3):

- ``add_model(model, max_batch_size, instances)`` / ``remove_model(model)``
- ``submit(item)``: queue an item (the item is its own ticket)
- ``cancel(item) -> bool``: drop a queued item; False if already batched or done
- ``next_batches(now_ns, limit)``: batches ready to run now
- ``complete(batch, duration_ns)``: a batch finished; its instance is free
- ``next_wakeup(now_ns)``: when to call ``next_batches`` again with no new event
- ``pop_expired()``: items whose deadline passed while queued
- ``has_work()`` and ``stats()``

No I/O, no threads, no clock reads: time comes in as ``now_ns``. Callers
serialise calls (the lane holds a lock).
"""

from __future__ import annotations

from collections import deque

from .types import ITEM_BATCHED, ITEM_CANCELLED, ITEM_EXPIRED, ITEM_QUEUED, NO_DEADLINE, Batch, WorkItem


class _ModelQueue:
    __slots__ = ("max_batch_size", "instances", "in_flight", "items")

    def __init__(self, max_batch_size: int, instances: int):
        self.max_batch_size = max_batch_size  # rows; 0 = one item per batch
        self.instances = instances  # batches of this model that may run at once
        self.in_flight = 0
        self.items: deque[WorkItem] = deque()


class ReferenceScheduler:
    """FIFO per model; batches the queue head with followers of the same shape."""

    name = "reference"

    def __init__(self) -> None:
        self._queues: dict[object, _ModelQueue] = {}
        self._order: list[object] = []  # round-robin order over models
        self._next = 0
        self._expired: list[WorkItem] = []
        self._queued = 0
        self._submitted = 0
        self._batches = 0

    def add_model(self, model: object, max_batch_size: int, instances: int) -> None:
        if model not in self._queues:
            self._queues[model] = _ModelQueue(max_batch_size, instances)
            self._order.append(model)

    def remove_model(self, model: object) -> list[WorkItem]:
        """Forget a model; returns its still-queued items for the caller to fail."""
        queue = self._queues.pop(model, None)
        if queue is None:
            return []
        self._order.remove(model)
        left = [item for item in queue.items if item.state == ITEM_QUEUED]
        for item in left:
            item.state = ITEM_CANCELLED
        self._queued -= len(left)
        return left

    def submit(self, item: WorkItem) -> WorkItem:
        queue = self._queues.get(item.model)
        if queue is None:
            raise KeyError("model is not registered with the scheduler")
        item.state = ITEM_QUEUED
        queue.items.append(item)
        self._queued += 1
        self._submitted += 1
        return item

    def cancel(self, item: WorkItem) -> bool:
        # Lazy removal: the item stays in the deque and is skipped when reached.
        if item.state != ITEM_QUEUED:
            return False
        item.state = ITEM_CANCELLED
        self._queued -= 1
        return True

    def load(self, model: object) -> tuple[int, int]:
        """(queued items, running batches) of one model."""
        queue = self._queues.get(model)
        if queue is None:
            return 0, 0
        return sum(1 for item in queue.items if item.state == ITEM_QUEUED), queue.in_flight

    def has_work(self) -> bool:
        return self._queued > 0

    def _take_batch(self, queue: _ModelQueue, now_ns: int) -> Batch | None:
        items = queue.items
        head = None
        while items:
            candidate = items.popleft()
            if candidate.state != ITEM_QUEUED:
                continue
            if candidate.deadline_ns != NO_DEADLINE and candidate.deadline_ns <= now_ns:
                candidate.state = ITEM_EXPIRED
                self._queued -= 1
                self._expired.append(candidate)
                continue
            head = candidate
            break
        if head is None:
            return None
        chosen, rows = [head], head.rows
        if queue.max_batch_size > 0:
            # Take followers in arrival order while they fit; stop at the first
            # item of another shape or one that does not fit, so FIFO holds.
            while items:
                follower = items[0]
                if follower.state != ITEM_QUEUED:
                    items.popleft()
                    continue
                if follower.shape_key != head.shape_key or rows + follower.rows > queue.max_batch_size:
                    break
                if follower.deadline_ns != NO_DEADLINE and follower.deadline_ns <= now_ns:
                    items.popleft()
                    follower.state = ITEM_EXPIRED
                    self._queued -= 1
                    self._expired.append(follower)
                    continue
                chosen.append(items.popleft())
                rows += follower.rows
        for item in chosen:
            item.state = ITEM_BATCHED
        self._queued -= len(chosen)
        queue.in_flight += 1
        self._batches += 1
        return Batch(head.model, chosen, rows)

    def next_batches(self, now_ns: int, limit: int = 1) -> list[Batch]:
        # Round-robin over models, one batch per model per turn, until
        # ``limit`` batches or no model can start another (empty queue, or
        # all its instances busy).
        batches: list[Batch] = []
        count = len(self._order)
        progressed = True
        while progressed and len(batches) < limit and self._queued:
            progressed = False
            for step in range(count):
                if len(batches) >= limit:
                    break
                position = (self._next + step) % count
                queue = self._queues[self._order[position]]
                if queue.in_flight >= queue.instances or not queue.items:
                    continue
                batch = self._take_batch(queue, now_ns)
                if batch is not None:
                    batches.append(batch)
                    progressed = True
            self._next = (self._next + 1) % count if count else 0
        return batches

    def complete(self, batch: Batch, duration_ns: int) -> None:
        queue = self._queues.get(batch.model)
        if queue is not None:
            queue.in_flight -= 1

    def next_wakeup(self, now_ns: int) -> int | None:
        # FIFO without batching windows: anything runnable is handed out at once.
        return None

    def pop_expired(self) -> list[WorkItem]:
        expired, self._expired = self._expired, []
        return expired

    def stats(self) -> dict:
        return {
            "scheduler": self.name,
            "queued": self._queued,
            "submitted": self._submitted,
            "batches": self._batches,
            "models": len(self._queues),
        }
