"""`edgekv validate`: check an artifact against its manifest and a device profile.

Every violation is collected (not just the first), each naming the file and what is wrong: a file
whose sha256 differs, a symbolic or unknown dimension, an operator outside the profile's list, a
tensor above the profile's size limit, a graph whose inputs differ from the manifest's record or are
not floats of at most three dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from edgekv.core.manifest import GraphEntry, Manifest, verify_files
from edgekv.core.profiles import Profile


@dataclass
class ValidationReport:
    violations: list[str] = field(default_factory=list)
    graphs: int = 0
    operators: set[str] = field(default_factory=set)
    largest_tensor: tuple[int, str] = (0, "")
    weight_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


def _shape(value: onnx.ValueInfoProto) -> list[int | str] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]


def _nbytes(shape: list[int], elem_type: int) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


# onnxruntime's contrib operators that the profiles allow: its 16-bit QuantizeLinear/DequantizeLinear for
# opsets below 21 (what onnxruntime's CPU and QNN providers run) and its CPU weight-only MatMulNBits.
# onnx's shape inference does not know this domain.
CONTRIB_DOMAIN = "com.microsoft"
MAX_INPUT_RANK = 3
CONTRIB_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _inferable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference in which contrib ops are standard ops of the same output shape and dtype:
    Q/DQ are elementwise Casts (QuantizeLinear to its zero point's type, DequantizeLinear to float32);
    MatMulNBits(A[..., K], packed B) is MatMul(A, a [K, N] ConstantOfShape), its N and K attributes."""
    if not any(n.domain == CONTRIB_DOMAIN for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = {t.name: t.data_type for t in copy.graph.initializer}
    nodes = []
    for node in copy.graph.node:
        if node.domain == CONTRIB_DOMAIN and node.op_type in CONTRIB_QDQ:
            to = types[node.input[2]] if node.op_type == "QuantizeLinear" else onnx.TensorProto.FLOAT
            nodes.append(onnx.helper.make_node("Cast", [node.input[0]], list(node.output), to=to))
        elif node.domain == CONTRIB_DOMAIN and node.op_type == "MatMulNBits":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            shape, weight = f"{node.output[0]}.kn_shape", f"{node.output[0]}.kn"
            copy.graph.initializer.append(onnx.numpy_helper.from_array(
                np.array([attributes["K"], attributes["N"]], np.int64), shape))
            nodes += [onnx.helper.make_node("ConstantOfShape", [shape], [weight]),
                      onnx.helper.make_node("MatMul", [node.input[0], weight], list(node.output))]
        else:
            nodes.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _check_graph(manifest: Manifest, graph: GraphEntry, profile: Profile, report: ValidationReport) -> None:
    path = manifest.directory / graph.file
    where = graph.file
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
        inferred = onnx.shape_inference.infer_shapes(_inferable(model), strict_mode=True)
    except Exception as e:  # onnx raises several unrelated types for a bad file
        report.violations.append(f"{where}: not a valid ONNX graph ({str(e).splitlines()[0]})")
        return
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != profile.opset:
        report.violations.append(f"{where}: opset {opsets.get('')} but the profile requires {profile.opset}")
    allowed = set(profile.allowed_ops)
    for op in sorted({n.op_type for n in model.graph.node} - allowed):
        report.violations.append(f"{where}: operator {op} is not in the profile's allowed_ops")
    report.operators |= {n.op_type for n in model.graph.node}

    g = inferred.graph
    # The model's own tensors: not the stand-ins _inferable put in place of contrib ops.
    own = {v.name for v in list(model.graph.input) + list(model.graph.output)} | {
        name for node in model.graph.node for name in node.output}
    values = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info) if v.name in own}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in values:
                report.violations.append(f"{where}: no static shape could be inferred for {name} ({node.op_type})")
    for value in values.values():
        shape = _shape(value)
        if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
            report.violations.append(f"{where}: tensor {value.name} has a non-static shape {shape}")
            continue
        size = _nbytes(shape, value.type.tensor_type.elem_type)
        report.largest_tensor = max(report.largest_tensor, (size, f"{where}:{value.name}"))
        if size > profile.max_tensor_bytes:
            report.violations.append(f"{where}: tensor {value.name} {shape} is {size} bytes, above the profile's "
                                     f"max_tensor_bytes {profile.max_tensor_bytes}")
    for tensor in model.graph.initializer:
        size = _nbytes(list(tensor.dims), tensor.data_type)
        report.largest_tensor = max(report.largest_tensor, (size, f"{where}:{tensor.name}"))
        if size > profile.max_tensor_bytes:
            report.violations.append(f"{where}: weight {tensor.name} {list(tensor.dims)} is {size} bytes, above "
                                     f"the profile's max_tensor_bytes {profile.max_tensor_bytes}")

    for recorded, actual, kind in ((graph.inputs, g.input, "inputs"), (graph.outputs, g.output, "outputs")):
        have = [(v.name, tuple(_shape(v) or ())) for v in actual]
        want = [(t.name, t.shape) for t in recorded]
        if have != want:
            report.violations.append(f"{where}: {kind} {have} differ from the manifest's {want}")
    for spec in graph.inputs:
        # What NPU toolchains take whole (modules.py): RKNN inserts an op before 4-D inputs of few channels,
        # and every toolchain here runs int64 arithmetic on the CPU.
        if len(spec.shape) > MAX_INPUT_RANK or spec.dtype not in ("float32", "float16"):
            report.violations.append(f"{where}: input {spec.name} is {spec.dtype} {list(spec.shape)}; graph inputs "
                                     f"must be float32 or float16 of at most {MAX_INPUT_RANK} dimensions (re-export it)")
    if graph.kind != "qkv":
        k_sel = next((t for t in graph.inputs if t.name == "k_sel"), None)
        if k_sel is None or k_sel.shape[1] != graph.budget:
            report.violations.append(f"{where}: k_sel does not hold the recorded budget of {graph.budget} tokens")


def _check_budgets(manifest: Manifest, profile: Profile, report: ValidationReport) -> None:
    for variant in ("budget-decode", "budget-prefill"):
        prefill = variant.endswith("prefill")
        seq = profile.prefill_chunk if prefill else 1
        for graph in manifest.variant(variant):
            if graph.seq_len != seq:
                report.violations.append(f"{graph.file}: {graph.seq_len} tokens per call, the profile says {seq}")
            if graph.kind != "qkv" and graph.budget != profile.layer_budget(graph.layer, prefill):
                report.violations.append(f"{graph.file}: budget {graph.budget}, the profile gives layer "
                                         f"{graph.layer} {profile.layer_budget(graph.layer, prefill)}")


def validate_artifact(manifest: Manifest, profile: Profile | None = None) -> ValidationReport:
    """All violations of the artifact against its files' hashes and `profile` (default: its own)."""
    profile = profile or manifest.profile
    report = ValidationReport()
    report.violations += verify_files(manifest)
    broken = {v.split(":")[0] for v in report.violations}
    graphs = manifest.graphs
    for graph in graphs.values():
        if graph.file in broken:
            continue
        _check_graph(manifest, graph, profile, report)
    report.graphs = len(graphs)
    report.weight_bytes = sum(w["length"] for w in manifest.data["weights"].values())
    _check_budgets(manifest, profile, report)
    return report
