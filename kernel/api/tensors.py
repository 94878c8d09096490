"""Open Inference Protocol tensors ⇄ numpy arrays, with every check a caller can fail.

``raw_input_contents`` is the fast path: each buffer is viewed in place with
``numpy.frombuffer`` (no copy). Typed ``contents`` are accepted too. Every
error is ``INVALID_ARGUMENT`` and names the tensor.

Outputs go back in ``raw_output_contents``; a requested output with Triton's
``classification`` parameter goes back as its top classes (``_top_classes``).
Shared memory (Triton's system/CUDA shared-memory extensions) is refused, not
ignored: the data would otherwise be read from, or written to, the wrong place.
"""

from __future__ import annotations

import math

import numpy as np

from ..accel import bytes_codec
from ..errors import InvalidArgument
from ..limits import MAX_BYTES_ELEMENTS, MAX_TYPED_CONTENTS_BYTES
from ..models.config import ModelConfig, TensorSpec
from ..models.datatypes import DataType

# The tensor parameters by which Triton's clients point at a shared-memory region.
_SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

BYTES_PREFIX = 4  # each BYTES element's little-endian length, before its bytes (kernel/bytes_codec.py)
_SHOWN_DIMS = 8  # of a shape with the wrong number of dims, in its refusal
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max  # numpy's bound on an array's dims times its item size (BYTES: 8, a pointer)


def _refuse_shared_memory(kind: str, name: str, parameters, instead: str) -> None:
    if parameters and any(key in parameters for key in _SHARED_MEMORY_KEYS):
        raise InvalidArgument(f"{kind} '{name}': shared memory is not supported by this server; {instead}")


def _rank_problem(config: ModelConfig, spec: TensorSpec, dims) -> str | None:
    """None when the shape field ``dims`` has as many dims as the spec, else the reason: checked before the dims
    are copied or shown, since a packed dim is one byte on the wire (2M dims of 1 in a 2 MiB request became a
    tuple, a list and a 6 MB refusal text: ~20x its bytes)."""
    want = config.full_shapes[spec.name]
    if len(dims) == len(want):
        return None
    shown = list(dims) if len(dims) <= _SHOWN_DIMS else f"[{', '.join(map(str, dims[:_SHOWN_DIMS]))}, ...]"
    return f"shape {shown} has {len(dims):,} dims, the model expects {len(want)} ({want})"


def _expected_shape(config: ModelConfig, spec: TensorSpec, shape: tuple[int, ...]) -> str | None:
    """None when ``shape`` (of the right rank: ``_rank_problem``) fits the spec, else the reason."""
    want = config.full_shapes[spec.name]
    for have, expect in zip(shape, want):
        if have < 0:
            return f"shape {list(shape)} has a negative dim"
        if expect != -1 and have != expect:
            return f"shape {list(shape)} does not match the model's {want}"
    # A shape with a 0 holds no elements, so every size check passes, but numpy sizes an array by its other dims
    # too: [1, 0, 2**63-1] failed there, an INTERNAL with a traceback for the caller's mistake.
    if 0 in shape and math.prod(d for d in shape if d) * spec.datatype.numpy.itemsize > _MAX_ARRAY_BYTES:
        return (f"shape {list(shape)} has dims past what a tensor can hold (the dims that are not 0 multiply to "
                "more than 2**63 bytes)")
    return None


def _from_raw(spec: TensorSpec, name: str, shape: tuple[int, ...], buf: bytes, index: int,
              costly: _CostlyElements) -> np.ndarray:
    count = math.prod(shape)
    dt = spec.datatype
    if dt.name == "BYTES":
        if count * BYTES_PREFIX > len(buf):  # (a shape past 2**63 overflowed the compiled decoder)
            raise InvalidArgument(
                f"input '{name}': raw_input_contents[{index}] holds {len(buf)} bytes; shape {list(shape)} of BYTES "
                f"needs at least {count * BYTES_PREFIX} (a {BYTES_PREFIX}-byte length "
                "prefix an element)")
        costly.add(name, dt, shape, typed=False)
        try:
            values = bytes_codec.decode(buf, count)
        except ValueError as exc:
            raise InvalidArgument(f"input '{name}': raw_input_contents[{index}] is not a valid BYTES tensor: {exc}") from None
        return np.array(values, dtype=object).reshape(shape)
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise InvalidArgument(
            f"input '{name}': raw_input_contents[{index}] holds {len(buf)} bytes; "
            f"shape {list(shape)} of {dt.name} needs {expected}"
        )
    if dt.name == "BOOL":
        _check_bool_bytes(name, index, buf)
    return np.frombuffer(buf, dtype=dt.numpy).reshape(shape)


def _check_bool_bytes(name: str, index: int, buf: bytes) -> None:
    """A BOOL is one byte, 0 or 1. Another byte reached the model as it was: ``Not`` of a 2 gave 3, which a
    client reads as true (a scheduling audit: Not(true) = true)."""
    values = np.frombuffer(buf, dtype=np.uint8)
    bad = np.flatnonzero(values > 1)
    if bad.size:
        raise InvalidArgument(f"input '{name}': raw_input_contents[{index}] byte {int(bad[0])} is {int(values[bad[0]])}; "
                              "a BOOL element is one byte, 0 (false) or 1 (true)")


def _a(datatype: str) -> str:
    """"an INT16", "an FP32", "a UINT8", "a BYTES": the article as the name is read out."""
    return f"{'an' if datatype[0] in 'AEFHILMNORSX' else 'a'} {datatype}"


def _from_contents(spec: TensorSpec, name: str, shape: tuple[int, ...], contents,
                   costly: _CostlyElements) -> np.ndarray:
    dt = spec.datatype
    if dt.contents_field is None:
        raise InvalidArgument(f"input '{name}': {dt.name} has no typed contents field; send it in raw_input_contents")
    values = getattr(contents, dt.contents_field)
    count = math.prod(shape)
    others = [f"{field.name} ({len(value)})" for field, value in contents.ListFields()
              if field.name != dt.contents_field]
    if others and len(values) == count:
        # (Values in two fields: which the caller meant cannot be told; the others were ignored without a word, a
        # fuzz campaign found, as raw and typed contents together are refused.)
        raise InvalidArgument(f"input '{name}': values of {_a(dt.name)} input go in contents.{dt.contents_field} only; "
                              f"contents.{', contents.'.join(others)} also set")
    if len(values) != count:
        sent = (f" (the values came in contents.{', contents.'.join(others)}: values of {_a(dt.name)} input go in "
                f"{dt.contents_field})" if others else "")
        raise InvalidArgument(f"input '{name}': contents.{dt.contents_field} has {len(values)} elements; shape "
                              f"{list(shape)} needs {count}{sent}")
    costly.add(name, dt, shape, typed=True)
    if dt.name == "BYTES":
        try:
            decoded = [bytes(v).decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}': contents.bytes_contents holds an element that is not UTF-8") from None
        return np.array(decoded, dtype=object).reshape(shape)
    return _narrowed(name, dt, values).reshape(shape)


def _narrowed(name: str, dt: DataType, values) -> np.ndarray:
    """Typed integer contents as ``dt``, refusing values it cannot hold: int_contents and uint_contents are
    32-bit fields for INT8..UINT16 too, and numpy's cast of a wider array wraps (300 -> 44) without a word."""
    wide = np.asarray(values)  # the field's own width (int32, uint32, ...), no per-value Python work
    if wide.dtype.kind in "iu" and wide.dtype != dt.numpy:
        info = np.iinfo(dt.numpy)
        bad = np.flatnonzero((wide < info.min) | (wide > info.max))
        if bad.size:
            at = int(bad[0])
            raise InvalidArgument(
                f"input '{name}': contents.{dt.contents_field}[{at}] = {wide[at]} is out of range for {dt.name}"
            )
    return wide.astype(dt.numpy, copy=False)


def decode_inputs(config: ModelConfig, request) -> tuple[dict[str, np.ndarray], int, tuple, int]:
    """The request's inputs as arrays, its row count, its batching shape key, and what the arrays hold decoded when
    they are not views of the request's bytes (``held_bytes`` plus typed contents' parsed arrays; 0 on the raw fast
    path, whose views hold nothing past the request): the front ends charge it against the payload budget."""
    plan = config.raw_inputs
    if plan is not None:
        decoded = _decode_raw_fixed(config, plan, request)
        if decoded is not None:
            return decoded
    return _decode_checked(config, request)



def _decode_raw_fixed(config: ModelConfig, plan: dict, request):
    """The common case, cheaply: every input raw, fixed per-row dims, nothing wrong.

    Returns None whenever anything is unusual or wrong; ``_decode_checked``
    then decodes again and words the error. So this only has to accept a
    subset of what the checked path accepts, and decode it the same way.
    (Each protobuf field access builds a wrapper here, hence the locals.)
    """
    raw = request.raw_input_contents
    tensors = request.inputs
    if len(raw) != len(plan) or len(tensors) != len(plan):
        return None
    arrays = {}
    batching = config.max_batch_size > 0
    rows = -1
    for index in range(len(plan)):  # indexing: iterating the repeated fields costs several times more
        tensor = tensors[index]
        name = tensor.name
        entry = plan.get(name)
        if entry is None or tensor.datatype != entry[0]:
            return None
        # Typed contents beside raw ones, or tensor parameters (shared memory): the checked path refuses those.
        if tensor.HasField("contents") or tensor.parameters:
            return None
        dims = tensor.shape
        if len(dims) != len(entry[2]) + batching:  # (before the copy: a shape of millions of dims is 1 byte each)
            return None
        shape = dims[:]  # a list: much cheaper than tuple() of the repeated field
        if batching:
            if not shape or shape[1:] != entry[2]:
                return None
            count = shape[0]
            if count <= 0 or count > config.max_batch_size or (rows != -1 and count != rows):
                return None
            rows = count
        else:
            if shape != entry[2]:
                return None
            count = 1
        buf = raw[index]
        if len(buf) != count * entry[3]:
            return None
        if entry[0] == "BOOL" and buf.translate(None, b"\x00\x01"):  # a byte other than 0 or 1: the checked path says so
            return None
        # A read-only view of the bytes, as numpy.frombuffer(...).reshape(...) makes, in one call.
        arrays[name] = np.ndarray(shape, entry[1], buf)
    if len(arrays) != len(plan):  # a name sent twice
        return None
    return arrays, (rows if batching else 1), config.fixed_shape_key, 0


def _decode_checked(config: ModelConfig, request) -> tuple[dict[str, np.ndarray], int, tuple, int]:
    specs = config.inputs_by_name
    raw = request.raw_input_contents
    tensors = request.inputs
    costly = _CostlyElements()
    for tensor in tensors:  # first: a shared-memory input has no raw entry, and the count below would blame that
        parameters = tensor.parameters
        if parameters:
            _refuse_shared_memory("input", tensor.name, parameters, "send the data in raw_input_contents")
            costly.parsed += len(parameters) * PARAMETER_HELD
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; send all inputs raw or none"
        )
    arrays: dict[str, np.ndarray] = {}
    rows = -1
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected input '{name}' for model '{config.name}'; it takes {sorted(specs)}"
            )
        if name in arrays:
            raise InvalidArgument(f"input '{name}' is sent twice")
        if tensor.datatype != spec.datatype.name:
            raise InvalidArgument(
                f"input '{name}': datatype {tensor.datatype or '(empty)'}, the model expects {spec.datatype.name}"
            )
        dims = tensor.shape
        problem = _rank_problem(config, spec, dims)
        if problem:
            raise InvalidArgument(f"input '{name}': {problem}")
        shape = tuple(dims)
        problem = _expected_shape(config, spec, shape)
        if problem:
            raise InvalidArgument(f"input '{name}': {problem}")
        if config.batching:
            if shape[0] > config.max_batch_size:
                raise InvalidArgument(
                    f"input '{name}': batch of {shape[0]} rows is over the model's max_batch_size {config.max_batch_size}"
                )
            if shape[0] == 0:
                raise InvalidArgument(f"input '{name}': batch dim is 0; send at least one row")
            if rows not in (-1, shape[0]):
                raise InvalidArgument(f"input '{name}': {shape[0]} rows, other inputs have {rows}")
            rows = shape[0]
        if raw:
            if tensor.HasField("contents"):  # Triton refuses this too; we would drop the typed values
                raise InvalidArgument(
                    f"input '{name}': both contents and raw_input_contents are set; send its values in one of them"
                )
            arrays[name] = _from_raw(spec, name, shape, raw[index], index, costly)
        else:
            arrays[name] = _from_contents(spec, name, shape, tensor.contents, costly)
    if len(arrays) != len(specs):
        missing = [name for name in specs if name not in arrays]
        raise InvalidArgument(f"missing input '{missing[0]}' for model '{config.name}'")
    # Items batch together only when every input has the same per-row shape.
    shape_key = tuple(arrays[spec.name].shape[1:] for spec in config.inputs) if config.batching else ()
    return arrays, (rows if config.batching else 1), shape_key, held_bytes(arrays) + costly.parsed


# What one decoded BYTES element holds while its request waits to be answered and sent, however short it is: a str,
# its slot in the input array, and as much again for the output and its encoded answer (~240 bytes an element,
# measured through an identity model; onnxruntime's own copies come on top while it runs).
BYTES_ELEMENT_HELD = 240


# What one parameter (of a request, an input or an output) holds in the parsed request while it is served: a map
# entry in upb, ~157 bytes for a short key (4,096 of them, 52 KB on the wire, held ~640 KB), so many tiny ones in a
# small request are counted (WorkItem.decoded_bytes) as its decoded strings are.
PARAMETER_HELD = 150


def held_bytes(inputs: dict[str, np.ndarray]) -> int:
    """What a request's decoded inputs are estimated to hold until it is answered: their arrays (raw ones are
    views of the request's bytes) and, for BYTES, each element's objects."""
    total = 0
    for array in inputs.values():
        total += array.nbytes
        if array.dtype.kind == "O":
            total += array.size * BYTES_ELEMENT_HELD
    return total


class _CostlyElements:
    """The request's elements that cost far more decoded than on the wire, summed over its inputs and refused
    past their bounds (kernel/limits.py says why each is where it is) before the input that passes one is decoded
    (after the checks of its shape against its buffer or contents, which word a mistake more exactly)."""

    __slots__ = ("strings", "typed_bytes", "parsed")

    def __init__(self) -> None:
        self.strings = 0
        self.typed_bytes = 0
        # What typed contents hold in the parsed request, held with it beside their decoded copies: upb keeps each
        # value at its field's width, 4 or 8 bytes for a 1-byte varint (an INT8 in int_contents, a small INT64).
        self.parsed = 0

    def add(self, name: str, dt: DataType, shape: tuple[int, ...], typed: bool) -> None:
        count = math.prod(shape)
        if typed:
            self.parsed += count * _PARSED_WIDTH[dt.contents_field]
        if dt.name == "BYTES":
            self.strings += count
            if self.strings > MAX_BYTES_ELEMENTS:
                raise InvalidArgument(too_many_strings(name, f"shape {list(shape)}", self.strings))
        elif typed:
            self.typed_bytes += count * dt.itemsize
            if self.typed_bytes > MAX_TYPED_CONTENTS_BYTES:
                raise InvalidArgument(too_many_typed(name, f"shape {list(shape)} of {dt.name}", self.typed_bytes))


# An element's size in upb's array of each typed contents field (a bytes_contents element: its view, a pointer and a
# length; its bytes are the request's).
_PARSED_WIDTH = {"bool_contents": 1, "int_contents": 4, "int64_contents": 8, "uint_contents": 4,
                 "uint64_contents": 8, "fp32_contents": 4, "fp64_contents": 8, "bytes_contents": 16}


# The refusals' words, shared with the check of a large request's bytes before they are parsed (wire_limits.py).
def too_many_strings(name: str, what: str, strings: int) -> str:
    return (f"input '{name}': {what} makes {strings:,} BYTES elements in this request; at most "
            f"{MAX_BYTES_ELEMENTS:,} are taken (each costs the kernel ~240 bytes of memory however short it is): "
            "send them in several requests")


def too_many_typed(name: str, what: str, typed_bytes: int) -> str:
    return (f"input '{name}': {what} makes typed contents of {typed_bytes:,} bytes decoded in this request; at "
            f"most {MAX_TYPED_CONTENTS_BYTES:,} are taken: send larger tensors in raw_input_contents, or in several "
            "requests")


def requested_outputs(config: ModelConfig, request) -> tuple[list[tuple[int, int]] | None, int]:
    """``(output index, classes)`` for each requested output, in request order (None = all outputs, as they
    are); ``classes`` is the checked ``classification`` parameter, 0 when there is none. And what the outputs'
    parameters hold parsed (``PARAMETER_HELD`` each)."""
    if not request.outputs:
        return None, 0
    held = 0
    index = {spec.name: i for i, spec in enumerate(config.outputs)}
    chosen: list[tuple[int, int]] = []
    seen = set()
    for out in request.outputs:
        name = out.name
        if name not in index:
            raise InvalidArgument(f"requested output '{name}' is not an output of model '{config.name}'; it has {sorted(index)}")
        if name in seen:
            raise InvalidArgument(f"output '{name}' is requested twice")
        seen.add(name)
        parameters = out.parameters
        classes = 0
        if parameters:
            _refuse_shared_memory("output", name, parameters, "results come back in raw_output_contents")
            held += len(parameters) * PARAMETER_HELD
            if "classification" in parameters:
                classes = _class_count(config, config.outputs[index[name]], parameters["classification"])
        chosen.append((index[name], classes))
    return chosen, held


def _class_count(config: ModelConfig, spec: TensorSpec, value) -> int:
    """The ``classification`` parameter of a requested output (Triton's classification extension), checked."""
    kind = value.WhichOneof("parameter_choice")
    count = getattr(value, kind) if kind else None
    if kind not in ("int64_param", "uint64_param") or count < 1:
        shown = "nothing" if kind is None else f"{kind} {count!r}"
        raise InvalidArgument(
            f"output '{spec.name}': parameter 'classification' must be an integer >= 1 "
            f"(how many top classes to return), got {shown}"
        )
    if len(spec.dims) != 1:
        raise InvalidArgument(
            f"output '{spec.name}': parameter 'classification' needs one score per class, a 1-D "
            f"{'row' if config.batching else 'tensor'}; this output is {config.full_shapes[spec.name]}"
        )
    if spec.datatype.name in ("BYTES", "BOOL"):
        raise InvalidArgument(
            f"output '{spec.name}': parameter 'classification' needs numeric scores; this output is {spec.datatype.name}"
        )
    return count


def encode_outputs(config: ModelConfig, outputs: list[np.ndarray], chosen: list[tuple[int, int]] | None,
                   response) -> None:
    """Append output tensors to ``response`` as ``raw_output_contents`` (what Triton answers)."""
    if chosen is None:
        for spec, array in zip(config.outputs, outputs):
            _append(response, spec.name, spec.datatype.name, array)
        return
    for i, classes in chosen:
        spec = config.outputs[i]
        if classes:
            _append(response, spec.name, "BYTES", _top_classes(outputs[i], classes, spec.labels))
        else:
            _append(response, spec.name, spec.datatype.name, outputs[i])


def _append(response, name: str, datatype: str, array: np.ndarray) -> None:
    tensor = response.outputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    if datatype == "BYTES":
        response.raw_output_contents.append(bytes_codec.encode(array.reshape(-1)))
    else:
        response.raw_output_contents.append(array.tobytes())


def _top_classes(array: np.ndarray, count: int, labels: tuple[str, ...]) -> np.ndarray:
    """Triton's classification result: the ``count`` highest scores of each row (the last dim), highest first,
    ties in index order, as "value:index" or "value:index:label"; ``count`` is clipped to the classes there are.

    Values are worded as Triton's C++ ``std::to_string`` words them: floats with 6 decimals, integers plain.
    """
    classes = array.shape[-1]
    count = min(count, classes)
    rows = array.reshape(math.prod(array.shape[:-1]), classes)  # (not -1: an output may have no classes)
    # A stable ascending sort of each row reversed, read backwards: descending, and equal scores keep
    # index order (negating the scores instead would break unsigned and minimum integers).
    order = classes - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :count]
    values = np.take_along_axis(rows, order, axis=1).tolist()
    word = "{:f}".format if array.dtype.kind == "f" else str
    texts = [
        _class_text(word(value), index, labels)
        for row_values, row_order in zip(values, order.tolist())
        for value, index in zip(row_values, row_order)
    ]
    return np.array(texts, dtype=object).reshape(array.shape[:-1] + (count,))


def _class_text(value: str, index: int, labels: tuple[str, ...]) -> str:
    label = labels[index] if index < len(labels) else ""
    return f"{value}:{index}:{label}" if label else f"{value}:{index}"
