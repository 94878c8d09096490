"""For tests of paged lists (ListReviews, ListTasks): what one page held in memory, and every page read in turn."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_traced_bytes(work: Callable[[], object]) -> int:
    """The most Python memory (tracemalloc: stored bodies read from SQLite are Python bytes) held at once while
    ``work()`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def every_page(list_page: Callable[[str], object], items_of: Callable[[object], list], most: int) -> list:
    """Every item of a paged list, in order: ``list_page(token)`` from the first page (token "") to the last,
    each page asserted to hold between 1 and ``most`` items."""
    found, token = [], ""
    while True:
        page = list_page(token)
        items = items_of(page)
        assert 0 < len(items) <= most, len(items)
        found += items
        if not (token := page.next_page_token):
            return found
