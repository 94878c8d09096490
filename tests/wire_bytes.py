"""Protobuf wire bytes written by hand, for tests that must send (or scan) encodings a message class would not
write: fields in any order, packed or not, repeated keys, millions of entries without building the messages."""

from __future__ import annotations

from kernel.wire import encode_varint


def varint(value: int) -> bytes:
    """``value`` as a varint; a negative int32 or int64 as its 64-bit two's complement, as protobuf sends it."""
    return encode_varint(value & ((1 << 64) - 1))


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes, a message, a packed run) ``number`` holding ``payload``."""
    return key(number, 2) + varint(len(payload)) + payload
