"""What a ModelInferRequest's bytes would make protobuf hold, counted on the wire (pure-Python reference).

upb makes a 16-byte view of each ``contents.bytes_contents`` entry (2 bytes
on the wire when empty), 8 bytes of each 1-byte varint of a packed
``int64_contents`` or ``shape``, and grows each array by doubling: a 60 MiB
request of either took a kernel ~1.1 GB while it parsed, before the checks of
kernel/api/tensors.py could refuse it. So a large request's bytes are walked
first (kernel/api/wire_limits.py): one linear pass over tags and lengths that
skips every payload and counts the varints of a packed field by their last
bytes (those without the continuation bit), each input tensor's counts checked
against the limits as it ends. ``ext/infer_scan.pyx`` is the compiled twin;
both pass ``tests/test_infer_scan.py``. Import through ``kernel.accel``.
"""

from __future__ import annotations

# ModelInferRequest.inputs (6, 7: outputs, raw_input_contents); in an InferInputTensor: name, datatype, shape,
# contents; InferTensorContents' fields 1..8 are bool, int, int64, uint, uint64, fp32, fp64 and bytes contents
# (proto/inference/grpc_service.proto).
_INPUTS, _RAW, _NAME, _DATATYPE, _SHAPE, _CONTENTS, _BYTES = 5, 7, 1, 2, 3, 5, 8
# ``parameters``: the request's field 4, an InferInputTensor's field 4, an InferRequestedOutputTensor's field 2.
_PARAMETERS, _OUTPUT_PARAMETERS = 4, 2
# Each typed field's element as upb holds it, in bytes (index: field number), and its wire type when not packed.
WIDTH = (0, 1, 4, 8, 4, 8, 4, 8)
_UNPACKED = (-1, 0, 0, 0, 0, 0, 5, 1)
# Datatypes whose contents field is wider than their element (int_contents, uint_contents): the kernel's own
# limit counts their decoded elements (kernel/api/tensors.py), so this count does too.
_NARROW = {b"INT8": 1, b"UINT8": 1, b"INT16": 2, b"UINT16": 2}
_HIGH = bytes(range(0x80, 0x100))  # a varint's bytes that are not its last
_CHUNK = 1 << 20  # a packed run is counted this much at a time: a copy of a slice, not of the whole run


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it); position -1 when it runs past ``end`` or past 10 bytes."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    return 0, -1


def _skip(data: bytes, pos: int, end: int, wire_type: int, number: int) -> int:
    """The position after a field's value (``pos`` is after its tag); -1 for bytes that are not well formed.
    A group (unknown fields kept as bytes, not materialized) is skipped to its end."""
    if wire_type == 0:
        return _varint(data, pos, end)[1]
    if wire_type == 1:
        return pos + 8 if pos + 8 <= end else -1
    if wire_type == 5:
        return pos + 4 if pos + 4 <= end else -1
    if wire_type == 2:
        length, pos = _varint(data, pos, end)
        return pos + length if pos != -1 and length <= end - pos else -1
    if wire_type == 3:  # (a list of the open groups, not recursion: they may nest a million deep)
        groups = [number]
        while pos < end:
            key, pos = _varint(data, pos, end)
            if pos == -1:
                return -1
            if key & 7 == 4:
                if key >> 3 != groups.pop():
                    return -1
                if not groups:
                    return pos
            elif key & 7 == 3:
                groups.append(key >> 3)
            else:
                pos = _skip(data, pos, end, key & 7, key >> 3)
                if pos == -1:
                    return -1
    return -1  # an end of group with none open, wire types 6 and 7, or a group that never ends


def _varints(data: bytes, pos: int, end: int) -> int:
    """How many varints the packed bytes data[pos:end] hold: the bytes without the continuation bit."""
    count = 0
    for start in range(pos, end, _CHUNK):
        chunk = data[start:min(start + _CHUNK, end)]
        count += len(chunk.translate(None, _HIGH))
    return count


def _contents(data: bytes, pos: int, end: int, counts: list) -> bool:
    """Add the elements of the InferTensorContents in data[pos:end] to ``counts`` (by field number); False
    when its bytes are not well formed (counted up to there)."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        if pos == -1:
            return False
        number, wire_type = key >> 3, key & 7
        if number == _BYTES and wire_type == 2:
            counts[_BYTES] += 1
        elif 1 <= number <= 7 and wire_type == 2:  # packed
            length, start = _varint(data, pos, end)
            if start == -1 or length > end - start:
                return False
            stop = start + length
            width = WIDTH[number]
            counts[number] += (length // width if number >= 6 else _varints(data, start, stop))
        elif 1 <= number <= 7 and wire_type == _UNPACKED[number]:
            counts[number] += 1
        pos = _skip(data, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            return False
    return True


def _tensor(data: bytes, pos: int, end: int, max_dims: int):
    """The InferInputTensor in data[pos:end]: (name, datatype, the first ``max_dims`` + 1 dims, dims, element counts
    by contents field, well formed)."""
    name = datatype = b""
    dims: list[int] = []
    ndims = 0
    counts = [0] * 9
    while pos < end:
        key, pos = _varint(data, pos, end)
        if pos == -1:
            break
        number, wire_type = key >> 3, key & 7
        if wire_type == 2 and number in (_NAME, _DATATYPE, _SHAPE, _CONTENTS):
            length, start = _varint(data, pos, end)
            if start == -1 or length > end - start:
                break
            stop = start + length
            if number == _NAME:
                name = data[start:stop]
            elif number == _DATATYPE:
                datatype = data[start:stop]
            elif number == _SHAPE:
                at = start
                while at < stop and len(dims) <= max_dims:  # the few dims a message can show
                    dim, at = _varint(data, at, stop)
                    if at == -1:
                        break
                    dims.append(dim - (1 << 64) if dim >> 63 else dim)
                    ndims += 1
                if at != -1 and at < stop:
                    ndims += _varints(data, at, stop)
            elif not _contents(data, start, stop, counts):
                break
            pos = stop
            continue
        if number == _SHAPE and wire_type == 0:
            dim, after = _varint(data, pos, end)
            if after != -1:
                if len(dims) <= max_dims:
                    dims.append(dim - (1 << 64) if dim >> 63 else dim)
                ndims += 1
        pos = _skip(data, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            break
    else:
        return name, datatype, dims, ndims, counts, True
    return name, datatype, dims, ndims, counts, False


def scan(data: bytes, max_strings: int, max_typed: int, max_dims: int):
    """None when every input of the ModelInferRequest in ``data`` is within the limits (or its bytes stop being
    a message before one is over: the parser says what is wrong), else the first input past one, as
    ``(index, name, datatype, dims, ndims, counts, strings, typed)``: ``dims`` its first ``max_dims`` + 1 dims,
    ``counts`` its element counts by InferTensorContents field number, ``strings`` and ``typed`` the request's
    BYTES elements and typed bytes (as decoded) up to and with it."""
    strings = typed = index = 0
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos, end)
        if pos == -1:
            return None
        number, wire_type = key >> 3, key & 7
        if number == _INPUTS and wire_type == 2:
            length, start = _varint(data, pos, end)
            if start == -1 or length > end - start:
                return None
            pos = start + length
            name, datatype, dims, ndims, counts, whole = _tensor(data, start, pos, max_dims)
            strings += counts[_BYTES]
            narrow = _NARROW.get(datatype)
            for field in range(1, 8):
                width = narrow if narrow is not None and field in (2, 4) else WIDTH[field]
                typed += counts[field] * width
            if strings > max_strings or typed > max_typed or ndims > max_dims:
                return index, name, datatype, dims, ndims, counts, strings, typed
            if not whole:
                return None
            index += 1
            continue
        pos = _skip(data, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            return None
    return None


def _count_field(data: bytes, pos: int, end: int, wanted: int) -> int:
    """How many length-delimited fields ``wanted`` the message in data[pos:end] has (up to where its bytes stop
    being a message)."""
    count = 0
    while pos < end:
        key, pos = _varint(data, pos, end)
        if pos == -1:
            break
        number, wire_type = key >> 3, key & 7
        if wire_type == 2 and number == wanted:
            count += 1
        pos = _skip(data, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            break
    return count


def entries(data: bytes) -> tuple[int, int, int, int]:
    """How many ``inputs``, ``outputs`` and ``raw_input_contents`` entries the ModelInferRequest in ``data`` has
    (up to where its bytes stop being a message): each a message or a view in upb however empty, ~88, ~48 and
    16 bytes for 2 on the wire; and how many ``parameters`` entries the request, its inputs and its outputs send
    together (each a map entry in upb, ~150 bytes for a short key; a repeated key is counted each time sent)."""
    end = len(data)
    inputs, outputs, raw = (_count_field(data, 0, end, number) for number in (_INPUTS, _INPUTS + 1, _RAW))
    # (the request's own, then each input's field 4 and each requested output's field 2)
    parameters = (_count_field(data, 0, end, _PARAMETERS) + field_count(data, _PARAMETERS, _INPUTS)
                  + field_count(data, _OUTPUT_PARAMETERS, _INPUTS + 1))
    return inputs, outputs, raw, parameters


def field_count(data: bytes, wanted: int, within: int = 0) -> int:
    """How many length-delimited fields ``wanted`` (a map's entries, a repeated message's) the message in ``data``
    sends; ``within``: those inside its field ``within`` instead (each occurrence of it), as a StartTaskRequest
    holds its DecisionRequest. Up to where the bytes stop being a message."""
    if not within:
        return _count_field(data, 0, len(data), wanted)
    count = 0
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos, end)
        if pos == -1:
            break
        number, wire_type = key >> 3, key & 7
        if wire_type == 2 and number == within:
            length, start = _varint(data, pos, end)
            if start == -1 or length > end - start:
                break
            count += _count_field(data, start, start + length, wanted)
        pos = _skip(data, pos, end, wire_type, number)
        if pos == -1 or pos > end:
            break
    return count
