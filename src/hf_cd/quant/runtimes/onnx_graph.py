"""Graph passes over a quantized ONNX model: they rewrite a ``ModelProto`` in place (no files, no sessions).

Why our own pass: ONNX Runtime turns each static-QDQ linear (DequantizeLinear on the uint8
input and on the int8 weight, then MatMul) into its ``MatMulIntegerToFloat`` kernel at session
load, but leaves the bias ``Add`` after it as a separate float op: one more pass over every
linear's output. ``MatMulIntegerToFloat`` takes the bias itself and adds it while it rescales the
int32 accumulators, which is what ORT's own dynamic-quantization graphs use. Writing that node
directly saved 4–11% of the int8 model's time on DINOv2-S at batch 32 (bench/results/int8_cpu.md).
The float graph gains nothing from the like (a 2-D ``Gemm`` with the bias was slower than
MatMul + Add there), so the float baseline keeps its own best form.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

MICROSOFT_DOMAIN = "com.microsoft"
INT8_LINEAR_OP = "MatMulIntegerToFloat"


@dataclass(frozen=True)
class FusionReport:
    """What `fuse_int8_linear_bias` did: linears lowered, and how many of them took their bias along."""

    linears: int
    with_bias: int


def _initializers(graph) -> dict[str, Any]:
    return {initializer.name: initializer for initializer in graph.initializer}


def _is_scalar(tensor) -> bool:
    return len(tensor.dims) == 0 or list(tensor.dims) == [1]


def _attribute(node, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return default


def _is_per_column_weight(dequantize, initializers: dict[str, Any]) -> bool:
    """A constant 2-D int8/uint8 weight, dequantized per tensor or per output column (axis −1 / 1)."""
    weight = initializers.get(dequantize.input[0])
    scale = initializers.get(dequantize.input[1])
    if weight is None or scale is None or len(weight.dims) != 2:
        return False
    if _is_scalar(scale):
        return True
    return (
        len(scale.dims) == 1
        and scale.dims[0] == weight.dims[1]
        and _attribute(dequantize, "axis", 1) in (1, -1)
    )


def _bias_of(add, matmul_output: str, initializers: dict[str, Any], columns: int) -> str | None:
    """The constant 1-D bias that ``add`` adds to ``matmul_output``, if that is all it does."""
    others = [name for name in add.input if name != matmul_output]
    if len(others) != 1 or len(add.input) != 2:
        return None
    bias = initializers.get(others[0])
    if bias is None or list(bias.dims) != [columns] or bias.data_type != 1:  # float32
        return None
    return others[0]


def fuse_int8_linear_bias(model_proto) -> FusionReport:
    """Rewrite, in place, every QDQ linear (DQ(x) · DQ(W) [+ b]) as one ``MatMulIntegerToFloat``.

    Only MatMuls whose first input is a dequantized activation and whose second is a dequantized
    constant weight (per tensor or per output column) are rewritten; attention matmuls (two
    activations) and anything else are left alone. A following ``Add`` of a constant 1-D float
    bias is folded into the node. Dequantize nodes left without consumers are removed. The
    result needs ONNX Runtime (``com.microsoft`` domain).
    """
    from onnx import helper

    graph = model_proto.graph
    initializers = _initializers(graph)
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {output.name for output in graph.output}

    replacement: dict[int, Any] = {}
    dropped: set[int] = set()
    linears = with_bias = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        activation = producer.get(node.input[0])
        weight = producer.get(node.input[1])
        if activation is None or weight is None:
            continue
        if activation.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear":
            continue
        if not _is_per_column_weight(weight, initializers):
            continue
        activation_scale = initializers.get(activation.input[1])
        if activation_scale is None or not _is_scalar(activation_scale):
            continue  # the kernel takes one static scale for its activation input
        columns = initializers[weight.input[0]].dims[1]
        inputs = [
            activation.input[0],
            weight.input[0],
            activation.input[1],
            weight.input[1],
            activation.input[2] if len(activation.input) > 2 else "",
            weight.input[2] if len(weight.input) > 2 else "",
        ]
        output = node.output[0]
        users = consumers[output]
        if output not in graph_outputs and len(users) == 1 and users[0].op_type == "Add":
            bias = _bias_of(users[0], output, initializers, columns)
            if bias is not None:
                inputs.append(bias)
                output = users[0].output[0]
                dropped.add(id(users[0]))
                with_bias += 1
        while inputs and inputs[-1] == "":
            inputs.pop()
        replacement[id(node)] = helper.make_node(
            INT8_LINEAR_OP, inputs, [output], name=f"{node.name}_{INT8_LINEAR_OP}", domain=MICROSOFT_DOMAIN
        )
        linears += 1
    if not linears:
        return FusionReport(0, 0)

    nodes = [replacement.get(id(node), node) for node in graph.node if id(node) not in dropped]
    used = {name for node in nodes for name in node.input} | graph_outputs
    nodes = [
        node for node in nodes if not (node.op_type == "DequantizeLinear" and node.output[0] not in used)
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(opset.domain == MICROSOFT_DOMAIN for opset in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
    return FusionReport(linears, with_bias)
