"""Per-batch after-work: the lane's finisher hook and the decision finisher thread (kernel/pipelines/finisher.py).

A Decide caller must sleep once: the lane hands a finished model batch's
decisions to the finisher without waking their callers, and wakes each only
once its result is set. Batches that finish while a group is being finished
join the next group.
"""

from __future__ import annotations

import threading

import pytest

from kernel.errors import Internal, KernelError
from kernel.pipelines.finisher import BatchFinisher
from kernel.scheduling import Lane, implementations
from kernel.scheduling.policy import ModelSchedule
from kernel.scheduling.types import ITEM_BATCHED, ITEM_DONE


class Model:
    def __init__(self, name: str):
        self.name, self.version = name, "1"


class Owner:
    """Stands for the Decide flow's Pending: the finisher puts the result here."""

    def __init__(self, name: str):
        self.name = name
        self.result = None


def _wait_until(condition, what: str) -> None:
    stop = threading.Event()
    for _ in range(10_000):
        if condition():
            return
        stop.wait(0.001)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture(params=implementations(), ids=lambda cls: cls.name)
def scheduler_class(request):
    return request.param


def test_a_caller_is_woken_only_after_its_batch_is_finished(scheduler_class):
    """The batch ran, but the caller sleeps on until the finisher says its result is there."""
    handed: list = []

    def execute(batch):
        for it in batch.items:
            it.outputs = [it.request_id]
        return 1000

    def finisher(items, done):
        handed.append((list(items), done))
        return True

    lane = Lane(scheduler_class(), execute, slots=1, urgent_slots=0)
    model = Model("m")
    lane.add_model(model, ModelSchedule(max_batch_size=8))
    item = scheduler_class.item_class(model, 1, (), {}, request_id="a")
    item.finisher, item.owner = finisher, Owner("a")
    caller = threading.Thread(target=lane.run_blocking, args=(item,))
    try:
        caller.start()
        _wait_until(lambda: handed, "the batch was handed to the finisher")
        caller.join(0.2)
        assert caller.is_alive() and item.state == ITEM_BATCHED  # ran, not finished: the caller sleeps
        items, done = handed[0]
        assert items == [item] and item.outputs == ["a"]
        item.owner.result = "decided"
        done(items)
        caller.join(10)
        assert not caller.is_alive() and item.state == ITEM_DONE and item.owner.result == "decided"
    finally:
        lane.close()


def test_a_refusing_finisher_leaves_the_callers_to_finish_alone(scheduler_class):
    def execute(batch):
        for it in batch.items:
            it.outputs = []
        return 1000

    lane = Lane(scheduler_class(), execute, slots=1, urgent_slots=0)
    model = Model("m")
    lane.add_model(model, ModelSchedule(max_batch_size=8))
    item = scheduler_class.item_class(model, 1, (), {}, request_id="a")
    item.finisher, item.owner = (lambda items, done: False), Owner("a")
    try:
        assert lane.run_blocking(item).state == ITEM_DONE and item.owner.result is None
    finally:
        lane.close()


def test_batches_handed_in_while_a_group_is_finished_form_the_next_group():
    entered, release = threading.Event(), threading.Event()
    groups: list[list[str]] = []

    def finish_group(pendings):
        groups.append([p.name for p in pendings])
        if len(groups) == 1:
            entered.set()
            release.wait(10)
        return [f"{p.name}!" for p in pendings]

    class Item:
        def __init__(self, name):
            self.owner = Owner(name)

    finisher = BatchFinisher(finish_group)
    finished: list[list[str]] = []
    done = lambda items: finished.append([it.owner.name for it in items])  # noqa: E731
    try:
        first = [Item("a")]
        assert finisher.submit(first, done)
        assert entered.wait(10)
        later = [[Item("b"), Item("c")], [Item("d")]]
        for batch in later:
            assert finisher.submit(batch, done)
        release.set()
        _wait_until(lambda: len(finished) == 3, "every batch was finished")
    finally:
        release.set()
        finisher.close()
    assert groups == [["a"], ["b", "c", "d"]]
    assert finished == [["a"], ["b", "c"], ["d"]]  # done once per batch handed in, in order
    assert first[0].owner.result == "a!" and [it.owner.result for it in later[0]] == ["b!", "c!"]
    assert (finisher.groups, finisher.items) == (2, 4)
    assert not finisher.submit([Item("late")], done)  # closed: the caller finishes alone


def test_a_failing_group_answers_every_decision_with_an_error():
    class Boom(Exception):
        """The injected fault: finishing the group fails."""

    def finish_group(pendings):
        raise Boom("the audit log is gone (injected)")

    class Item:
        def __init__(self, name):
            self.owner = Owner(name)

    finisher = BatchFinisher(finish_group)
    finished = threading.Event()
    items = [Item("a"), Item("b")]
    try:
        finisher.submit(items, lambda _items: finished.set())
        assert finished.wait(10)
    finally:
        finisher.close()
    for it in items:
        assert isinstance(it.owner.result, KernelError) and isinstance(it.owner.result, Internal)
        assert "injected" in it.owner.result.message
