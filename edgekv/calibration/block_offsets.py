"""4-bit weights with a float offset per block, as GGUF's Q4_1 stores them, on onnxruntime's MatMulNBits.

A block of `block` input channels of one output column is w = d * q + m: codes q in 0..15, a scale d and
an offset m, both float. MatMulNBits only takes an integer zero point (a float one runs 30x slower on the
CPU), and rounding m to a multiple of d shifts every weight of the block alike: re-quantizing SmolLM2's
Q4_1 weights that way kept 55-68% top-1 agreement with float32 (benchmarks/RESULTS.md). So the kernel
multiplies the codes about the block's middle, d * (q - 8), and the middles c = m + 8 d come back
exactly through the block sums of the input:

    x @ W = MatMulNBits(x; q, d) + ReduceSum(x by blocks) @ C

For weights that were Q4_1 (the default model's), q, d and m are the file's own: the graph computes
what llama.cpp computes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekv.export.validator import CONTRIB_DOMAIN

CODES = 16  # 4 bits
MIDDLE = CODES // 2  # MatMulNBits' default zero point for 4 bits, when no zero_points input is given


def offset_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [K, N] -> packed codes [N, K/block, block/2] (two a byte, low nibble first along K), scales
    [N, K/block] and middles [K/block, N], all of a block's codes spanning its min to its max."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // block, block).astype(np.float64)
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    scale = (high - low) / (CODES - 1)
    scale[scale == 0] = 1.0  # a constant block: every code 0, the middle alone carries it
    codes = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, CODES - 1).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    middles = low + MIDDLE * scale
    return packed, scale.astype(np.float32), np.ascontiguousarray(middles.T.astype(np.float32))


def dequantize_offset_blocks(packed: np.ndarray, scale: np.ndarray, middles: np.ndarray) -> np.ndarray:
    """The reference of what the rewritten graph multiplies by: weight [K, N]."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float32)
    blocks = scale[..., None] * (codes - MIDDLE) + middles.T[..., None]
    return blocks.reshape(blocks.shape[0], -1).T


def rewrite_offset_int4(model: onnx.ModelProto, block: int, accuracy_level: int, skip: set[str],
                        cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Every MatMul by a constant weight (not named in `skip`) becomes MatMulNBits over its 4-bit codes plus
    the block sums of its input times the blocks' middles. `cache` holds each weight's blocks across graphs."""
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    nodes, added, block_sums = [], [], {}
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else None
        if weight not in tensors or weight in skip:
            nodes.append(node)
            continue
        if weight not in cache:
            cache[weight] = offset_blocks(numpy_helper.to_array(tensors[weight]), block)
        packed, scale, middles = cache[weight]
        n, k = scale.shape[0], scale.shape[1] * block
        x, y, name = node.input[0], node.output[0], node.name or weight
        if x not in block_sums:  # q, k and v (gate and up) share their input: sum its blocks once
            block_sums[x] = f"{x}/block_sums"
            shape, axes = f"{name}/block_shape", f"{name}/block_axes"
            added += [numpy_helper.from_array(np.array([-1, k // block, block], np.int64), shape),
                      numpy_helper.from_array(np.array([2], np.int64), axes)]
            nodes += [helper.make_node("Reshape", [x, shape], [f"{x}/blocks"], name=f"{name}/Reshape_blocks"),
                      helper.make_node("ReduceSum", [f"{x}/blocks", axes], [block_sums[x]], keepdims=0,
                                       name=f"{name}/ReduceSum_blocks")]
        added += [numpy_helper.from_array(packed, f"{weight}_codes"),
                  numpy_helper.from_array(scale, f"{weight}_scales"),
                  numpy_helper.from_array(middles, f"{weight}_middles")]
        nodes += [helper.make_node("MatMulNBits", [x, f"{weight}_codes", f"{weight}_scales"], [f"{y}/codes"],
                                   name=f"{name}_codes", domain=CONTRIB_DOMAIN, K=k, N=n, bits=4, block_size=block,
                                   accuracy_level=accuracy_level),
                  helper.make_node("MatMul", [block_sums[x], f"{weight}_middles"], [f"{y}/middles"],
                                   name=f"{name}/MatMul_middles"),
                  # [1, S, N] + [S, N]: the block sums lost the batch axis of 1
                  helper.make_node("Add", [f"{y}/codes", f"{y}/middles"], [y], name=f"{name}/Add_middles")]
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for node in nodes for i in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + [t for t in added if t.name not in {k.name for k in kept}])
    import_contrib_domain(model)


def import_contrib_domain(model: onnx.ModelProto) -> None:
    """Declare onnxruntime's com.microsoft domain, which MatMulNBits belongs to, once."""
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
