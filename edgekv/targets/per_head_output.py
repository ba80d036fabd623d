"""The attention output projection multiplied head by head, for RKNN.

The traced graphs turn the attention output [Hq, S, D] into [S, Hq*D] (a Transpose and a Reshape) and
multiply it by o_proj's [Hq*D, H]. rknn-toolkit2 keeps its attention result in a layout of its own and
runs that Reshape on the CPU, the one operator of every decode graph that leaves the NPU. Multiplying
per head instead, [Hq, S, D] @ [Hq, D, H] summed over the heads, is the same product and needs no
Reshape. It is applied to the RKNN compile only: the INT8 quantizers and MatMulNBits take 2-D weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper


def rewrite_output_projections(model: onnx.ModelProto, base_dir: Path, q_heads: int, head_dim: int) -> int:
    """Rewrite, in place, every MatMul(Reshape(Transpose(y, [1, 0, 2])), W) whose weight W is an o_proj
    initializer of [q_heads * head_dim, H] into ReduceSum(MatMul(y, W as [q_heads, head_dim, H]), axis 0);
    returns how many. Weights stay external except the reshaped ones (stored in the model)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dead: set[int] = set()
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul":
            continue
        cast = producer.get(node.input[1])  # float16-weight artifacts read each weight through a Cast
        cast = cast if cast is not None and cast.op_type == "Cast" and consumers[cast.output[0]] == 1 else None
        weight = initializers.get(cast.input[0] if cast else node.input[1])
        if weight is None or "o_proj" not in weight.name or list(weight.dims)[0] != q_heads * head_dim:
            continue
        reshape = producer.get(node.input[0])
        transpose = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if transpose is None or transpose.op_type != "Transpose" or consumers[reshape.output[0]] != 1:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if perm != [1, 0, 2] or consumers[transpose.output[0]] != 1:
            continue
        if weight.data_location == onnx.TensorProto.EXTERNAL:
            external_data_helper.load_external_data_for_tensor(weight, str(base_dir))
        per_head = numpy_helper.to_array(weight).reshape(q_heads, head_dim, -1)
        name = f"{weight.name}.per_head"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(per_head), name))
        axes = f"{name}/axes"
        nodes = [helper.make_node("Constant", [], [axes], value=numpy_helper.from_array(np.array([0], np.int64)))]
        if cast:
            nodes.append(helper.make_node("Cast", [name], [f"{name}/float32"], to=onnx.TensorProto.FLOAT))
            name = f"{name}/float32"
        replaced[index] = nodes + [
            helper.make_node("MatMul", [transpose.input[0], name], [f"{name}/heads"]),
            helper.make_node("ReduceSum", [f"{name}/heads", axes], [node.output[0]], keepdims=0),
        ]
        dead |= {id(reshape), id(transpose)} | ({id(cast)} if cast else set())
    kept = []
    for index, node in enumerate(graph.node):
        if id(node) not in dead:
            kept += replaced.get(index, [node])
    used = {name for node in kept for name in node.input} | {value.name for value in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in kept if n.op_type != "Constant" or n.output[0] in used)  # the Reshapes' shapes
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:  # the 2-D o_proj weights the graph no longer reads
        graph.initializer.remove(tensor)
    return len(replaced)
