"""Vendor targets: `edgekv compile` with the toolchains that install from the registry (QNN's HTP simulator
through onnxruntime-qnn, OpenVINO's CPU plugin, rknn-toolkit2's simulator in its own environment, which
scripts/setup.sh makes), their backends against onnxruntime's CPU provider, and the errors."""

import json
import shutil

import numpy as np
import pytest

from conftest import error_line, greedy_logits, run_edgekv
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import load_verified
from edgekv.targets.common import require
from edgekv.core import constants
from edgekv.targets.registry import BACKENDS, COMPILERS

PROMPT = list(np.random.default_rng(5).integers(3, 300, 90))  # a prefill chunk and a left-padded one
STEPS = 6


@pytest.fixture(scope="module")
def compiled(tiny_artifacts, tmp_path_factory):
    """The tiny Llama artifact compiled for every target, through the CLI. QNN in float16: in float32 the
    simulator fails to finalize the tiny model's 64-token graphs (QNN_COMMON_ERROR_MEM_ALLOC), not the
    default model's (test_htp_runs_the_default_models_graphs_in_float32)."""
    artifact = tmp_path_factory.mktemp("compiled") / "llama"
    shutil.copytree(tiny_artifacts["llama"], artifact)
    outputs = {}
    for target, precision in (("openvino", "float32"), ("qnn-htp", "float16"), ("rknn-rk3588", "float16")):
        result = run_edgekv("compile", str(artifact), "--target", target, "--precision", precision, check=True)
        outputs[target] = result.stdout
    return artifact, outputs


def test_openvino_sends_no_telemetry(tiny_artifacts, tmp_path):
    """OpenVINO's telemetry, on unless declined, keeps a client id under ~/intel and sends usage data from
    a forked process; edgekv blocks it: a compile leaves no ~/intel."""
    artifact, home = tmp_path / "llama", tmp_path / "home"
    shutil.copytree(tiny_artifacts["llama"], artifact)
    home.mkdir()
    run_edgekv("compile", str(artifact), "--target", "openvino", check=True, env={"HOME": str(home)})
    assert not (home / "intel").exists()


def test_compile_records_every_graph_with_its_placement(compiled):
    artifact, outputs = compiled
    manifest = load_verified(artifact)  # the compiled files' sha256 are in the manifest and hold
    for target in ("openvino", "qnn-htp", "rknn-rk3588"):
        record = manifest.data["compiled"][target]
        assert set(record["graphs"]) == set(manifest.graphs)
        for name, graph in record["graphs"].items():
            assert graph["files"] and all(f in manifest.data["files"] for f in graph["files"])
            assert graph["placement"]
            # Everything on the device; RKNN runs the softmax of its largest-budget prefill graphs on its CPU.
            if target != "rknn-rk3588" or manifest.graphs[name].seq_len == 1:
                assert not [key for key in graph["placement"] if key.endswith("@host")], (target, name)
        assert f"compiled {len(manifest.graphs)} graphs for {target}" in outputs[target]
    assert not list((artifact / "graphs").glob(".*"))  # the rewritten graphs the toolchains read are gone


@pytest.mark.parametrize("backend, tolerance", [("openvino", 1e-4), ("qnn-htp", 2e-2), ("rknn", 2e-2)])
def test_backend_gives_the_cpu_providers_tokens(compiled, backend, tolerance):
    artifact, _ = compiled
    cpu, other = greedy_logits(artifact, PROMPT, STEPS), greedy_logits(artifact, PROMPT, STEPS, backend)
    assert (cpu.argmax(-1) == other.argmax(-1)).all()
    assert np.abs(cpu - other).max() < tolerance


def test_a_modified_compiled_file_is_refused_naming_compile(compiled, tmp_path):
    artifact, _ = compiled
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    victim = copy / manifest["compiled"]["openvino"]["graphs"]["qkv.s1"]["files"][1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    line = error_line(run_edgekv("generate", str(copy), "--prompt", "Hi", "--max-new-tokens", "1"))
    assert "compiled/openvino/qkv.s1.bin: sha256 differs" in line and f"edgekv compile {copy} --target openvino" in line


def test_rknn_refuses_float32_naming_float16(tiny_artifacts):
    line = error_line(run_edgekv("compile", str(tiny_artifacts["llama"]), "--target", "rknn-rk3588",
                                 "--precision", "float32"))
    assert "float16 only" in line and "--precision float16" in line


def test_rknn_without_its_environment_names_install_rknn(tiny_artifacts, tmp_path):
    result = run_edgekv("compile", str(tiny_artifacts["llama"]), "--target", "rknn-rk3588",
                        env={"EDGEKV_RKNN_PYTHON": str(tmp_path / "none" / "python")})
    assert "rknn-toolkit2 toolchain is not installed" in error_line(result) and "edgekv install-rknn" in result.stderr


# float16 on the HTP: the suite's processes run it in float16 (one precision per process)
@pytest.mark.parametrize("target, precision", [("openvino", "float32"), ("qnn-htp", "float16"),
                                               ("rknn-rk3588", "float16")])
def test_a_graph_the_toolchain_rejects_is_named_with_its_message(tiny_artifacts, tmp_path, target, precision):
    """A graph with an operator no toolchain has (a custom domain's): the error names the graph's file and
    carries the toolchain's own message."""
    import onnx
    from onnx import TensorProto, helper

    from edgekv.core.manifest import GraphEntry, TensorSpec
    from edgekv.targets.registry import compiler

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="edgekv.test")
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in "xy")
    model = helper.make_model(helper.make_graph([node], "bad", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgekv.test", 1)])
    (tmp_path / "graphs").mkdir()
    onnx.save(model, tmp_path / "graphs" / "bad.onnx")
    manifest = load_verified(tiny_artifacts["llama"])
    manifest = type(manifest)(tmp_path, manifest.data)
    spec = TensorSpec("x", (1, 4), "float32")
    graph = GraphEntry("bad", "graphs/bad.onnx", "layer", 0, 1, 0, (spec,), (TensorSpec("y", (1, 4), "float32"),), ())
    with compiler(target) as compile_graph, pytest.raises(EdgekvError) as failure:
        compile_graph(manifest, graph, tmp_path, precision)
    message = str(failure.value)
    assert " could not " in message and "graphs/bad.onnx: " in message, message
    assert len(message.split("graphs/bad.onnx: ", 1)[1]) > 10, message  # the toolchain's own words follow


def test_a_backend_without_its_compile_names_the_command(tiny_artifacts):
    line = error_line(run_edgekv("generate", str(tiny_artifacts["llama"]), "--prompt", "Hi", "--backend", "openvino"))
    assert "no graphs compiled for openvino" in line and "--target openvino" in line


def test_a_missing_toolchain_names_its_install_command():
    with pytest.raises(EdgekvError, match=r"not installed; install it with `pip install 'edgekv\[x\]'`"):
        require("edgekv_no_such_toolchain", "pip install 'edgekv[x]'")


def test_the_core_names_the_registrys_targets_and_backends():
    # The core's names (profiles and CLI choices check against them) and the registry must not drift apart.
    assert constants.TARGETS == tuple(COMPILERS)
    assert constants.BACKENDS == tuple(BACKENDS)


def test_an_unknown_target_lists_the_targets(tiny_artifacts):
    result = run_edgekv("compile", str(tiny_artifacts["llama"]), "--target", "tpu")
    assert result.returncode != 0 and "'qnn-htp', 'openvino'" in result.stderr


def test_htp_in_float16_projects_q_and_k_as_float32_does(default_artifact):
    """RoPE is the host's: no graph takes a position, so the HTP simulator running a graph in float16 gives
    q and k within 1% of their largest value of onnxruntime's float32, whatever the position (in-graph RoPE
    was off by 6.7 at position 5000)."""
    import onnxruntime as ort

    from edgekv.runtime.backend import OnnxruntimeBackend
    from edgekv.targets.qnn import add_htp

    manifest = load_verified(default_artifact)
    cpu = OnnxruntimeBackend.open(manifest)
    rng = np.random.default_rng(5)
    for name in ("qkv.s1", "layer05.s1.b512"):
        graph = manifest.graphs[name]
        assert {spec.name for spec in graph.inputs} <= {"hidden_in", "q_in", "k_sel", "v_sel", "mask"}
        feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in graph.inputs}
        if "mask" in feeds:
            feeds["mask"] = np.where(rng.random(feeds["mask"].shape) < 0.6, 0.0, -65504.0).astype(np.float32)
        options = ort.SessionOptions()
        add_htp(options, manifest, "float16")
        htp = ort.InferenceSession(str(default_artifact / graph.file), options)
        names = ["q_out", "k_out"]
        for want, got in zip(cpu.session(graph).run(names, feeds), htp.run(names, feeds)):
            assert np.abs(want - got).max() < 1e-2 * np.abs(want).max(), name


def test_rknn_in_float16_projects_q_and_k_as_float32_does(default_artifact, tmp_path):
    """The same on rknn-toolkit2's simulator (in-graph RoPE was off by 4.5 at position 5000)."""
    from edgekv.runtime.backend import OnnxruntimeBackend
    from edgekv.targets.rknn import RknnBackend, Worker

    manifest = load_verified(default_artifact)
    graph = manifest.graphs["qkv.s1"]
    rng = np.random.default_rng(3)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in graph.inputs}
    want = {spec.name: np.zeros(spec.shape, np.float32) for spec in graph.outputs}
    got = {name: np.zeros_like(array) for name, array in want.items()}
    cpu_run = OnnxruntimeBackend.open(manifest).bind(graph, feeds, want)
    # A board loads the .rknn file; the simulator builds the graph from its ONNX file.
    rknn = RknnBackend(manifest, Worker.start(), {graph.name: [tmp_path / "unused.rknn"]}, tmp_path)
    try:
        rknn_run = rknn.bind(graph, feeds, got)
        cpu_run()
        rknn_run()
        for name in ("q_out", "k_out"):
            assert np.abs(want[name] - got[name]).max() < 1e-2 * np.abs(want[name]).max(), name
    finally:
        rknn.close()


FLOAT32_HTP_CHECK = """
import sys
import numpy as np
import onnxruntime as ort
from edgekv.core.manifest import load_verified
from edgekv.runtime.backend import OnnxruntimeBackend
from edgekv.targets.qnn import add_htp

manifest = load_verified(sys.argv[1])
cpu = OnnxruntimeBackend.open(manifest)
rng = np.random.default_rng(0)
for name in ("qkv.s64", "layer05.s1.b512", "head.s1.b512"):
    graph = manifest.graphs[name]
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in graph.inputs}
    options = ort.SessionOptions()
    add_htp(options, manifest, "float32")
    htp = ort.InferenceSession(str(manifest.directory / graph.file), options)
    print(name, max(float(np.abs(a - b).max()) for a, b in zip(cpu.session(graph).run(None, feeds), htp.run(None, feeds))))
"""


def test_htp_runs_the_default_models_graphs_in_float32(default_artifact):
    """The float32 HTP simulator, whole graphs (no CPU fallback), against onnxruntime's CPU provider. In a
    process of its own: the HTP keeps the first session's precision, and other tests run it in float16."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FLOAT32_HTP_CHECK, str(default_artifact)], capture_output=True,
                            text=True, check=True)
    differences = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("qkv", "layer", "head")))
    assert len(differences) == 3 and all(float(d) < 1e-4 for d in differences.values()), differences


def test_one_process_runs_one_htp_precision(default_artifact):
    import onnxruntime as ort

    from edgekv.targets.qnn import add_htp

    manifest = load_verified(default_artifact)
    add_htp(ort.SessionOptions(), manifest, "float16")
    with pytest.raises(EdgekvError, match="already runs the QNN HTP in float16"):
        add_htp(ort.SessionOptions(), manifest, "float32")


def massive_activation_feeds(graph, seed: int) -> dict[str, np.ndarray]:
    """Random inputs whose hidden rows carry SmolLM2's massive activation (2.5e4 in one channel of one row,
    as its first token has from layer 11 on)."""
    rng = np.random.default_rng(seed)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in graph.inputs}
    feeds["hidden_in"][0, 7] = 2.5e4
    if "mask" in feeds:
        feeds["mask"][:] = 0.0
    return feeds


def test_the_float16_norm_is_the_models_norm_on_the_cpu(tiny_artifacts):
    import onnx
    import onnxruntime as ort

    from edgekv.targets.float16_norm import rewrite_rms_norms

    manifest = load_verified(tiny_artifacts["llama"])
    for graph in manifest.graphs.values():
        proto = onnx.load(str(manifest.directory / graph.file))
        original = ort.InferenceSession(proto.SerializeToString())
        norms = {"qkv": 1, "layer": 2, "head": 2}[graph.kind]  # input norm; post-attention + next input / final
        assert rewrite_rms_norms(proto, manifest.model["hidden"]) == norms
        ops = {node.op_type for node in proto.graph.node}
        assert {"Abs", "ReduceMax"} <= ops
        feeds = massive_activation_feeds(graph, 1)
        for want, got in zip(original.run(None, feeds), ort.InferenceSession(proto.SerializeToString()).run(None, feeds)):
            assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max(), graph.name


def test_the_per_head_output_projection_is_the_same_product_on_the_cpu(tiny_artifacts):
    import onnx
    import onnxruntime as ort

    from edgekv.targets.per_head_output import rewrite_output_projections

    manifest = load_verified(tiny_artifacts["qwen2"])  # grouped-query attention, biases on q/k/v
    model = manifest.model
    for graph in manifest.graphs.values():
        path = manifest.directory / graph.file
        proto = onnx.load(str(path), load_external_data=False)
        rewritten = rewrite_output_projections(proto, path.parent, model["q_heads"], model["head_dim"])
        assert rewritten == (graph.kind != "qkv"), graph.name
        onnx.load_external_data_for_model(proto, str(path.parent))
        feeds = massive_activation_feeds(graph, 3)
        want = ort.InferenceSession(str(path)).run(None, feeds)
        got = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
        assert all(np.abs(w - g).max() <= 1e-5 * np.abs(w).max() for w, g in zip(want, got)), graph.name
        assert "ReduceSum" in {node.op_type for node in proto.graph.node} or graph.kind == "qkv"


def test_htp_in_float16_normalizes_a_massive_activation(default_artifact):
    """The model's own RMSNorm squares 2.5e4 past float16's range on the HTP and normalizes that row to
    garbage; the rewritten norm (the float16 compile's) keeps the layer within float16's rounding."""
    import onnx
    import onnxruntime as ort

    from edgekv.runtime.backend import OnnxruntimeBackend
    from edgekv.targets.float16_norm import rewrite_rms_norms
    from edgekv.targets.qnn import add_htp

    manifest = load_verified(default_artifact)
    graph = manifest.graphs["layer05.s1.b512"]
    feeds = massive_activation_feeds(graph, 2)
    cpu = OnnxruntimeBackend.open(manifest)  # its sessions read its weights: keep it alive
    want = cpu.session(graph).run(None, feeds)
    proto = onnx.load(str(default_artifact / graph.file))
    errors = {}
    for form in ("model's", "float16-safe"):
        if form == "float16-safe":
            rewrite_rms_norms(proto, manifest.model["hidden"])
        options = ort.SessionOptions()
        add_htp(options, manifest, "float16")
        got = ort.InferenceSession(proto.SerializeToString(), options).run(None, feeds)
        # relative to each output's largest value: hidden_out keeps the 2.5e4, q/k/v are O(10)
        errors[form] = [float(np.abs(w - g).max() / np.abs(w).max()) for w, g in zip(want, got)]
    assert max(errors["float16-safe"]) < 5e-3, errors
    assert max(errors["model's"]) > 0.1, errors  # what the rewrite is for
