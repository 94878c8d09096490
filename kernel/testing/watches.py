"""Reading a watch on another thread while something ends it, for the review and task watch tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from ..errors import KernelError


def errors_when_ended(watch: Iterator, end: Callable[[], None], timeout_s: float = 10.0) -> list[KernelError]:
    """Read ``watch`` to its end on a thread, call ``end()`` meanwhile, and return what the reading raised.

    Raises AssertionError if the reader is still blocked ``timeout_s`` after ``end()``.
    """
    errors: list[KernelError] = []

    def read() -> None:
        try:
            for _ in watch:
                pass
        except KernelError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    end()
    reader.join(timeout_s)
    assert not reader.is_alive(), "the watch did not end"
    return errors
