"""Where things are in a policy file: ``tomllib`` gives values but no positions, so scan the text.

The scan understands the TOML a policy file uses: ``[table]`` and
``[[array-table]]`` headers, ``key = value`` lines, comments and multi-line
strings. It records the line of every header and key (the n-th
``[[rule]]`` is ``("rule", n)``) and where each value starts, which is enough
to point an error at the exact character of a condition whenever the
condition's source text is its value verbatim (no escapes).
"""

from __future__ import annotations

import bisect
import re

_ARRAY_HEADER = re.compile(r"\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]")
_HEADER = re.compile(r"\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"""([A-Za-z0-9_-]+|"[^"\\]*"|'[^']*')\s*=\s*""")


class SourceMap:
    __slots__ = ("text", "line_starts", "headers", "keys")

    def __init__(self, text: str):
        self.text = text
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.headers: dict = {}   # table key -> line
        self.keys: dict = {}      # (table key, key) -> (line, offset of the value in text)
        self._scan()

    def _scan(self) -> None:
        table = None
        counts: dict[str, int] = {}
        closing = None  # the delimiter of the multi-line string we are inside
        for index, start in enumerate(self.line_starts):
            end = self.line_starts[index + 1] if index + 1 < len(self.line_starts) else len(self.text)
            line = self.text[start:end]
            if closing is not None:
                if closing in line:
                    closing = None
                continue
            stripped = line.lstrip()
            indent = len(line) - len(stripped)
            if m := _ARRAY_HEADER.match(stripped):
                name = m.group(1)
                table = (name, counts.get(name, 0))
                counts[name] = table[1] + 1
                self.headers[table] = index + 1
            elif m := _HEADER.match(stripped):
                table = m.group(1)
                self.headers[table] = index + 1
            elif m := _KEY.match(stripped):
                key = m.group(1).strip("\"'")
                value_at = start + indent + m.end()
                self.keys.setdefault((table, key), (index + 1, value_at))
                for delim in ('"""', "'''"):
                    if self.text.startswith(delim, value_at) and self.text.count(delim, value_at + 3, end) == 0:
                        closing = delim

    def line_of(self, table, key: str | None = None) -> int:
        """Line of ``key`` in ``table`` (or of the table's header); 0 when not found."""
        if key is not None and (table, key) in self.keys:
            return self.keys[(table, key)][0]
        return self.headers.get(table, 0)

    def position(self, table, key: str, value: str, offset: int) -> tuple[int, int]:
        """(line, column) of character ``offset`` of string ``value`` stored at ``table.key``.

        Column is 0 when the source text is not the value verbatim (escapes,
        line-ending backslashes): then only the key's line is known.
        """
        found = self.keys.get((table, key))
        if found is None:
            return self.headers.get(table, 0), 0
        line, at = found
        text = self.text
        if text.startswith(('"""', "'''"), at):
            at += 3
            if text.startswith("\r\n", at):
                at += 2
            elif text.startswith("\n", at):
                at += 1
        elif text.startswith(('"', "'"), at):
            at += 1
        else:
            return line, 0
        if text[at:at + len(value)] != value:
            return line, 0
        absolute = at + offset
        row = bisect.bisect_right(self.line_starts, absolute) - 1
        return row + 1, absolute - self.line_starts[row] + 1
