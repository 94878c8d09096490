"""The leader/follower coalescer that finishes concurrent unary decisions in groups."""

from __future__ import annotations

import threading

import pytest

from kernel.pipelines.coalesce import Coalescer


def test_a_lone_caller_finishes_its_own_item_at_once():
    seen = []
    coalescer = Coalescer(lambda items: seen.append(list(items)) or [i * 2 for i in items])
    assert coalescer.finish(21) == 42
    assert seen == [[21]] and coalescer.groups == 1


def _blocked_first_group(coalescer_kwargs=None):
    """A coalescer whose first group blocks until released, so later callers queue behind it."""
    entered, release = threading.Event(), threading.Event()
    groups: list[list[int]] = []

    def finish_group(items):
        groups.append(list(items))
        if len(groups) == 1:
            entered.set()
            assert release.wait(10)
        return [i * 2 for i in items]

    return Coalescer(finish_group, **(coalescer_kwargs or {})), entered, release, groups


def _run_all(coalescer, items):
    results: dict[int, object] = {}

    def call(i):
        try:
            results[i] = coalescer.finish(i)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in items]
    for t in threads:
        t.start()
    return threads, results


def test_callers_queued_behind_a_group_are_finished_together_each_with_its_own_result():
    coalescer, entered, release, groups = _blocked_first_group()
    first, results = _run_all(coalescer, [0])
    assert entered.wait(10)
    rest, more = _run_all(coalescer, range(1, 17))
    while len(coalescer._queue) < 16:  # noqa: SLF001 - wait until all 16 have queued (no sleeping)
        threading.Event().wait(0.001)
    release.set()
    for t in first + rest:
        t.join(10)
    results.update(more)
    assert results == {i: i * 2 for i in range(17)}
    assert groups[0] == [0] and sorted(groups[1]) == list(range(1, 17)) and len(groups) == 2


def test_a_failing_group_fails_each_of_its_callers_and_nobody_hangs():
    calls = []

    def finish_group(items):
        calls.append(items)
        raise RuntimeError("boom")

    coalescer = Coalescer(finish_group)
    with pytest.raises(RuntimeError, match="boom"):
        coalescer.finish(1)
    with pytest.raises(RuntimeError, match="boom"):  # the next caller leads again instead of hanging
        coalescer.finish(2)
    assert calls == [[1], [2]]


def test_groups_are_bounded_and_the_rest_is_led_by_the_oldest_waiter():
    coalescer, entered, release, groups = _blocked_first_group({"max_group": 4})
    first, results = _run_all(coalescer, [0])
    assert entered.wait(10)
    rest, more = _run_all(coalescer, range(1, 11))
    while len(coalescer._queue) < 10:  # noqa: SLF001
        threading.Event().wait(0.001)
    release.set()
    for t in first + rest:
        t.join(10)
    results.update(more)
    assert results == {i: i * 2 for i in range(11)}
    assert [len(g) for g in groups] == [1, 4, 4, 2]
