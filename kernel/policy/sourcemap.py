"""Where things are in a policy file: ``tomllib`` gives values but no positions, so scan the text.

The scan understands the TOML a policy file uses: ``[table]`` and
``[[array-table]]`` headers, ``key = value`` lines, comments and multi-line
strings, and arrays of inline tables (``rule = [{id = "A", when = "..."}, ...]``,
each table on its own line or not). It records the line of every header and
key (the n-th ``[[rule]]``, or the n-th inline table of ``rule = [...]``, is
``("rule", n)``) and where each value starts, which is enough to point an
error at the exact character of a condition whenever the condition's source
text is its value verbatim (no escapes).
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
        skip_to = 0     # lines before this one were read as part of an array value
        for index, start in enumerate(self.line_starts):
            if index < skip_to:
                continue
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
                if self.text.startswith("[", value_at):
                    name = key if table is None else f"{table}.{key}" if isinstance(table, str) else None
                    array_end = self._scan_array(name, value_at)
                    skip_to = self._line_index(array_end - 1) + 1
                    continue
                for delim in ('"""', "'''"):
                    if self.text.startswith(delim, value_at) and self.text.count(delim, value_at + 3, end) == 0:
                        closing = delim

    def _scan_array(self, name: str | None, at: int) -> int:
        """Record the inline tables of the array value starting at ``at`` as ``(name, n)``; its end offset."""
        text, depth, braces, count = self.text, 0, 0, 0
        entry, want_key = None, False
        i = at
        while i < len(text):
            c = text[i]
            if want_key and not c.isspace():
                want_key = False
                if m := _KEY.match(text, i):
                    if name is not None:
                        self.keys.setdefault((entry, m.group(1).strip("\"'")), (self._line_index(i) + 1, m.end()))
                    i = m.end()
                    continue
            if c == "#":
                newline = text.find("\n", i)
                i = len(text) if newline < 0 else newline
                continue
            if c in "\"'":
                i = _string_end(text, i)
                continue
            if c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
                if depth == 0:
                    return i + 1
            elif c == "{":
                braces += 1
                if braces == 1 and depth == 1:  # an element of the array: the next inline table
                    entry = (name, count)
                    count += 1
                    if name is not None:
                        self.headers.setdefault(entry, self._line_index(i) + 1)
                    want_key = True
            elif c == "}":
                braces -= 1
            elif c == "," and braces == 1 and depth == 1:
                want_key = True
            i += 1
        return len(text)

    def _line_index(self, offset: int) -> int:
        return bisect.bisect_right(self.line_starts, offset) - 1

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
        row = self._line_index(absolute)
        return row + 1, absolute - self.line_starts[row] + 1


def _string_end(text: str, at: int) -> int:
    """The offset just past the TOML string starting at ``at`` (basic or literal, one- or multi-line)."""
    quote = text[at]
    if text.startswith(quote * 3, at):
        end = at + 3
        while True:
            found = text.find(quote * 3, end)
            if found < 0:
                return len(text)
            if quote == '"' and _escaped(text, found):
                end = found + 1
                continue
            while text.startswith(quote, found + 3):  # up to two quotes may end the content
                found += 1
            return found + 3
    i = at + 1
    while i < len(text) and text[i] not in (quote, "\n"):
        i += 2 if quote == '"' and text[i] == "\\" else 1
    return i + 1


def _escaped(text: str, at: int) -> bool:
    """Whether the character at ``at`` follows an odd number of backslashes."""
    count = 0
    while at - count - 1 >= 0 and text[at - count - 1] == "\\":
        count += 1
    return count % 2 == 1
