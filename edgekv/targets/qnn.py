"""Qualcomm Hexagon (QNN HTP) through onnxruntime-qnn: EPContext models compiled ahead of time, and a
backend that runs them.

onnxruntime-qnn is a plugin execution provider: its library is registered with onnxruntime, and
sessions ask for its HTP device. On x86 the HTP backend is a simulator, which stands in for the NPU.
Every graph is compiled with CPU fallback disabled, so a graph either runs whole on the HTP or fails to
compile with QNN's message; the compiled form is onnxruntime's EPContext model, a small .onnx that
points to the QNN context binary (.bin) holding the graph and its weights.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry, Manifest
from edgekv.runtime.backend import OnnxruntimeBackend
from edgekv.targets.common import CompiledGraph, compiled_files, require, rewritten_graph

INSTALL = "pip install 'edgekv[qnn]'"
NAME = "qnn-htp"
_PROCESS_PRECISION: dict[str, str] = {}  # the QNN library's own process-wide state, mirrored (add_htp)


def _qnn():
    return require("onnxruntime_qnn", INSTALL)


def add_htp(options, manifest: Manifest, precision: str) -> None:
    """Put the QNN HTP device on `options`. In float32 on the simulator's default HTP: naming an
    architecture makes it compute in float16 (as v75 hardware does; a layer 1e-3 off against 8e-7
    without). In float16, on the profile's HTP architecture and SoC, which QNN requires together."""
    import onnxruntime as ort

    qnn = _qnn()
    if qnn.EP_NAME not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(qnn.EP_NAME, qnn.get_library_path())
    # The HTP backend keeps the first session's precision for the whole process (measured: a float32
    # session after a float16 one computes in float16), so one process runs one precision.
    first = _PROCESS_PRECISION.setdefault("htp", precision)
    if first != precision:
        raise EdgekvError(f"this process already runs the QNN HTP in {first}, and QNN keeps that for every later "
                          f"session; run the {precision} graphs in another process")
    profile = manifest.profile
    provider = {"backend_path": qnn.get_qnn_htp_path(), "enable_htp_fp16_precision": "0"}
    if precision == "float16":
        provider |= {"htp_arch": str(profile.qnn_htp_arch), "soc_model": str(profile.qnn_soc_model),
                     "enable_htp_fp16_precision": "1"}
    options.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == qnn.EP_NAME], provider)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.log_severity_level = 3  # the EP warns at every session about features of other platforms


def batch_matmul_nbits(model) -> None:
    """Give every MatMulNBits (the weight-only artifacts' 4- and 8-bit kernels) a 3-D input, [1, S, K]
    instead of edgekv's [S, K], in place: QNN's builder takes only 3-D ones ("Unsupported input A rank,
    expecting 3D shape") and then keeps the weights as 4-bit blocks on the HTP."""
    from onnx import helper, numpy_helper

    axes = "batch_matmul_nbits_axes"
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            batched_in, output = f"{node.input[0]}_batched_{node.name}", node.output[0]
            nodes.append(helper.make_node("Unsqueeze", [node.input[0], axes], [batched_in], name=f"{node.name}_batch"))
            node.input[0], node.output[0] = batched_in, f"{output}_batched"
            nodes += [node, helper.make_node("Squeeze", [node.output[0], axes], [output], name=f"{node.name}_unbatch")]
        else:
            nodes.append(node)
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def compile_graph(manifest: Manifest, graph: GraphEntry, out_dir: Path, precision: str) -> CompiledGraph:
    """The graph's EPContext model and context binary, every node placed on the HTP. In float16 its
    RMSNorms are rewritten first so that massive activations do not overflow them (float16_norm.py), and
    weight-only kernels take 3-D inputs (batch_matmul_nbits)."""
    import onnx  # here, not at the top: running a compiled artifact does not need onnx
    import onnxruntime as ort

    from edgekv.targets.float16_norm import rewrite_rms_norms

    options = ort.SessionOptions()
    add_htp(options, manifest, precision)
    model_path = out_dir / f"{graph.name}_ctx.onnx"
    hidden = manifest.model["hidden"]
    weight_only = manifest.data.get("quantization", {}).get("format") == "MatMulNBits"

    def rewrite(model, _) -> None:
        if precision == "float16":
            rewrite_rms_norms(model, hidden)
        if weight_only:
            batch_matmul_nbits(model)
    # Graphs with nothing to rewrite are compiled from the artifact's own file.
    needs_rewrite = precision == "float16" or weight_only
    with rewritten_graph(manifest, graph, "htp", rewrite if needs_rewrite else None) as (source_path, proto):
        try:
            # onnxruntime's own graph optimizations first, as a session does (the compiler's default skips
            # them): without them QNN fails to finalize even the first q/k/v graph (QNN_COMMON_ERROR_MEM_ALLOC).
            ort.ModelCompiler(options, str(source_path), embed_compiled_data_into_model=False,
                              graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                              ).compile_to_file(str(model_path))
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
            raise EdgekvError(f"QNN HTP could not compile {graph.file}: {str(e).strip().splitlines()[0]}") from None
    files = [model_path] + sorted(p for p in out_dir.glob(f"{graph.name}_*.bin"))
    # What the HTP took is inside the EPContext nodes; any other node of the compiled model runs on the host.
    compiled = onnx.load(str(model_path), load_external_data=False).graph.node
    on_host = Counter(node.op_type for node in compiled if node.op_type != "EPContext")
    source = Counter(node.op_type for node in proto.graph.node)
    placement = {f"{op}@device": n - on_host[op] for op, n in source.items() if n > on_host[op]}
    placement |= {f"{op}@host": n for op, n in on_host.items()}
    profile = manifest.profile
    device = "HTP" if precision == "float32" else f"HTP v{profile.qnn_htp_arch} (SoC {profile.qnn_soc_model})"
    return CompiledGraph(files, placement, device)


def open_backend(manifest: Manifest, threads: int = 0) -> OnnxruntimeBackend:
    """onnxruntime over the compiled EPContext models on the HTP (no shared weights: the context binaries
    hold them)."""
    files = {name: paths[0] for name, paths in compiled_files(manifest, NAME).items()}
    precision = manifest.data["compiled"][NAME]["precision"]
    return OnnxruntimeBackend(manifest, {}, [], threads, graph_files=files,
                              configure=lambda options: add_htp(options, manifest, precision))
