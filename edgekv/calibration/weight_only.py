"""INT8 weight-only graphs for CPUs: onnxruntime's MatMulNBits kernel (com.microsoft) over 8-bit weights.

The QDQ graphs (quantize.py) are for NPUs, whose compilers fold the dequantization into their INT8
kernels; onnxruntime's CPU provider runs them slowly. Its weight-only kernel is what makes INT8 fast on
a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx

from edgekv.core.manifest import Manifest
from edgekv.export.weights import WeightWriter

WEIGHT_ONLY_OPS = ("MatMulNBits",)  # onnxruntime's CPU weight-only kernel (com.microsoft), for CPU profiles
WEIGHT_ONLY_BLOCK = 32  # input channels per weight scale
WEIGHT_ONLY_ACCURACY_LEVEL = 4  # int8 activations per block inside the kernel (onnxruntime's fastest on x86/ARM)


def quantize_weight_only(source: Manifest, float_dir: Path, staging: Path, writer: WeightWriter,
                          progress: Callable[[str], None]) -> tuple[dict, dict]:
    """onnxruntime's CPU weight-only kernel: every MatMul by a constant weight becomes MatMulNBits over
    8-bit weights with a float32 scale per block of WEIGHT_ONLY_BLOCK input channels. accuracy_level 4
    lets the kernel quantize each activation block of the same size to int8 on the fly and multiply in
    integers: the massive activations that defeat one static 8-bit range (quantize.py's docstring) only blur
    their own block of 32. The embedding lookup stays float32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantized: dict[str, tuple[onnx.NodeProto, list[onnx.TensorProto]]] = {}
    graphs = {}
    entries = list(source.graphs.values())
    for i, entry in enumerate(entries):
        model = onnx.load(float_dir / entry.file)
        # The variants of a step multiply the same weights: quantize each weight once, in its first graph.
        seen = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in quantized]
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                         accuracy_level=WEIGHT_ONLY_ACCURACY_LEVEL, nodes_to_exclude=seen)
        quantizer.process()
        model = quantizer.model.model
        reuse_weight_only_kernels(model, quantized)
        graphs[entry.name] = {**source.data["graphs"][entry.name], "weights": writer.save(model, staging / entry.file)}
        if (i + 1) % 10 == 0 or i + 1 == len(entries):
            progress(f"quantized {i + 1}/{len(entries)} graphs to MatMulNBits")
    return graphs, {"format": "MatMulNBits", "weights": f"int8 symmetric, a float32 scale per {WEIGHT_ONLY_BLOCK} "
                    "input channels; embedding float32", "activations": "float32 (int8 per block inside the kernel, "
                    f"accuracy_level {WEIGHT_ONLY_ACCURACY_LEVEL})"}


def reuse_weight_only_kernels(model: onnx.ModelProto,
                              quantized: dict[str, tuple[onnx.NodeProto, list[onnx.TensorProto]]]) -> None:
    """Each MatMul by a weight in `quantized` becomes a copy of that weight's MatMulNBits node, with its
    tensors; the graph's own new MatMulNBits nodes are added to `quantized`, keyed by their float weight."""
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            weight = node.input[1].removesuffix("_Q8")
            if weight not in quantized:
                copies = [onnx.TensorProto(), onnx.TensorProto()]
                for copy, name in zip(copies, node.input[1:3]):
                    copy.CopyFrom(tensors[name])
                quantized[weight] = (onnx.NodeProto(), copies)
                quantized[weight][0].CopyFrom(node)
        elif node.op_type == "MatMul" and node.input[1] in quantized:
            kernel, kernel_tensors = quantized[node.input[1]]
            a, out, name = node.input[0], node.output[0], node.name
            node.CopyFrom(kernel)
            node.input[0], node.output[0], node.name = a, out, name
            graph.initializer.extend(t for t in kernel_tensors if t.name not in tensors)
            tensors.update({t.name: t for t in kernel_tensors})
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
