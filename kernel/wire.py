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

    Other fields are skipped, and so is ``field`` sent with another wire type
    and anything inside a group: a parser keeps those as unknown fields, not
    as entries of ``field``, and a message serialized again writes them back
    (a caller's bytes can hold them: a decision request's were refused
    INTERNAL when this raised). ValueError for bytes that are not a
    well-formed message.
    """
    if not 1 <= field < 1 << 29 or not 1 <= new_field < 1 << 29:
        raise ValueError(f"field numbers must be 1..{(1 << 29) - 1}, got {field} and {new_field}")
    tag = encode_varint(new_field << 3 | _LENGTH_DELIMITED)
    out = bytearray()
    groups = []  # the field numbers of the groups being skipped, innermost last
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, start = _varint(data, pos)
            if number == field and not groups and start + length <= end:
                out += tag
                out += data[pos:start + length]  # the length as it was, then the contents
            pos = start + length
        elif wire_type == 3:  # a group (proto2's, or a caller's unknown field): skipped to its end
            groups.append(number)
        elif wire_type == 4:
            if not groups or groups.pop() != number:
                raise ValueError(f"the end of a group {number} that is not open, at byte {pos}")
        else:  # 6 and 7 are invalid
            raise ValueError(f"wire type {wire_type} at byte {pos}")
        if pos > end:
            raise ValueError(f"a field runs past the end of the message (byte {pos} of {end})")
    if groups:
        raise ValueError(f"group {groups[-1]} is not closed at the end of the message")
    return bytes(out)
