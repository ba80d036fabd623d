"""RMSNorm rewritten so that a device computing in float16 does not overflow it.

Models keep "massive activations" in their residual stream (SmolLM2: 2.5e4 in one channel of the first
token from layer 11 on); RMSNorm squares them (6e8, far past float16's 65504), and a device that squares
in float16 (the QNN HTP) then normalizes that row to garbage, which every later token attends to. The
rewrite divides each row by c = (max|x| + 1) / K before squaring, K the largest power of two with
hidden * K^2 <= 65504, so no square or sum exceeds float16 and the row's small entries stay above its
smallest normal number:

    y = x / c;   x / sqrt(mean(x^2) + eps)  =  y / sqrt(mean(y^2) + (sqrt(eps) / c)^2)

(eps / c^2 itself is not formed: c^2 overflows.) It is the same norm in exact arithmetic, and the
rewritten graph matches the original on onnxruntime's CPU provider within float32's rounding. Only the
float16 HTP compile uses it: RKNN fuses the model's own norm, and runs ReduceMax and Div on its CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def row_divisor_scale(hidden: int) -> float:
    """K: the largest power of two with hidden * K^2 <= float16's max (a row of y holds entries up to K)."""
    k = 1.0
    while hidden * (2 * k) ** 2 <= FLOAT16_MAX:
        k *= 2
    return k


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def rewrite_rms_norms(model: onnx.ModelProto, hidden: int) -> int:
    """Rewrite, in place, every RMSNorm of the traced pattern (Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt
    -> Div(1, .) -> Mul(x, .)) into the float16-safe form above, squaring y as y * y; returns how many
    were rewritten."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    k = row_divisor_scale(hidden)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # index of a norm's Pow -> the nodes placed before it
    unused: set[str] = set()  # eps and exponent constants only the rewritten nodes read
    for index, power in enumerate(graph.node):
        exponent = _constant(graph, power.input[1]) if power.op_type == "Pow" else None
        if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
            continue
        mean = only_consumer(power.output[0], "ReduceMean")
        add = mean and only_consumer(mean.output[0], "Add")
        sqrt = add and only_consumer(add.output[0], "Sqrt")
        div = sqrt and only_consumer(sqrt.output[0], "Div")
        mul = div and only_consumer(div.output[0], "Mul")
        eps_name = add and next((n for n in add.input if n != mean.output[0]), None)
        eps = _constant(graph, eps_name) if eps_name else None
        numerator = _constant(graph, div.input[0]) if div else None
        if (mul is None or eps is None or eps.size != 1 or numerator is None or numerator.size != 1
                or float(numerator) != 1.0 or div.input[1] != sqrt.output[0]):
            continue
        x = power.input[0]
        if x not in mul.input:
            continue
        p = f"{power.output[0]}/f16"
        consts = {f"{p}/one": 1.0, f"{p}/inv_k": 1.0 / k, f"{p}/sqrt_eps": float(np.sqrt(float(eps)))}
        nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
                 for name, v in consts.items()]
        nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"]),
            helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/max"], axes=[-1], keepdims=1),
            helper.make_node("Add", [f"{p}/max", f"{p}/one"], [f"{p}/max1"]),
            helper.make_node("Mul", [f"{p}/max1", f"{p}/inv_k"], [f"{p}/c"]),
            helper.make_node("Div", [x, f"{p}/c"], [f"{p}/y"]),
            helper.make_node("Div", [f"{p}/sqrt_eps", f"{p}/c"], [f"{p}/e"]),
            helper.make_node("Mul", [f"{p}/e", f"{p}/e"], [f"{p}/eps"]),
        ]
        new_nodes[index] = nodes
        # y * y rather than Pow(y, 2): with Pow, an embedding row holding exact zeros (8-bit rows have some)
        # turned the HTP's whole run to garbage; moved off zero, or squared as a product, it did not.
        if len(consumers[power.input[1]]) == 1:
            unused.add(power.input[1])
        power.op_type = "Mul"
        power.input[:] = [f"{p}/y", f"{p}/y"]
        add.input[list(add.input).index(eps_name)] = f"{p}/eps"
        if len(consumers[eps_name]) == 1:
            unused.add(eps_name)
        mul.input[list(mul.input).index(x)] = f"{p}/y"
    ordered = []
    for index, node in enumerate(graph.node):
        if not (node.op_type == "Constant" and node.output[0] in unused):
            ordered += new_nodes.get(index, []) + [node]
    del graph.node[:]
    graph.node.extend(ordered)
    return len(new_nodes)
