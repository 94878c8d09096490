"""Review rows stored in the background (kernel/review/deferred.py): nothing lost, reads see earlier rows."""

from __future__ import annotations

import threading

from kernel.review.deferred import DeferredRows


class StoreFault(Exception):
    """The injected fault: the store fails."""


def test_settle_stores_everything_queued_before_it_in_order_in_one_call():
    calls: list = []
    rows = DeferredRows(lambda r, c: calls.append((list(r), list(c))), window_s=60)  # the thread would wait a minute
    try:
        rows.add([1, 2], "g1")
        rows.add([3], "g2")
        rows.settle()
        assert calls == [([1, 2, 3], ["g1", "g2"])]
        rows.settle()  # nothing queued: no empty store call
        assert len(calls) == 1
    finally:
        rows.close()


def test_the_thread_stores_rows_without_a_reader():
    stored = threading.Event()
    got: list = []
    rows = DeferredRows(lambda r, c: (got.extend(r), stored.set()), window_s=0.001)
    try:
        rows.add(["x"], None)
        assert stored.wait(10)
        assert got == ["x"] and rows.rows == 1
    finally:
        rows.close()


def test_a_failed_store_keeps_the_rows_first_in_line_and_a_later_store_takes_them():
    calls: list = []
    fail = [True]

    def store(r, c):
        calls.append(list(r))
        if fail[0]:
            raise StoreFault("disk full (injected)")

    rows = DeferredRows(store, window_s=60)
    try:
        rows.add([1], "a")
        rows.settle()  # fails, returns (a reader is not blocked by a broken store)
        rows.add([2], "b")
        fail[0] = False
        rows.settle()
        assert calls == [[1], [1, 2]] and rows.failures >= 1 and rows.rows == 2
    finally:
        rows.close()


def test_close_stores_what_is_queued():
    got: list = []
    rows = DeferredRows(lambda r, c: got.extend(r), window_s=60)
    rows.add([1, 2, 3], None)
    rows.close()
    assert got == [1, 2, 3]


def test_a_store_that_keeps_failing_logs_one_traceback_then_counts_then_says_when_it_works(caplog):
    fail = [True]

    def store(r, c):
        if fail[0]:
            raise StoreFault("disk full (injected)")

    rows = DeferredRows(store, window_s=60)
    try:
        with caplog.at_level("INFO", logger="aios.review"):
            for n in range(20):
                rows.add([n], None)
                rows.settle()
            fail[0] = False
            rows.settle()
    finally:
        rows.close()
    failures = [r for r in caplog.records if "storing review rows failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None  # one traceback, not twenty
    assert "disk full (injected)" in failures[0].getMessage()
    assert any("storing review rows works again, after 20 failures in a row" in r.getMessage() for r in caplog.records)


def test_a_store_that_says_what_failed_is_logged_without_a_traceback(caplog):
    """A full or failing store answers with a KernelError that says what happened (kernel/store/faults.py):
    its line is the news, a traceback through the store's code is not."""
    from kernel.errors import Unavailable

    def store(r, c):
        raise Unavailable("data_dir X: this write was not stored: the disk holding kernel.sqlite3 is full (injected)")

    rows = DeferredRows(store, window_s=60)
    try:
        with caplog.at_level("INFO", logger="aios.review"):
            rows.add([1], None)
            rows.settle()
    finally:
        rows._store = lambda r, c: None  # (so close can store what is left)
        rows.close()
    (failure,) = [r for r in caplog.records if "storing review rows failed" in r.getMessage()]
    assert failure.exc_info is None and "the disk holding kernel.sqlite3 is full" in failure.getMessage()
