"""How much work a store read takes, counted in SQLite's own steps (not time: a loaded host stretches time), for the
tests that hold a metrics read to a cost that does not grow with the rows behind it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from ..store import open_database

STEP = 100  # SQLite VM instructions per counted step


def read_steps(folder: Path, fill: Callable[[sqlite3.Connection], None], read: Callable) -> int:
    """Steps the store's one reader takes for ``read(db)`` on a fresh store in ``folder`` that ``fill(conn)`` wrote
    straight into (a plain connection); ``read`` may assert on what it reads."""
    steps = []
    db = open_database(folder, read_connections=1)  # (one reader: the one traced)
    try:
        with sqlite3.connect(db.path) as conn:
            fill(conn)
        with db.read() as conn:
            conn.set_progress_handler(lambda: steps.append(1), STEP)
        steps.clear()
        read(db)
        return len(steps)
    finally:
        db.close()
