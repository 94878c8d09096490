"""Protocol-buffer wire bytes: one field's occurrences moved to another field number (pure-Python reference).

An audit record keeps a decision request's field map as its own ``inputs``
map: the same ``map<string, Value>`` type under another field number. Copying
the map through upb's Python objects costs ~4.7 µs a decision; re-tagging the
request's serialized entries and parsing them into the record costs ~1.3.
``ext/wire.pyx`` is the compiled twin; both pass ``tests/test_wire.py``.
Import through ``kernel.accel``.
"""

from __future__ import annotations

_LENGTH_DELIMITED = 2


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError(f"a varint runs past the end of the message at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >> 64:
                raise ValueError(f"a varint longer than 64 bits ends at byte {pos}")
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError(f"a varint longer than 10 bytes ends at byte {pos}")


def encode_varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint (also for encoders outside this module: provenance)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def retag(data: bytes, field: int, new_field: int) -> bytes:
    """Every top-level occurrence of length-delimited ``field`` in ``data``, re-tagged as ``new_field``.

    Other fields are skipped. ValueError for bytes that are not a
    well-formed message, or where ``field`` is not length-delimited.
    """
    if not 1 <= field < 1 << 29 or not 1 <= new_field < 1 << 29:
        raise ValueError(f"field numbers must be 1..{(1 << 29) - 1}, got {field} and {new_field}")
    tag = encode_varint(new_field << 3 | _LENGTH_DELIMITED)
    out = bytearray()
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if number == field and wire_type != _LENGTH_DELIMITED:
            raise ValueError(f"field {field} is not length-delimited (wire type {wire_type})")
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, start = _varint(data, pos)
            if number == field and start + length <= end:
                out += tag
                out += data[pos:start + length]  # the length as it was, then the contents
            pos = start + length
        else:  # groups (3, 4) are not used by proto3 messages; 6 and 7 are invalid
            raise ValueError(f"wire type {wire_type} at byte {pos}")
        if pos > end:
            raise ValueError(f"a field runs past the end of the message (byte {pos} of {end})")
    return bytes(out)
