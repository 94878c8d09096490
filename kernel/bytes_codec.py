"""BYTES tensors in ``raw_input_contents``: the pure-Python reference codec.

The Open Inference Protocol serialises each element of a BYTES tensor as a
4-byte little-endian length followed by that many bytes. onnxruntime's string
tensors hold ``str``, so elements are decoded as UTF-8 on the way in and
encoded on the way out. ``ext/bytes_codec.pyx`` is the compiled twin; both
pass ``tests/test_bytes_codec.py``. Import through ``kernel.accel``.
"""

from __future__ import annotations

import struct

_LEN = struct.Struct("<I")


def decode(buf: bytes, count: int) -> list[str]:
    """Split ``buf`` into exactly ``count`` UTF-8 strings; ValueError says what is wrong."""
    out = []
    view = memoryview(buf)
    pos, end = 0, len(buf)
    for index in range(count):
        if pos + 4 > end:
            raise ValueError(f"element {index}: buffer ends inside its 4-byte length prefix")
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise ValueError(f"element {index}: length {length} runs past the end of the buffer")
        try:
            out.append(str(view[pos:pos + length], "utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"element {index}: not valid UTF-8") from None
        pos += length
    if pos != end:
        raise ValueError(f"{end - pos} bytes left over after {count} elements")
    return out


def encode(items) -> bytes:
    """Length-prefix each element (``str`` encoded as UTF-8, ``bytes`` as is)."""
    parts = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
