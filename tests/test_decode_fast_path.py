"""The fast path of request decoding agrees with the checked path on every request.

``tensors._decode_raw_fixed`` may only accept what ``_decode_checked`` accepts,
and must then return the same arrays, row count and shape key; on anything
else it returns None (the checked path then words the error).
"""

import numpy as np
from hypothesis import given, settings, strategies as st

from fuzz_budget import examples

from kernel._proto.inference import grpc_service_pb2 as pb
from kernel.api import tensors
from kernel.errors import InvalidArgument
from kernel.models import datatypes
from kernel.models.config import ModelConfig, TensorSpec

FP32, INT64 = datatypes.BY_NAME["FP32"], datatypes.BY_NAME["INT64"]


def _configs():
    two = (TensorSpec("a", FP32, (3,)), TensorSpec("b", INT64, (2, 2)))
    out = (TensorSpec("y", FP32, (1,)),)
    return [
        ModelConfig("m", "1", two, out, max_batch_size=4),
        ModelConfig("m", "1", two[:1], out, max_batch_size=4),
        ModelConfig("m", "1", (TensorSpec("a", FP32, (2,)),), out, max_batch_size=0),
    ]


CONFIGS = _configs()


MISTAKES = ["none", "name", "datatype", "rows", "dim", "bytes", "raw_missing", "twice", "extra", "missing",
            "contents", "shared_memory"]
SHARED_MEMORY_KEYS = ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]


@st.composite
def requests(draw):
    """A valid request for a random config, with at most one mistake in it."""
    config = draw(st.sampled_from(CONFIGS))
    mistake = draw(st.sampled_from(MISTAKES))
    specs = list(config.inputs)
    if mistake == "twice":
        specs.append(specs[0])
    if mistake == "missing" and len(specs) > 1:
        specs.pop()
    rows = draw(st.integers(1, config.max_batch_size)) if config.batching else 1
    victim = draw(st.integers(0, len(specs) - 1))
    request = pb.ModelInferRequest(model_name="m")
    for index, spec in enumerate(specs):
        hit = index == victim
        name = "c" if hit and mistake == "name" else spec.name
        datatype = "FP64" if hit and mistake == "datatype" else spec.datatype.name
        shape = ([rows] if config.batching else []) + list(spec.dims)
        if hit and mistake == "rows":
            shape[0] = draw(st.sampled_from([-1, 0, rows + 1, config.max_batch_size + 1]))
        if hit and mistake == "dim":
            at = draw(st.integers(0, len(shape) - 1))
            shape[at] += draw(st.sampled_from([-1, 1]))
        if hit and mistake == "extra":
            shape.append(1)
        count = max(0, int(np.prod(shape))) if shape else 1
        nbytes = count * spec.datatype.itemsize
        if hit and mistake == "bytes":
            nbytes += draw(st.sampled_from([-1, 1, 4, -4]))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(bytes(i % 251 for i in range(max(nbytes, 0))))
        if hit and mistake == "contents":  # typed values beside the raw ones, even none at all
            tensor.contents.SetInParent()
            tensor.contents.fp32_contents.extend([1.0] * draw(st.integers(0, 2)))
        if hit and mistake == "shared_memory":
            tensor.parameters[draw(st.sampled_from(SHARED_MEMORY_KEYS))].int64_param = draw(st.integers(0, 64))
    if mistake == "raw_missing":
        del request.raw_input_contents[-1]
    return config, pb.ModelInferRequest.FromString(request.SerializeToString())


@settings(max_examples=examples(600), deadline=None)
@given(requests())
def test_fast_path_agrees_with_checked_path(case):
    config, request = case
    fast = tensors._decode_raw_fixed(config, config.raw_inputs, request)
    try:
        checked = tensors._decode_checked(config, request)
    except InvalidArgument:
        assert fast is None
        return
    # Every config here has fixed per-row dims and raw inputs: a valid request must stay on the fast path.
    assert fast is not None
    arrays, rows, key, held = fast
    want_arrays, want_rows, want_key, _ = checked
    assert rows == want_rows and key == want_key and held == 0  # (views of the request's bytes: nothing to charge)
    assert arrays.keys() == want_arrays.keys()
    for name, array in arrays.items():
        want = want_arrays[name]
        assert array.dtype == want.dtype and array.shape == want.shape
        assert array.tobytes() == want.tobytes()
        assert not array.flags.writeable


def test_fast_path_takes_the_common_request():
    config = CONFIGS[1]
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(np.arange(6, dtype=np.float32).tobytes())
    arrays, rows, key, held = tensors._decode_raw_fixed(config, config.raw_inputs, request)
    assert rows == 2 and key == ((3,),) and held == 0
    assert arrays["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
