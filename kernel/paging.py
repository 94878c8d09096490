"""Opaque page tokens for the List RPCs (ListReviews, ListTasks): a position in the store, bound to the filters
it was issued for; and the filling of one page, bounded by count and by bytes."""

from __future__ import annotations

import base64
import hashlib
import json

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000  # larger requests get this many (AIP-158: clamp, do not refuse)
MAX_TOKEN_CHARS = 512  # tokens this module issues are about 80 characters
# A page stops growing past this many bytes (one message may pass it alone): a page of 1,000 reviews holding
# their requests' free text could pass gRPC's 64 MiB and fail for everyone.
PAGE_BYTES = 16 << 20
_FRAME_BYTES = 6  # a repeated message field's tag and length varint, at most, in a page
_RESPONSE_ROOM = 128  # the page's other fields, at most: its next_page_token (≤ 78 bytes framed), a count


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _filters_digest(filters: tuple) -> str:
    return hashlib.sha256(json.dumps(filters).encode()).hexdigest()[:16]


def encode(position: int, filters: tuple) -> str:
    raw = json.dumps({"after": position, "filters": _filters_digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, filters: tuple) -> int:
    """The position after which the page starts (0 without a token)."""
    if not token:
        return 0
    if len(token) > MAX_TOKEN_CHARS:  # ours are short; never decode megabytes of someone else's
        raise InvalidArgument(f"page_token is not a token this kernel issued (it is {len(token)} characters long)")
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position, digest = raw["after"], raw["filters"]
        # A position is a SQLite rowid: a 64-bit signed integer (and JSON's true is no position).
        if type(position) is not int or not 0 <= position < 2**63:
            raise ValueError
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: JSON nested too deep
        raise InvalidArgument("page_token is not a token this kernel issued; pass next_page_token unchanged") from None
    if digest != _filters_digest(filters):
        raise InvalidArgument("page_token was issued for other filters; keep the filters as they were for its page")
    return position


def take_rows(cursor, limit: int, max_bytes: int | None = None, chunk: int = 8) -> list[tuple[int, bytes]]:
    """``(position, stored bytes)`` rows from ``cursor``, up to ``limit``, stopping at the first row (not the
    first of all) that takes their bytes over ``max_bytes`` (default ``PAGE_BYTES``): ``fill``, counting the
    same bytes, then always ends its page with a token before the rows end. A store reads a page's rows through
    this: reviews and tasks carry their requests' text (up to 1 MiB a field), and a ListReviews of page_size
    1,000 read 1,001 such rows and parsed them all (~2 GB) to send 16; a WatchReviews backlog held 500-row pages
    of them (~1 GB a watch)."""
    max_bytes = PAGE_BYTES if max_bytes is None else max_bytes
    rows, size = [], 0
    while len(rows) < limit:
        batch = cursor.fetchmany(min(chunk, limit - len(rows)))
        if not batch:
            break
        for position, body in batch:
            rows.append((position, body))
            size += len(body)
            if size > max_bytes and len(rows) > 1:
                return rows
    return rows


def fill(rows, limit: int, filters: tuple, append, present=lambda message: message) -> str:
    """``append`` each of ``rows`` (``(position, message, stored bytes)``, one more than ``limit`` read to know
    whether more follow; ``take_rows`` cuts them by bytes), as ``present`` makes it, up to ``limit`` of them or
    a message of ``PAGE_BYTES`` (one alone may pass it); the next page's token, or "" after the last page. (Each
    is presented only when its stored bytes may still go on the page: a page of 1,000 reviews with 1 MiB texts
    stops after 16.)"""
    size = _RESPONSE_ROOM
    for index, (_position, message, nbytes) in enumerate(rows[:limit]):
        if index and size + nbytes > PAGE_BYTES:  # full by its stored bytes: the rest come with the next token
            return encode(rows[index - 1][0], filters)
        shown = present(message)
        # Then by what goes on the wire: its field's tag and length, and what the store does not keep (a review's
        # sequence, its state as of now). A page of stored bytes just under 16 MiB was a message just over it, and
        # a client receiving at most 16 MiB failed on it (a fuzz campaign).
        size += shown.ByteSize() + _FRAME_BYTES
        if index and size > PAGE_BYTES:
            return encode(rows[index - 1][0], filters)
        append(shown)
    return encode(rows[limit - 1][0], filters) if len(rows) > limit else ""
