"""INT8 QDQ graphs for NPUs: static quantization with activation ranges from real activations (the
artifact is written by int8_export.py; CPUs get weight-only graphs instead, weight_only.py).

1. Calibration prompts run through the float32 artifact on the real runtime; every budget-prefill graph
   call's inputs are recorded (Engine.on_graph).
2. onnxruntime's MinMax calibrator runs each recorded graph on its recorded inputs: the range of every
   tensor that enters a matrix product.
3. onnxruntime's QDQ quantizer rewrites every graph of every variant: each projection gets symmetric
   per-output-channel INT8 weights (16-bit for the value projections, INT16_WEIGHT_PROJECTIONS) and 16-bit
   activations over the calibrated ranges, widened by ACTIVATION_RANGE_MARGIN (A16W8, what NPU
   toolchains such as Qualcomm's use for LLMs). The variants of a layer share their ranges (their
   projections read the same tensors, by name: only the attention over the KV budget differs, and it
   stays float), so their INT8 weights are the same bytes, stored once.
4. The vocabulary matrix (the embedding, tied to the LM head in SmolLM2) is 16-bit per vocabulary entry,
   stored once in the head's [H, V] layout: the head multiplies it, the host's embedding lookup reads
   columns of it and dequantizes only those (quantize_vocabulary, int8_export.write_embedding).

Why 16-bit activations and a 16-bit vocabulary matrix, measured on SmolLM2-135M (top-1 agreement with
float32 over 768 tokens, fake-quantized in torch): INT8 weights alone 94.8%; with 8-bit activations 59%
(the down-projection inputs reach 2910 in layer 11, "massive activations" that one 8-bit range cannot
cover; SmoothQuant-style scaling recovered only 73%); keeping the LM head out of INT8 is worth +1.3 to
+2.7 points, more than any layer. 16-bit Q/DQ at the profiles' opset 17 are onnxruntime's com.microsoft
QuantizeLinear/DequantizeLinear, which onnxruntime's CPU and QNN (Hexagon) providers run.

The attention products (q.k and p.v over the gathered pages) stay float32: they are activation by
activation, and the KV pages keep their own dtype (profile kv_dtype).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from edgekv.calibration.prompts import calibration_prompts
from edgekv.core.manifest import GraphEntry, Manifest
from edgekv.export.validator import CONTRIB_DOMAIN  # 16-bit Q/DQ below opset 21
from edgekv.export.weights import WeightWriter
from edgekv.runtime.engine import Engine

CALIBRATION_TOKENS = 1024  # per calibration prompt: 16 prefill chunks of npu-small, 2 prompts
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")  # what the quantized graphs add to the float graphs' operators
# Calibrated activation ranges are widened by this factor: 16-bit steps are fine enough to afford it, and
# text unlike the calibration prompts reaches beyond their ranges (README against Python's documentation:
# 189 of 210 projection inputs, by up to 1.8x); clipping them cost more than any weight rounding.
ACTIVATION_RANGE_MARGIN = 1.5
# Except ranges this wide: the massive activations (SmolLM2: the down-projection inputs of layers 11, 28
# and 29, 790-3400) sit in the same few channels whatever the text, so a margin would only coarsen the steps.
MASSIVE_ACTIVATION_RANGE = 500.0
# Projections whose weights are 16-bit per output channel instead of 8: the value projections, the most
# sensitive and among the smallest (+0.6% of the float32 weight bytes in SmolLM2-135M).
INT16_WEIGHT_PROJECTIONS = ("v_proj",)
INT16_MAX = 32767
UINT16_MAX = 65535


def record_prefill_inputs(artifact: Path, prompts: list[list[int]],
                          progress: Callable[[str], None]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The inputs of every budget-prefill graph call while the prompts are prefilled (quest policy)."""
    recorded: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)

    def record(graph: GraphEntry, inputs: dict[str, np.ndarray]) -> None:
        if graph.seq_len > 1:
            recorded[graph.name].append({name: array.copy() for name, array in inputs.items()})

    engine = Engine.open(artifact, "quest")
    try:
        chunk = engine.prefill_step.seq_len
        engine.on_graph = record
        for i, prompt in enumerate(prompts):
            # A body of whole chunks: no left-padding rows, whose activations no real token produces.
            whole = prompt[:1 + chunk * ((len(prompt) - 1) // chunk)]
            engine.reset()
            engine.prefill(whole)
            progress(f"recorded activations of calibration prompt {i + 1}/{len(prompts)} ({len(whole)} tokens)")
    finally:
        engine.close()
    return recorded


class RecordedFeeds:
    """onnxruntime CalibrationDataReader over recorded inputs."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibrate_ranges(graph_path: Path, feeds: list[dict[str, np.ndarray]], work_dir: Path) -> Path:
    """MinMax ranges of the tensors entering MatMuls, written as onnxruntime's calibration cache."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = create_calibrator(graph_path, ["MatMul"], augmented_model_path=work_dir / "augmented.onnx",
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(RecordedFeeds(feeds))
    cache = work_dir / f"{graph_path.stem}.ranges.json"
    save_tensors_data(widen_ranges(calibrator.compute_data()), cache)
    return cache


def widen_ranges(calibrated):
    """onnxruntime's TensorsData with every range but the massive ones widened by ACTIVATION_RANGE_MARGIN."""
    from onnxruntime.quantization.calibrate import TensorsData

    widened = {}
    for name, data in calibrated.data.items():
        lowest, highest = (np.asarray(v) for v in data.range_value)
        if float(np.max(highest - lowest)) < MASSIVE_ACTIVATION_RANGE:
            lowest, highest = lowest * ACTIVATION_RANGE_MARGIN, highest * ACTIVATION_RANGE_MARGIN
        widened[name] = (lowest, highest)
    return TensorsData(calibrated.calibration_method, widened)


def projection_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls by a constant weight, except the vocabulary matrix's (quantize_vocabulary)."""
    initializers = {t.name for t in model.graph.initializer}
    vocabulary = {node.name for node, _ in vocabulary_nodes(model)}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers and node.name not in vocabulary]


def quantize_graph(graph_path: Path, ranges: Path, out_path: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(graph_path, load_external_data=False)
    nodes = projection_nodes(model)
    int16_weights = {node.input[1]: [{"axis": 1, "quant_type": QuantType.QInt16, "symmetric": True}]
                     for node in model.graph.node if node.name in nodes
                     and any(f".{name}." in node.input[1] for name in INT16_WEIGHT_PROJECTIONS)}
    quantize_static(graph_path, out_path, calibration_data_reader=None, calibration_cache_path=ranges,
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt16,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                    # Only the projections' inputs: the attention products stay float, and so does every
                    # projection's output (the residual stream, whose massive activations one range would blur).
                    nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"], "UseQDQContribOps": True,
                                   "TensorQuantOverrides": int16_weights})


def vocabulary_int16(matrix_hv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 16-bit per vocabulary entry (per column of the [H, V] matrix): values and scales."""
    scales = (np.abs(matrix_hv).max(axis=0) / INT16_MAX).astype(np.float32)
    scales[scales == 0] = 1.0
    values = np.clip(np.rint(matrix_hv / scales), -INT16_MAX, INT16_MAX).astype(np.int16)
    return values, scales


def vocabulary_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, weight) of the LM head's product, where the graph has it."""
    initializers = {t.name for t in model.graph.initializer}
    return [(node, node.input[1]) for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers
            and node.input[1] in ("model.embed_tokens.weight.T", "lm_head.weight.T")]


def _contrib(op: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], domain=CONTRIB_DOMAIN, **attributes)


def quantize_vocabulary(model: onnx.ModelProto, ranges) -> None:
    """16-bit QDQ of the LM head's vocabulary matrix [H, V], stored as `<its name>_int16` with a scale per
    entry: MatMul(QDQ(x), DQ(Wt_int16, scales, axis=1)), x over its calibrated range (`ranges`:
    onnxruntime's TensorsData). The host's embedding lookup reads the same tensors (int8_export.py)."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node, weight in vocabulary_nodes(model):
        values, scales = vocabulary_int16(numpy_helper.to_array(initializers[weight]))
        q, scale, zero = f"{weight}_int16", f"{weight}_int16_scale", f"{weight}_int16_zero_point"
        model.graph.initializer.remove(initializers[weight])
        model.graph.initializer.extend([numpy_helper.from_array(values, q), numpy_helper.from_array(scales, scale),
                                        numpy_helper.from_array(np.zeros_like(values[0]), zero)])
        x, out = node.input[0], node.output[0]
        lowest, highest = (float(np.ravel(v)[0]) for v in ranges[x].range_value)
        lowest, highest = min(lowest, 0.0), max(highest, 0.0)
        x_scale = max(highest - lowest, 1e-8) / UINT16_MAX
        x_zero = int(round(-lowest / x_scale))
        model.graph.initializer.extend([numpy_helper.from_array(np.array(x_scale, np.float32), f"{x}_scale"),
                                        numpy_helper.from_array(np.array(x_zero, np.uint16), f"{x}_zero_point")])
        new = [_contrib("QuantizeLinear", [x, f"{x}_scale", f"{x}_zero_point"], f"{x}_quantized"),
               _contrib("DequantizeLinear", [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"], f"{x}_dequantized"),
               _contrib("DequantizeLinear", [q, scale, zero], f"{weight}_dequantized", axis=1),
               helper.make_node("MatMul", [f"{x}_dequantized", f"{weight}_dequantized"], [out])]
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, new_node in enumerate(new):
            model.graph.node.insert(index + offset, new_node)


def quantize_qdq(source: Manifest, float_dir: Path, staging: Path, writer: WeightWriter, text_file: Path | None,
                  progress: Callable[[str], None]) -> tuple[dict, dict]:
    """A16W8 QDQ graphs over activation ranges calibrated on real prompts (the module docstring)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    progress("calibration prompts: the model's own text and a retrieval prompt")
    prompts = calibration_prompts(float_dir, CALIBRATION_TOKENS + 1, text_file)
    recorded = record_prefill_inputs(float_dir, prompts, progress)
    graphs = {}
    calibrated_on = source.variant("budget-prefill")
    with tempfile.TemporaryDirectory(prefix="edgekv-quantize-") as work:
        work_dir = Path(work)
        for index, calibrated in enumerate(calibrated_on):
            ranges = calibrate_ranges(float_dir / calibrated.file, recorded.pop(calibrated.name), work_dir)
            tensor_ranges = load_tensors_data(ranges)
            for variant in source.data["variants"]:
                entry = source.variant(variant)[index]
                if entry.name in graphs:  # shared by variants (the first q/k/v graph)
                    continue
                quantized_path = work_dir / f"{entry.name}.onnx"
                quantize_graph(float_dir / entry.file, ranges, quantized_path)
                # onnxruntime moves a model with 16-bit types to opset 21 although its 16-bit Q/DQ are the
                # com.microsoft ones; back to the profile's opset (onnx's converter checks every node).
                model = version_converter.convert_version(onnx.load(quantized_path), source.profile.opset)
                quantize_vocabulary(model, tensor_ranges)
                graphs[entry.name] = {**source.data["graphs"][entry.name], "weights": writer.save(model, staging / entry.file)}
            progress(f"quantized the graphs of step {index + 1}/{len(calibrated_on)} ({calibrated.name})")
    return graphs, {"format": "QDQ", "weights": f"int8 symmetric per output channel (int16: "
                    f"{', '.join(INT16_WEIGHT_PROJECTIONS)}), vocabulary matrix int16 per entry",
                    "activations": f"uint16, MinMax ranges x{ACTIVATION_RANGE_MARGIN} (below "
                    f"{MASSIVE_ACTIVATION_RANGE:g})", "calibration_prompts": [len(p) for p in prompts]}
