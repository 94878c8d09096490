"""Open Inference Protocol tensors ⇄ numpy arrays, with every check a caller can fail.

``raw_input_contents`` is the fast path: each buffer is viewed in place with
``numpy.frombuffer`` (no copy). Typed ``contents`` are accepted too. Every
error is ``INVALID_ARGUMENT`` and names the tensor.
"""

from __future__ import annotations

import math

import numpy as np

from ..accel import bytes_codec
from ..errors import InvalidArgument
from ..models.config import ModelConfig, TensorSpec


def _expected_shape(config: ModelConfig, spec: TensorSpec, shape: tuple[int, ...]) -> str | None:
    """None when ``shape`` fits the spec, else the reason."""
    want = config.full_shapes[spec.name]
    if len(shape) != len(want):
        return f"shape {list(shape)} has {len(shape)} dims, the model expects {len(want)} ({want})"
    for have, expect in zip(shape, want):
        if have < 0:
            return f"shape {list(shape)} has a negative dim"
        if expect != -1 and have != expect:
            return f"shape {list(shape)} does not match the model's {want}"
    return None


def _from_raw(spec: TensorSpec, name: str, shape: tuple[int, ...], buf: bytes, index: int) -> np.ndarray:
    count = math.prod(shape)
    dt = spec.datatype
    if dt.name == "BYTES":
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
    return np.frombuffer(buf, dtype=dt.numpy).reshape(shape)


def _from_contents(spec: TensorSpec, name: str, shape: tuple[int, ...], contents) -> np.ndarray:
    dt = spec.datatype
    if dt.contents_field is None:
        raise InvalidArgument(f"input '{name}': {dt.name} has no typed contents field; send it in raw_input_contents")
    values = getattr(contents, dt.contents_field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': contents.{dt.contents_field} has {len(values)} elements; shape {list(shape)} needs {count}"
        )
    if dt.name == "BYTES":
        try:
            decoded = [bytes(v).decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{name}': contents.bytes_contents holds an element that is not UTF-8") from None
        return np.array(decoded, dtype=object).reshape(shape)
    try:
        return np.asarray(values, dtype=dt.numpy).reshape(shape)
    except OverflowError:
        raise InvalidArgument(f"input '{name}': a value in contents.{dt.contents_field} is out of range for {dt.name}") from None


def decode_inputs(config: ModelConfig, request) -> tuple[dict[str, np.ndarray], int, tuple]:
    """The request's inputs as arrays, its row count, and its batching shape key."""
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
        shape = tensor.shape[:]  # a list: much cheaper than tuple() of the repeated field
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
        # A read-only view of the bytes, as numpy.frombuffer(...).reshape(...) makes, in one call.
        arrays[name] = np.ndarray(shape, entry[1], buf)
    if len(arrays) != len(plan):  # a name sent twice
        return None
    return arrays, (rows if batching else 1), config.fixed_shape_key


def _decode_checked(config: ModelConfig, request) -> tuple[dict[str, np.ndarray], int, tuple]:
    specs = config.inputs_by_name
    raw = request.raw_input_contents
    tensors = request.inputs
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
        shape = tuple(tensor.shape)
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
            arrays[name] = _from_raw(spec, name, shape, raw[index], index)
        else:
            arrays[name] = _from_contents(spec, name, shape, tensor.contents)
    if len(arrays) != len(specs):
        missing = [name for name in specs if name not in arrays]
        raise InvalidArgument(f"missing input '{missing[0]}' for model '{config.name}'")
    # Items batch together only when every input has the same per-row shape.
    shape_key = tuple(arrays[spec.name].shape[1:] for spec in config.inputs) if config.batching else ()
    return arrays, (rows if config.batching else 1), shape_key


def requested_outputs(config: ModelConfig, request) -> list[int] | None:
    """Indices of the outputs to return (None = all); unknown names are an error."""
    if not request.outputs:
        return None
    index = {spec.name: i for i, spec in enumerate(config.outputs)}
    chosen = []
    for out in request.outputs:
        if out.name not in index:
            raise InvalidArgument(f"requested output '{out.name}' is not an output of model '{config.name}'; it has {sorted(index)}")
        chosen.append(index[out.name])
    return chosen


def encode_outputs(config: ModelConfig, outputs: list[np.ndarray], chosen: list[int] | None, response) -> None:
    """Append output tensors to ``response`` as ``raw_output_contents`` (what Triton answers)."""
    for i in chosen if chosen is not None else range(len(outputs)):
        spec = config.outputs[i]
        array = outputs[i]
        tensor = response.outputs.add()
        tensor.name = spec.name
        tensor.datatype = spec.datatype.name
        tensor.shape.extend(array.shape)
        if spec.datatype.name == "BYTES":
            response.raw_output_contents.append(bytes_codec.encode(array.reshape(-1)))
        else:
            response.raw_output_contents.append(array.tobytes())
