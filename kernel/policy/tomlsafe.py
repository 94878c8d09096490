"""``tomllib.loads`` for text from outside (policy and pipeline files, uploads): every failure is a
``TomlError`` with a line, never a traceback.

``tomllib`` raises more than ``TOMLDecodeError`` on hostile input: an integer
of more than ``sys.get_int_max_str_digits()`` digits is a bare ``ValueError``
from ``int()``, and a few thousand nested ``[`` exhaust the recursion limit.
Neither says where. The values it does return may also nest deeply enough that
later code (a ``repr`` in an error message) hits the recursion limit, so
nesting beyond ``MAX_NESTING`` is refused here too: these files use a few
levels at most.
"""

from __future__ import annotations

import re
import sys
import tomllib

MAX_NESTING = 32  # arrays/tables inside each other; policy and pipeline files need three or four
_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


class TomlError(ValueError):
    """Text that is not usable TOML; ``line`` (1-based, 0 when unknown) and ``column`` say where."""

    def __init__(self, message: str, line: int, column: int = 0):
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


def loads(text: str) -> dict:
    """The TOML document in ``text``; raises ``TomlError`` for anything ``tomllib`` refuses or chokes on."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        if text.startswith("\ufeff"):  # (an editor's byte-order mark: tomllib says only "Invalid statement")
            raise TomlError("the file starts with a byte-order mark (U+FEFF), which TOML does not allow: save it as "
                            "UTF-8 without a BOM", 1, 1) from None
        m = _TOML_POS.search(str(exc))
        line, column = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        raise TomlError(_TOML_POS.sub("", str(exc)).strip(), line, column) from None
    except RecursionError:
        raise TomlError(f"arrays or inline tables nested too deeply (at most {MAX_NESTING} levels)",
                        _deep_line(text)) from None
    except ValueError:  # int() past sys.get_int_max_str_digits(): tomllib does not wrap it
        limit = sys.get_int_max_str_digits()
        raise TomlError(f"an integer with more than {limit} digits; no number here needs that many",
                        _long_number_line(text, limit)) from None
    if _too_deep(doc):
        raise TomlError(f"arrays or inline tables nested too deeply (at most {MAX_NESTING} levels)", _deep_line(text))
    return doc


def _too_deep(doc) -> bool:
    # Iterative: a recursive walk would fail on exactly the documents it is looking for.
    stack = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False


def _long_number_line(text: str, limit: int) -> int:
    m = re.search(rf"[0-9_]{{{limit + 1},}}", text)
    return text.count("\n", 0, m.start()) + 1 if m else 0


def _deep_line(text: str) -> int:
    """The line where ``[``/``{`` nesting (outside strings and comments) first passes ``MAX_NESTING``."""
    depth, line, i, n = 0, 1, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "#":
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
            continue
        elif c in "\"'":
            end = text.find(c, i + 1)  # good enough to skip a string's brackets; the line is best effort
            if end < 0:
                return line
            line += text.count("\n", i, end)
            i = end + 1
            continue
        elif c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return 0
