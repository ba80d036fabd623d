"""Weight-only graphs for CPUs: onnxruntime's MatMulNBits kernel (com.microsoft) over 8-bit or 4-bit weights.

The QDQ graphs (quantize.py) are for NPUs, whose compilers fold the dequantization into their INT8
kernels; onnxruntime's CPU provider runs them slowly. Its weight-only kernel is what makes low-bit
weights fast on a CPU, where every weight is read at every token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekv.calibration.block_offsets import import_contrib_domain, rewrite_offset_int4
from edgekv.core.manifest import Manifest
from edgekv.export.weights import WeightWriter

WEIGHT_ONLY_OPS = ("MatMulNBits",)  # onnxruntime's CPU weight-only kernel (com.microsoft), for CPU profiles
SMALL_BLOCK = 16  # input channels a block of WeightOnlyFormat.small_blocks
SPLIT_ACTIVATION_OPS = ("Abs", "Add", "Concat", "Div", "Mul", "ReduceMax", "ReduceSum", "Reshape", "Round",
                        "Sub")  # split_activation_rows
INT8_LEVELS = 127  # MatMulNBits at accuracy level 4 scales an activation block to [-127, 127]
TINY_STEP = np.float32(1e-30)  # added to every block's step: an all-zero block divides by it, not by 0


@dataclass(frozen=True)
class WeightOnlyFormat:
    """How MatMulNBits stores the weights: `bits` per weight in blocks of `block_size` input channels, each
    with a float32 scale (and, unless symmetric, a zero point); weights whose name contains one of
    `eight_bit` stay 8-bit (INT8_FORMAT). accuracy_level 4 lets the kernel quantize each activation
    block to int8 on the fly and multiply in integers. Of the 8-bit weights, those named in
    `float_activations` get accuracy level 0 (float32 activations) and those in `small_blocks` blocks of
    SMALL_BLOCK: variants benchmarks/weight_only_formats.py measures (RESULTS.md), in no profile. The
    kernels of weights named in `split_activations` take their input and its int8 rounding error as two
    rows (split_activation_rows)."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    eight_bit: tuple[str, ...] = ()
    offsets: bool = False  # 4 bits: a float offset per block, as Q4_1 (block_offsets.py), not a zero point
    float_activations: tuple[str, ...] = ()
    small_blocks: tuple[str, ...] = ()
    split_activations: tuple[str, ...] = ()
    # Of those, 4-bit kernels of more than one row (prefill chunks) run at accuracy level 0 instead: their
    # float path costs less than twice the rows there (RESULTS.md); 8-bit ones have no fast float path.
    chunks_at_level0: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        """The operators the quantized graphs add (Split: fuse_sibling_matmuls)."""
        return (WEIGHT_ONLY_OPS + ("Split",) + (("ReduceSum",) if self.offsets else ())
                + (SPLIT_ACTIVATION_OPS if self.split_activations else ()))

    def describe(self) -> str:
        kept = f"; 8-bit: {', '.join(self.eight_bit)}" if self.eight_bit else ""
        exact = f"; float32 activations: {', '.join(self.float_activations)}" if self.float_activations else ""
        small = f"; blocks of {SMALL_BLOCK}: {', '.join(self.small_blocks)}" if self.small_blocks else ""
        split = (f"; activations split in two int8 rows: {', '.join(self.split_activations)}"
                 if self.split_activations else "")
        zero = "a float32 offset" if self.offsets else "symmetric" if self.symmetric else "a 4-bit zero point"
        return (f"int{self.bits}, a float32 scale and {zero} per {self.block_size} input "
                f"channels{kept}{exact}{small}{split}")


# The massive activations that defeat one static 8-bit range (quantize.py's docstring) only blur their
# own block inside the kernel.
INT8_FORMAT = WeightOnlyFormat(bits=8, block_size=32, symmetric=True, accuracy_level=4)
# The queries and keys 8-bit as well: they decide Quest's page selection, and 4-bit ones lost it two of
# five pass keys at 8K that float32 and int8 find (benchmarks/RESULTS.md).
INT4_FORMAT = WeightOnlyFormat(bits=4, block_size=32, symmetric=False, accuracy_level=4,
                               eight_bit=("embed_tokens", "lm_head", "q_proj", "k_proj"), offsets=True)
# The same weights, every decode kernel fed its input and that input's int8 rounding error as two rows
# (".weight" is in every weight's name), prefill chunks' 4-bit kernels at accuracy level 0: float32
# activations' agreement, slower (RESULTS.md).
INT4_SPLIT_FORMAT = replace(INT4_FORMAT, split_activations=(".weight",), chunks_at_level0=True)
WEIGHT_ONLY_FORMATS = {"int8-weight-only": INT8_FORMAT, "int4-weight-only": INT4_FORMAT,
                       "int4-split-activations": INT4_SPLIT_FORMAT}


def quantize_weight_only(source: Manifest, float_dir: Path, staging: Path, writer: WeightWriter,
                          progress: Callable[[str], None], form: WeightOnlyFormat) -> tuple[dict, dict]:
    """onnxruntime's CPU weight-only kernel: every MatMul by a constant weight becomes MatMulNBits over
    `form`'s weights. The embedding lookup stays on the host (runtime/embedding.py)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantized: dict[str, tuple[onnx.NodeProto, list[onnx.TensorProto]]] = {}
    offset_blocks: dict = {}
    graphs = {}
    entries = list(source.graphs.values())
    for i, entry in enumerate(entries):
        model = onnx.load(float_dir / entry.file)
        fuse_sibling_matmuls(model, form.eight_bit)
        weights = {t.name for t in model.graph.initializer}
        matmuls = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
        kept = {name for name, weight in matmuls.items() if any(part in weight for part in form.eight_bit)}
        if form.offsets:
            rewrite_offset_int4(model, form.block_size, form.accuracy_level, {matmuls[n] for n in kept},
                                offset_blocks)
            matmuls = {name: matmuls[name] for name in kept}
        # The variants of a step multiply the same weights: quantize each weight once, in its first graph.
        fresh = {name: weight for name, weight in matmuls.items() if weight not in quantized}
        for part, names in formats_by_node(form, fresh, kept):
            if names:
                everything = {n.name for n in model.graph.node}
                quantizer = MatMulNBitsQuantizer(model, bits=part.bits, block_size=part.block_size,
                                                 is_symmetric=part.symmetric, accuracy_level=part.accuracy_level,
                                                 nodes_to_exclude=sorted(everything - names))
                quantizer.process()
                model = quantizer.model.model
        reuse_weight_only_kernels(model, quantized)
        if form.split_activations:
            split_activation_rows(model, form.split_activations, form.chunks_at_level0)
        graphs[entry.name] = {**source.data["graphs"][entry.name], "weights": writer.save(model, staging / entry.file)}
        if (i + 1) % 10 == 0 or i + 1 == len(entries):
            progress(f"quantized {i + 1}/{len(entries)} graphs to MatMulNBits")
    return graphs, {"format": "MatMulNBits", "weights": f"{form.describe()}; embedding: the LM head's 8-bit "
                    "rows, looked up on the host",
                    "activations": f"float32 (int8 per block inside the kernel, accuracy_level {form.accuracy_level}"
                    f"{'; split kernels take their int8 rounding error as a second row' if form.split_activations else ''})"}


def formats_by_node(form: WeightOnlyFormat, matmuls: dict[str, str], kept: set[str]
                    ) -> list[tuple[WeightOnlyFormat, set[str]]]:
    """Which MatMuls (node name -> weight name) each format quantizes: those not `kept` 8-bit in `form`, the
    kept ones in INT8_FORMAT, or in its variant for form.float_activations or form.small_blocks."""
    def named(parts: tuple[str, ...]) -> set[str]:
        return {name for name in kept & set(matmuls) if any(part in matmuls[name] for part in parts)}

    exact = named(form.float_activations)
    small = named(form.small_blocks) - exact  # float32 activations win: one format a weight
    return [(form, set(matmuls) - kept), (INT8_FORMAT, kept & set(matmuls) - exact - small),
            (replace(INT8_FORMAT, accuracy_level=0), exact), (replace(INT8_FORMAT, block_size=SMALL_BLOCK), small)]


def fuse_sibling_matmuls(model: onnx.ModelProto, eight_bit: tuple[str, ...]) -> None:
    """MatMuls by constant weights that share their input and their bits (q and k, or q, k and v; gate and
    up) become one MatMul by the weights side by side, split after it: MatMulNBits quantizes every output
    column on its own, so the codes are the same, and one call of the kernel costs less than two or three
    (benchmarks/RESULTS.md). The fused weight is named by its parts joined with '+'; the parts' own weights,
    now unused, are dropped with the others at the end of quantization (reuse_weight_only_kernels)."""
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    siblings: dict[tuple[str, bool], list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in tensors:
            eight = any(part in node.input[1] for part in eight_bit)
            siblings.setdefault((node.input[0], eight), []).append(node)
    fused_at: dict[str, list[onnx.NodeProto]] = {}  # a sibling's output -> the nodes replacing it (the first's: all)
    for group in (g for g in siblings.values() if len(g) > 1):
        parts = [numpy_helper.to_array(tensors[node.input[1]]) for node in group]
        weight = "+".join(node.input[1] for node in group)
        both, sizes = f"{group[0].output[0]}/siblings", f"{group[0].output[0]}/sibling_sizes"
        graph.initializer.extend([numpy_helper.from_array(np.concatenate(parts, axis=1), weight),
                                  numpy_helper.from_array(np.array([p.shape[1] for p in parts], np.int64), sizes)])
        fused_at[group[0].output[0]] = [
            helper.make_node("MatMul", [group[0].input[0], weight], [both], name=f"{group[0].name}/siblings"),
            helper.make_node("Split", [both, sizes], [node.output[0] for node in group], axis=-1,
                             name=f"{group[0].name}/Split_siblings")]
        fused_at.update({node.output[0]: [] for node in group[1:]})
    nodes = [replacement for node in graph.node for replacement in fused_at.get(node.output[0], [node])]
    graph.ClearField("node")
    graph.node.extend(nodes)


def int8_rounding_error(x: np.ndarray, block: int) -> np.ndarray:
    """The reference of split_activation_rows' residual: x less its int8 codes per block of `block` (last
    axis), scaled by the block's largest magnitude as MatMulNBits' accuracy level 4 scales them."""
    blocks = x.reshape(-1, block)
    step = np.abs(blocks).max(axis=1, keepdims=True) / INT8_LEVELS + TINY_STEP
    return (blocks - np.round(blocks / step) * step).reshape(x.shape).astype(np.float32)


def split_activation_rows(model: onnx.ModelProto, names: tuple[str, ...], chunks_at_level0: bool = False) -> None:
    """Each MatMulNBits whose weight is named in `names` multiplies its input x and x's int8 rounding error
    r (in the kernel's activation blocks, its block_size) as two rows and adds them: the kernel quantizes r
    to int8 as well, so what it loses is r's error, about 1/127 of x's: a float32 activation's accuracy
    for one read of the weights. Kernels of the same input and block size share its two rows, stacked
    [2, *x.shape] (the graphs' shapes are static). `chunks_at_level0`: 4-bit kernels of more than one row
    get float32 activations (accuracy level 0) instead of the second row."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = model.graph
    kernels = {n.name for n in graph.node if n.op_type == "MatMulNBits" and any(part in n.input[1] for part in names)}
    if not kernels:
        return
    inferred = SymbolicShapeInference.infer_shapes(model).graph  # knows MatMulNBits, which onnx's does not
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(inferred.input)}
    levels, tiny, first = "split_activations/levels", "split_activations/tiny", "split_activations/first"
    nodes, stacked = [], {}
    for node in graph.node:
        if node.name not in kernels:
            nodes.append(node)
            continue
        x, name = node.input[0], node.name
        attributes = {a.name: a for a in node.attribute}
        if chunks_at_level0 and attributes["bits"].i == 4 and int(np.prod(shapes[x][:-1])) > 1:
            attributes["accuracy_level"].i = 0
            nodes.append(node)
            continue
        block = attributes["block_size"].i
        if (x, block) not in stacked:
            rows = stacked[x, block] = f"{x}/rows{block}"
            graph.initializer.extend([numpy_helper.from_array(np.array([-1, block], np.int64), f"{rows}/blocks_shape"),
                                      numpy_helper.from_array(np.array([2, *shapes[x]], np.int64), f"{rows}/shape")])
            nodes += [
                helper.make_node("Reshape", [x, f"{rows}/blocks_shape"], [f"{rows}/x"], name=f"{name}/Reshape_blocks"),
                helper.make_node("Abs", [f"{rows}/x"], [f"{rows}/abs"], name=f"{name}/Abs"),
                helper.make_node("ReduceMax", [f"{rows}/abs"], [f"{rows}/max"], axes=[1], keepdims=1,
                                 name=f"{name}/ReduceMax"),
                helper.make_node("Mul", [f"{rows}/max", levels], [f"{rows}/step0"], name=f"{name}/Mul_levels"),
                helper.make_node("Add", [f"{rows}/step0", tiny], [f"{rows}/step"], name=f"{name}/Add_tiny"),
                helper.make_node("Div", [f"{rows}/x", f"{rows}/step"], [f"{rows}/scaled"], name=f"{name}/Div_step"),
                helper.make_node("Round", [f"{rows}/scaled"], [f"{rows}/codes"], name=f"{name}/Round"),
                helper.make_node("Mul", [f"{rows}/codes", f"{rows}/step"], [f"{rows}/int8"], name=f"{name}/Mul_step"),
                helper.make_node("Sub", [f"{rows}/x", f"{rows}/int8"], [f"{rows}/error"], name=f"{name}/Sub_error"),
                helper.make_node("Concat", [f"{rows}/x", f"{rows}/error"], [f"{rows}/both"], axis=0,
                                 name=f"{name}/Concat_rows"),
                helper.make_node("Reshape", [f"{rows}/both", f"{rows}/shape"], [rows], name=f"{name}/Reshape_rows")]
        y = node.output[0]
        node.input[0], node.output[0] = stacked[x, block], f"{y}/two_rows"
        nodes += [node, helper.make_node("ReduceSum", [node.output[0], first], [y], keepdims=0,
                                         name=f"{name}/ReduceSum_rows")]
    graph.initializer.extend([numpy_helper.from_array(np.array(1 / INT8_LEVELS, np.float32), levels),
                              numpy_helper.from_array(TINY_STEP, tiny),
                              numpy_helper.from_array(np.array([0], np.int64), first)])
    graph.ClearField("node")
    graph.node.extend(nodes)


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [V, H] table's rows in INT8_FORMAT, as MatMulNBits stores the weight of x @ table.T (the tied LM
    head): codes [V, blocks, block_size] (uint8, zero point 128) and float32 scales [V, blocks]. Made by
    the block quantizer of onnxruntime's MatMulNBitsQuantizer, so they are the bytes it writes for that
    head, and a tied model stores them once."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=INT8_FORMAT.block_size, is_symmetric=INT8_FORMAT.symmetric,
                                          accuracy_level=INT8_FORMAT.accuracy_level, bits=INT8_FORMAT.bits)
    codes, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(table.T))
    return codes, scales


def reuse_weight_only_kernels(model: onnx.ModelProto,
                              quantized: dict[str, tuple[onnx.NodeProto, list[onnx.TensorProto]]]) -> None:
    """Each MatMul by a weight in `quantized` becomes a copy of that weight's MatMulNBits node, with its
    tensors; the graph's new MatMulNBits nodes from onnxruntime's quantizer (which names a weight W's codes
    W_Q<bits>) are added to `quantized`, keyed by W. rewrite_offset_int4 reuses its own blocks."""
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            from_quantizer = re.fullmatch(r"(.+)_Q\d", node.input[1])
            weight = from_quantizer and from_quantizer[1]
            if weight and weight not in quantized:
                copies = [onnx.TensorProto() for _ in node.input[1:]]
                for copy, name in zip(copies, node.input[1:]):
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
    if any(node.op_type == "MatMulNBits" for node in graph.node):
        import_contrib_domain(model)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
