"""Export records as JSON Lines for tools outside the kernel.

One JSON object per line, in sequence order: the record in the proto3 JSON
mapping (field names as in the .proto), except that ``sequence``,
``time_unix_ns`` and ``links_to`` are plain numbers (``time`` is
``time_unix_ns`` for people: ISO-8601 in UTC, to the nanosecond), ``hash``/``prev_hash``
and ``request_hash`` are lowercase hex (as every other hash a record names), and ``payload`` is the parsed JSON document when it is one
(else its text, else ``payload_base64``).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from typing import TextIO

from google.protobuf.json_format import MessageToDict

from .record import AuditRecord


def utc_iso(unix_ns: int) -> str:
    """``2026-11-28T05:00:00.000001999Z``: the instant in UTC, every digit of it kept."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{nanos:09d}Z"


def record_to_json(record: AuditRecord) -> dict:
    document = MessageToDict(record, preserving_proto_field_name=True)
    document["sequence"] = record.sequence
    document["time_unix_ns"] = record.time_unix_ns
    document["time"] = utc_iso(record.time_unix_ns)  # (a reader of the export met only a 19-digit number)
    document["hash"] = record.hash.hex()
    document["prev_hash"] = record.prev_hash.hex()
    if record.request_hash:  # (proto3 JSON gives bytes as base64: an analyst matched it against nothing)
        document["request_hash"] = record.request_hash.hex()
    if record.has_link:
        document["links_to"] = record.links_to
    if record.payload:
        del document["payload"]
        try:
            text = record.payload.decode("utf-8")
        except UnicodeDecodeError:
            document["payload_base64"] = base64.b64encode(record.payload).decode("ascii")
        else:
            try:
                document["payload"] = json.loads(text)
            except ValueError:
                document["payload"] = text
    return document


def export_jsonl(records: Iterable[AuditRecord], out: TextIO) -> int:
    """Write one line per record to ``out``; returns how many were written."""
    count = 0
    dumps = json.dumps
    for record in records:
        out.write(dumps(record_to_json(record), separators=(",", ":"), sort_keys=True))
        out.write("\n")
        count += 1
    return count
