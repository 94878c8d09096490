"""Build small ONNX models deterministically with ``onnx.helper``.

The repository ships no model binaries: tests, benchmarks and the demo build
the models they need with these functions, in milliseconds, from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# onnxruntime releases support IR versions with a lag; 8 is accepted by every
# onnxruntime >= 1.14, which keeps the built files loadable on older installs.
IR_VERSION = 8


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def dense_layers(
    layer_widths: Sequence[int], seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (He-initialised) weights for an MLP with the given widths, input first."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(layer_widths[:-1], layer_widths[1:]):
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)).astype(np.float32)
        bias = rng.normal(0.0, 0.01, size=(fan_out,)).astype(np.float32)
        layers.append((weight, bias))
    return layers


def mlp_from_weights(
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    input_name: str = "INPUT0",
    output_name: str = "OUTPUT0",
    softmax: bool = True,
    graph_name: str = "mlp",
) -> onnx.ModelProto:
    """An MLP (Gemm + Relu between layers, optional Softmax at the end) with a dynamic batch dim."""
    in_dim = layers[0][0].shape[0]
    out_dim = layers[-1][0].shape[1]
    nodes, inits = [], []
    current = input_name
    for index, (weight, bias) in enumerate(layers):
        w_name, b_name, y_name = f"W{index}", f"B{index}", f"gemm{index}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), w_name))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), b_name))
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [y_name]))
        current = y_name
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{index}"]))
            current = f"relu{index}"
    if softmax:
        nodes.append(helper.make_node("Softmax", [current], [output_name], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", [current], [output_name]))
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])],
        initializer=inits,
    )
    return _finish(graph)


def mlp(
    layer_widths: Sequence[int],
    seed: int = 0,
    input_name: str = "INPUT0",
    output_name: str = "OUTPUT0",
    softmax: bool = True,
) -> onnx.ModelProto:
    """A random MLP, e.g. ``mlp([16, 64, 4])`` (the tiny model of PEERS.md)."""
    return mlp_from_weights(dense_layers(layer_widths, seed), input_name, output_name, softmax)


def save(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` (parents created)."""
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE, "BYTES": TensorProto.STRING,
}


def identity(tensors: Sequence[tuple[str, str, int | tuple]], batched: bool = True) -> onnx.ModelProto:
    """One Identity per ``(name, oip_datatype, width)``: input ``name`` [batch, width] → output ``name_out``.

    Exercises every datatype end to end without numeric noise (its outputs are exactly what was sent).
    ``batched=False``: [width] with no batch dim, a model whose config derives ``max_batch_size = 0``.
    ``width`` may be a tuple of per-row dims instead, ``None`` for a dynamic one: ``(None, None)``.
    """
    dims = ["batch"] if batched else []
    nodes, inputs, outputs = [], [], []
    for name, datatype, width in tensors:
        kind = _ONNX_TYPES[datatype]
        row = list(width) if isinstance(width, tuple) else [width]
        inputs.append(helper.make_tensor_value_info(name, kind, [*dims, *row]))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", kind, [*dims, *row]))
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
    return _finish(helper.make_graph(nodes, "identity", inputs, outputs))


def reshape() -> onnx.ModelProto:
    """``Reshape(data, shape)`` with no batch dim: a shape that does not fit makes onnxruntime raise at run time.

    The deliberate fault model: its failures come from the runtime, not from
    request validation, so tests can check that a model fault is INTERNAL and
    that the kernel keeps serving.
    """
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["data", "shape"], ["reshaped"])],
        "reshape",
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("reshaped", TensorProto.FLOAT, [None, None])],
    )
    return _finish(graph)


def lookup(table_rows: int = 4) -> onnx.ModelProto:
    """``Gather(table, Cast<int64>(x))``: FP32 ``x`` [batch, 1] picks rows of a fixed table.

    The deliberate poison model: an index outside the table (say 100, or a
    NaN, which casts to INT64_MIN) makes onnxruntime raise for the whole
    batch, as a NaN-producing input makes a real model fail.
    """
    table = numpy_helper.from_array(np.arange(table_rows * 2, dtype=np.float32).reshape(table_rows, 2), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["index"], to=TensorProto.INT64),
            helper.make_node("Squeeze", ["index", "axes"], ["flat"]),
            helper.make_node("Gather", ["table", "flat"], ["y"], axis=0),
        ],
        "lookup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[table, numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return _finish(graph)


def first_row(width: int = 2) -> onnx.ModelProto:
    """FP32 ``x`` [batch, width] → ``y``: the batch's first row only, [1, width], whatever the batch.

    The deliberate fault model for batching: it answers one row for a batch of many, as a model with a
    batch-wide step (or a bug) does; alone, a request gets its own row back. The row count comes from the
    input's shape at run time (``n / n``), so the graph declares a batch dim and the loader accepts it.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one_const"], ["n"]),
            helper.make_node("Div", ["n", "n"], ["one"]),
            helper.make_node("Slice", ["x", "zero", "one", "zero"], ["y"]),
        ],
        "first_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "zero"),
                     numpy_helper.from_array(np.array([1], np.int64), "one_const")],
    )
    return _finish(graph)


def batch_centered(width: int = 2) -> onnx.ModelProto:
    """FP32 ``x`` [batch, width] → ``y = x - mean(x over the batch)``: each row's answer depends on the other rows.

    The deliberate fault model for batching that shapes cannot catch: its outputs keep the batch dim, so they
    slice back one row a request, but two requests batched together change each other's answers (as a graph
    with BatchNormalization in training mode, or a mean over the batch, does). Alone, every row gives zeros.
    """
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
         helper.make_node("Sub", ["x", "mean"], ["y"])],
        "batch_centered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
    )
    return _finish(graph)


def _count_one_at_a_time() -> onnx.GraphProto:
    """A ``Loop`` body adding 1 to its float total each iteration: the work of ``slow`` and ``counted``."""
    return helper.make_graph(
        [helper.make_node("Add", ["total_in", "one"], ["total_out"]), helper.make_node("Identity", ["go_in"], ["go_out"])],
        "count",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total_out", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1, np.float32), "one")],
    )


def slow(iterations: int) -> onnx.ModelProto:
    """FP32 ``x`` [batch, 1] → ``y = x + iterations``, counted up one at a time by a ``Loop``: a model whose every
    call takes long whatever its batch (about 7 µs an iteration on a CPU core here), as a large model's does."""
    body = _count_one_at_a_time()
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "zero"], ["total"], body=body), helper.make_node("Add", ["x", "total"], ["y"])],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
                     numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    return _finish(graph)


def counted(base: int) -> onnx.ModelProto:
    """FP32 ``x`` [batch, 1] and INT64 ``n`` [batch, 1] → ``y = x``, after a ``Loop`` of ``base`` + the batch's
    largest ``n`` iterations (about 7 µs each on a CPU core here): a model whose run takes as long as a request
    asks (the load's zeros run ``base`` iterations), its rows independent of each other. The loop's count is
    folded into ``y`` times zero, so that the graph's optimizer cannot drop it."""
    body = _count_one_at_a_time()
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["n"], ["most"], keepdims=0),
         helper.make_node("Add", ["most", "base"], ["trips"]),
         helper.make_node("Loop", ["trips", "", "zero"], ["total"], body=body),
         helper.make_node("Mul", ["total", "zero"], ["nothing"]),
         helper.make_node("Add", ["x", "nothing"], ["y"])],
        "counted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.array(base, np.int64), "base"),
                     numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    return _finish(graph)


def mlp_toml(in_dim: int, out_dim: int, extra: str = "", **settings) -> str:
    """``model.toml`` text for an :func:`mlp` (INPUT0 → OUTPUT0); ``settings`` become top-level keys
    (``max_batch_size=8``), ``extra`` is appended TOML (labels, a ``[card]`` table)."""
    top = "".join(f"{key} = {value!r}\n" for key, value in settings.items())
    return (
        f'{top}[[input]]\nname = "INPUT0"\ndatatype = "FP32"\ndims = [{in_dim}]\n'
        f'[[output]]\nname = "OUTPUT0"\ndatatype = "FP32"\ndims = [{out_dim}]\n{extra}'
    )


def save_mlp_version(root, name: str, widths: Sequence[int], seed: int = 0, version: str = "1", **settings) -> None:
    """Write ``root/name/version/model.onnx`` (an :func:`mlp`) and, with ``settings``, its ``model.toml``."""
    from pathlib import Path

    folder = Path(root) / name / version
    save(mlp(widths, seed=seed), folder / "model.onnx")
    if settings:
        (folder / "model.toml").write_text(mlp_toml(widths[0], widths[-1], **settings))
