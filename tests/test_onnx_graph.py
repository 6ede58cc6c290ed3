"""The int8 bias pass on hand-built QDQ graphs: what it rewrites, what it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from hf_cd.quant.runtimes.onnx_graph import fuse_int8_linear_bias  # noqa: E402

K, N = 8, 6


def qdq_linear(weight_axis: int | None, with_bias: bool = True, bias_shape: tuple[int, ...] = (N,)):
    """x → Q → DQ → MatMul(·, DQ(W)) [→ Add b] → y, the shape ORT's quantize_static writes."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    if weight_axis is None:
        weight_scale = np.array(0.02, np.float32)
    else:
        weight_scale = rng.uniform(0.01, 0.03, size=(weight.shape[weight_axis],)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(weight_scale.shape, np.int8), "w_zero"),
        numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b"),
    ]
    axis = {} if weight_axis is None else {"axis": weight_axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], **axis),
        helper.make_node("MatMul", ["xd", "wd"], ["mm" if with_bias else "y"]),
    ]
    if with_bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, N])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run(model, x):
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("weight_axis", [None, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_per_tensor_or_per_column_linears_become_one_node_with_the_same_output(weight_axis, with_bias):
    model = qdq_linear(weight_axis, with_bias)
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    expected = run(model, x)
    report = fuse_int8_linear_bias(model)
    assert (report.linears, report.with_bias) == (1, int(with_bias))
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "weight_axis, bias_shape, rewritten, bias_inside",
    [
        (0, (N,), 0, 0),  # per-row (input-channel) weight scales: the kernel scales columns only
        (1, (3, N), 1, 0),  # an Add that is not a 1-D bias stays a separate Add
    ],
)
def test_what_the_kernel_cannot_take_is_left_alone(weight_axis, bias_shape, rewritten, bias_inside):
    model = qdq_linear(weight_axis, bias_shape=bias_shape)
    x = np.random.default_rng(2).standard_normal((2, 3, K)).astype(np.float32)
    expected = run(model, x)
    report = fuse_int8_linear_bias(model)
    assert (report.linears, report.with_bias) == (rewritten, bias_inside)
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)
