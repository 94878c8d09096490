"""Line numbers for TOML keys, so a config error can say ``FILE:LINE``.

``tomllib`` parses but forgets positions. Config files here are flat
(top-level tables and arrays of tables holding scalars and short lists), so
finding a key's line by scanning the source is exact enough: the table's
header (the n-th ``[[name]]`` for arrays of tables), then the first
``key =`` line inside it.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(#.*)?$")


def line_of(text: str, table: str | None = None, index: int = 0, key: str | None = None) -> int:
    """1-based line of ``key`` in ``[table]`` (or the ``index``-th ``[[table]]``); best effort, never raises."""
    lines = text.splitlines()
    start, seen, current = 0, -1, None
    for number, line in enumerate(lines):
        match = _HEADER.match(line)
        if match:
            current = match.group(2)
            if table is not None and current == table:
                seen += 1
                if seen == index:
                    start = number
                    if key is None:
                        return number + 1
                    break
    else:
        if table is not None:
            # No header: the table may be written as a top-level key (`escalation = 5`, `field = [1]`).
            return _top_level_key_line(lines, table) or 1
    if key is None:
        return 1
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number in range(start, len(lines)):
        if number > start and _HEADER.match(lines[number]) and table is not None:
            break
        if table is None and _HEADER.match(lines[number]):
            break
        if pattern.match(lines[number]):
            return number + 1
    return start + 1


def _top_level_key_line(lines: list[str], key: str) -> int:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(lines):
        if _HEADER.match(line):
            return 0
        if pattern.match(line):
            return number + 1
    return 0
