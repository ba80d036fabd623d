"""Weight-only artifacts for CPU profiles (8-bit and 4-bit): onnxruntime's MatMulNBits kernels."""

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import error_line, greedy_logits, run_edgekv
from edgekv.calibration.block_offsets import dequantize_offset_blocks, offset_blocks, rewrite_offset_int4
from edgekv.calibration.weight_only import (INT4_FORMAT, INT8_FORMAT, SMALL_BLOCK, formats_by_node, int8_rounding_error,
                                           quantize_rows, split_activation_rows)
from edgekv.core.manifest import load_verified
from edgekv.core.profiles import load_profile
from edgekv.evaluation.evaluate import EvalRun, forced_logits
from edgekv.export.validator import validate_artifact
from edgekv.runtime.embedding import Embedding


@pytest.fixture(scope="module")
def tiny_weight_only(tiny_model_dirs, tmp_path_factory):
    from edgekv.calibration.int8_export import export_for_profile

    out = tmp_path_factory.mktemp("tiny-weight-only") / "llama-cpu"
    return export_for_profile(str(tiny_model_dirs["llama"]), "cpu", out, progress=lambda _: None,
                              quantize="int8-weight-only").directory


def kernel_formats(artifact) -> dict[str, tuple[int, int, bool]]:
    """(bits, block_size, has zero points) of every MatMulNBits node, by the float weight it replaced; no MatMul by a weight left."""
    manifest = load_verified(artifact)
    assert manifest.data["quantization"]["format"] == "MatMulNBits"
    formats = {}
    for entry in manifest.graphs.values():
        model = onnx.load(artifact / entry.file, load_external_data=False)
        weights = {t.name for t in model.graph.initializer}
        # No MatMul by a float weight, the blocks' middles (block_offsets.py) apart
        assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
                    and not n.input[1].endswith("_middles")], entry.name
        kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert kernels, entry.name
        for node in kernels:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            formats[re.sub(r"_(Q\d|codes)$", "", node.input[1])] = (attributes["bits"], attributes["block_size"],
                                                          len(node.input) > 3)
    # The variants of a step share one stored copy of each quantized weight.
    for index in range(manifest.model["layers"] + 1):
        used = {tuple(sorted(manifest.variant(v)[index].weights)) for v in manifest.data["variants"]}
        assert len(used) == 1
    return formats


def test_every_projection_is_matmulnbits_over_8bit_blocks(tiny_weight_only):
    formats = kernel_formats(tiny_weight_only)
    assert set(formats.values()) == {(8, INT8_FORMAT.block_size, False)}
    # Siblings of one input and one format are one kernel call: q, k and v; gate and up
    layers = load_verified(tiny_weight_only).model["layers"]
    assert len([w for w in formats if re.search(r"q_proj.*\+.*k_proj.*\+.*v_proj", w)]) == layers
    assert len([w for w in formats if re.search(r"gate_proj.*\+.*up_proj", w)]) == layers
    stored = load_verified(tiny_weight_only).data["weights"]
    assert {e["dtype"] for n, e in stored.items() if n.endswith("_Q8")} == {"uint8"}


def test_int4_keeps_the_lm_head_queries_and_keys_8bit(tiny_int4):
    formats = kernel_formats(tiny_int4)
    layers = load_verified(tiny_int4).model["layers"]
    eight = {w for w, form in formats.items() if form == (8, INT8_FORMAT.block_size, False)}
    # The tied LM head (the embedding table, transposed) and every layer's q_proj and k_proj, as one kernel
    assert len([w for w in eight if re.search(r"q_proj.*\+.*k_proj", w)]) == layers
    assert len(eight) == layers + 1
    assert {w for w in eight if "proj" not in w} and all(any(p in w for p in INT4_FORMAT.eight_bit) for w in eight)
    # The rest: codes about the block's middle (the default zero point), the offsets added through the block sums
    assert {formats[w] for w in set(formats) - eight} == {(4, INT4_FORMAT.block_size, False)}
    assert len([w for w in set(formats) - eight if re.search(r"gate_proj.*\+.*up_proj", w)]) == layers
    assert not [w for w in set(formats) - eight if "q_proj" in w or "k_proj" in w]
    # Two 4-bit weights a byte: a block of input channels is block_size / 2 bytes
    q4 = [e for n, e in load_verified(tiny_int4).data["weights"].items() if n.endswith("_codes")]
    assert q4 and {e["dtype"] for e in q4} == {"uint8"}
    assert all(e["shape"][-1] == INT4_FORMAT.block_size // 2 for e in q4)


def resident_kib(paths: set[Path]) -> int:
    """KiB of this process's mappings of `paths` that sit in its memory (/proc/self/smaps)."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address range, perms, ..., [path]
            counting = len(fields) == 6 and Path(fields[5]) in paths
        elif counting and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_the_embedding_is_the_tied_heads_8bit_rows(tiny_int4, tiny_artifacts):
    """No float32 table in a weight-only artifact: the host looks rows up in the LM head's own 8-bit codes
    and scales (tied embeddings), stored once, within the 8-bit rounding of the float32 rows."""
    manifest, float_manifest = load_verified(tiny_int4), load_verified(tiny_artifacts["llama"])
    record = manifest.data["embedding"]
    head = next(e for e in manifest.graphs.values() if e.kind == "head")
    assert record["weight"] in head.weights and manifest.data["weights"][record["weight"]]["dtype"] == "uint8"
    assert not [name for name, entry in manifest.data["weights"].items() if entry["dtype"] == "float32"
                and entry["shape"] == [manifest.model["vocab"], manifest.model["hidden"]]]
    ids = np.arange(64, dtype=np.int64) * 5 % manifest.model["vocab"]
    got, want = (np.zeros((64, manifest.model["hidden"]), np.float32) for _ in range(2))
    Embedding.open(manifest).lookup(ids, got)
    Embedding.open(float_manifest).lookup(ids, want)
    assert np.abs(got - want).max(axis=1).max() <= np.abs(want).max() / 127  # half a step of 8-bit blocks, at most
    assert not np.array_equal(got, want)


def test_packed_sessions_return_the_mapped_weights(tiny_int4):
    from edgekv.runtime.engine import Engine

    manifest = load_verified(tiny_int4)
    layer_files = {(tiny_int4 / e["file"]).resolve() for e in manifest.data["weights"].values()
                   if "layer" in e["file"]}
    engine = Engine.open(tiny_int4, "quest")
    try:
        assert engine.cache.pool.format.kv_dtype == "int8"  # the cpu profile's pages
        assert set(engine.backend.weights) == {w for g in manifest.graphs.values() for w in g.weights}
        engine.prefill(list(range(3, 100)))
        engine.decode(5)
        # MatMulNBits runs on the copies it packed: the layers' weight files are mapped, not resident
        assert engine.backend.mapped_files and resident_kib(layer_files) == 0
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tiny_cpu_float(tiny_model_dirs, tmp_path_factory):
    """The cpu profile's float32 graphs of the tiny Llama, the LM head's weight on the right: what export
    quantizes."""
    from edgekv.export.exporter import write_float_artifact
    from edgekv.export.models import load_model

    out = tmp_path_factory.mktemp("tiny-cpu-float") / "llama-cpu-float32"
    write_float_artifact(load_model(str(tiny_model_dirs["llama"]), lambda _: None), load_profile("cpu"), out, None,
                         head_weight_on_right=True)
    return out


@pytest.fixture(scope="module")
def tiny_int4(tiny_cpu_float):
    from edgekv.calibration.int8_export import quantize_artifact

    out = tiny_cpu_float.with_name("llama-cpu-int4")
    quantize_artifact(tiny_cpu_float, out, "int4-weight-only", progress=lambda _: None)
    return out


@pytest.fixture(scope="module")
def tiny_int4_split(tiny_model_dirs, tmp_path_factory):
    from edgekv.calibration.int8_export import export_for_profile

    # The cpu profile quantizes by default (its weight_dtype), as `edgekv export --profile cpu` does.
    assert load_profile("cpu").weight_dtype == "int4-split-activations"
    out = tmp_path_factory.mktemp("tiny-int4-split") / "llama-cpu-int4-split"
    return export_for_profile(str(tiny_model_dirs["llama"]), "cpu", out, progress=lambda _: None).directory


@pytest.mark.parametrize("dtype, tolerance", [("int8-weight-only", 0.05), ("int4-weight-only", 0.2),
                                              ("int4-split-activations", 0.2)])
def test_weight_only_artifact_validates_and_tracks_float32(dtype, tolerance, tiny_weight_only, tiny_int4,
                                                           tiny_int4_split, tiny_artifacts):
    artifact = {"int8-weight-only": tiny_weight_only, "int4-weight-only": tiny_int4,
                "int4-split-activations": tiny_int4_split}[dtype]
    assert validate_artifact(load_verified(artifact)).ok
    tokens = list(range(3, 200))
    # The tiny float artifact is npu-small's, whose KV side the cpu profile shares but for its INT8 pages:
    # with float32 pages only the weights differ.
    got = forced_logits(artifact, EvalRun("quest", None), tokens, 32, kv_dtype="float32")[0]
    want = forced_logits(tiny_artifacts["llama"], EvalRun("quest", None), tokens, 32)[0]
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert relative < tolerance, relative


@pytest.mark.parametrize("dtype", ["int8-weight-only", "int4-weight-only"])
def test_npu_profile_refuses_weight_only_kernels(dtype, tiny_model_dirs, tmp_path):
    result = run_edgekv("export", "--model", str(tiny_model_dirs["llama"]), "--profile", "npu-small",
                        "--quantize", dtype, "--out", str(tmp_path / "out"))
    last = error_line(result)
    assert "MatMulNBits" in last and "cpu" in last
    assert not (tmp_path / "out").exists()


def test_cpu_profile_without_reducesum_is_pointed_to_int8(tmp_path):
    from edgekv.calibration.int8_export import check_profile_allows
    from edgekv.core.errors import EdgekvError

    shipped = Path(__file__).parents[1] / "edgekv" / "device_profiles" / "cpu.toml"
    custom = tmp_path / "my-cpu.toml"
    custom.write_text(shipped.read_text().replace('"ReduceSum", ', ""))
    profile = load_profile(str(custom))
    check_profile_allows(profile, "int8-weight-only")
    with pytest.raises(EdgekvError, match="ReduceSum.*--quantize int8-weight-only"):
        check_profile_allows(profile, "int4-weight-only")


def test_calibration_text_with_weight_only_is_refused(tiny_model_dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Weight-only graphs calibrate nothing on activations. " * 200)
    result = run_edgekv("export", "--model", str(tiny_model_dirs["llama"]), "--profile", "cpu",
                        "--calibration-text", str(text), "--out", str(tmp_path / "out"))
    last = error_line(result)
    assert "--calibration-text" in last and "int4-split-activations" in last  # the profile's weight_dtype
    assert "loading model" not in result.stderr  # refused before the model is loaded
    assert not (tmp_path / "out").exists()


def test_offset_blocks_hold_q4_1_weights_exactly():
    """Weights made as Q4_1 makes them (a scale and a float offset per block of 32) come back exactly."""
    rng = np.random.default_rng(0)
    k, n, block = 96, 40, INT4_FORMAT.block_size
    codes = rng.integers(0, 16, (k // block, block, n))
    codes[:, 0], codes[:, 1] = 0, 15  # Q4_1 puts a block's min at code 0 and its max at 15
    scale = rng.uniform(1e-3, 1e-2, (k // block, 1, n)).astype(np.float16).astype(np.float32)
    offset = rng.uniform(-0.1, 0.0, (k // block, 1, n)).astype(np.float16).astype(np.float32)
    weight = (scale * codes + offset).reshape(k, n)
    np.testing.assert_allclose(dequantize_offset_blocks(*offset_blocks(weight, block)), weight, atol=1e-7)


def one_matmul(weight: np.ndarray, shape: tuple[int, ...]) -> onnx.ModelProto:
    """y = x [shape] @ proj.weight, in float32."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "proj.weight"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], weight.shape[1]])],
                              [numpy_helper.from_array(weight, "proj.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def one_kernel(weight: np.ndarray, shape: tuple[int, ...], bits: int, accuracy_level: int) -> onnx.ModelProto:
    """one_matmul as onnxruntime's quantizer makes it: one MatMulNBits kernel."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(one_matmul(weight, shape), bits=bits, block_size=32, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    return quantizer.model.model


def run_model(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_offset_int4_graph_equals_its_reference():
    """onnxruntime's result of the rewritten MatMul is x @ the dequantized weight (rank-3 input, as the graphs')."""
    rng = np.random.default_rng(1)
    k, n, block = 128, 48, INT4_FORMAT.block_size
    weight = rng.standard_normal((k, n)).astype(np.float32)
    model = one_matmul(weight, (1, 5, k))
    rewrite_offset_int4(model, block, 0, set(), {})
    assert [node.op_type for node in model.graph.node] == ["Reshape", "ReduceSum", "MatMulNBits", "MatMul", "Add"]
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    got = run_model(model, x)[0]
    want = x @ dequantize_offset_blocks(*offset_blocks(weight, block))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(got - x @ weight) / np.linalg.norm(x @ weight) < 0.15  # 4 bits of a Gaussian


def test_each_weight_gets_its_formats_variant():
    """The 8-bit weights named in float_activations or small_blocks get INT8_FORMAT's variant, the other
    kept ones INT8_FORMAT, and the rest the format's own bits (the benchmark's variants)."""
    matmuls = {"qk": "layers.0.q_proj.weight+layers.0.k_proj.weight", "v": "layers.0.v_proj.weight",
               "head": "lm_head.weight", "mlp": "layers.0.gate_proj.weight+layers.0.up_proj.weight"}
    kept = {"qk", "head"}
    form = replace(INT4_FORMAT, float_activations=("lm_head",), small_blocks=("q_proj",), offsets=False)
    got = {frozenset(names): part for part, names in formats_by_node(form, matmuls, kept)}
    assert got[frozenset({"v", "mlp"})] == form
    assert got[frozenset({"head"})] == replace(INT8_FORMAT, accuracy_level=0)
    assert got[frozenset({"qk"})] == replace(INT8_FORMAT, block_size=SMALL_BLOCK)
    assert got[frozenset()] == INT8_FORMAT  # no other kept weight
    assert {part for part, names in formats_by_node(INT4_FORMAT, matmuls, kept) if names} == {INT4_FORMAT,
                                                                                              INT8_FORMAT}


@pytest.mark.parametrize("shape", [(3, 64), (1, 3, 64)])
def test_split_activations_give_the_float_activation_product(shape):
    """A kernel fed x and x's int8 rounding error as two rows returns, to about 1/127 of the int8
    kernel's error, what the kernel returns with float32 activations (accuracy level 0); the graph's
    rounding error is its numpy reference. Outliers, as the model's massive activations, widen blocks."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1, 64)[:, [5, 40]] = [30.0, -50.0]

    def kernel(accuracy_level: int, split: bool) -> np.ndarray:
        model = one_kernel(weight, shape, 8, accuracy_level)
        if split:
            split_activation_rows(model, ("proj",))
            model.graph.output.append(helper.make_tensor_value_info("x/rows32", TensorProto.FLOAT, [2, *shape]))
        outputs = run_model(model, x)
        if split:
            np.testing.assert_array_equal(outputs[1][0], x)
            np.testing.assert_allclose(outputs[1][1], int8_rounding_error(x, 32), atol=1e-6)
        return outputs[0]

    exact, int8, split = kernel(0, False), kernel(4, False), kernel(4, True)
    assert split.shape == exact.shape
    int8_error, split_error = np.abs(int8 - exact).max(), np.abs(split - exact).max()
    assert int8_error > 1e-3
    assert split_error < int8_error / 30


@pytest.mark.parametrize("rows", [1, 3])
def test_chunks_at_level0_give_4bit_chunks_float_activations_and_rows_their_split(rows):
    """With chunks_at_level0 a 4-bit kernel of more than one row (a prefill chunk) runs at accuracy level 0,
    the product the split approximates; a one-row kernel (decode) still takes two rows."""
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)

    def kernel(accuracy_level: int, chunks_at_level0: bool | None) -> tuple[np.ndarray, onnx.ModelProto]:
        model = one_kernel(weight, x.shape, 4, accuracy_level)
        if chunks_at_level0 is not None:
            split_activation_rows(model, ("proj",), chunks_at_level0)
        return run_model(model, x)[0], model

    exact, _ = kernel(0, None)
    got, model = kernel(4, True)
    split = any(n.op_type == "Concat" for n in model.graph.node)
    assert split == (rows == 1)
    if rows > 1:
        np.testing.assert_array_equal(got, exact)
    else:
        assert np.abs(got - exact).max() < np.abs(kernel(4, None)[0] - exact).max() / 30


def test_fused_siblings_give_the_same_products_and_codes():
    """Three MatMuls of one input (q, k and v) and one of another: q and k, both 8-bit, become one MatMul
    and a Split; v (4-bit) and the other input stay alone. The outputs are the same, and quantizing the
    fused weight gives each part's own MatMulNBits codes (every output column is quantized on its own)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekv.calibration.weight_only import fuse_sibling_matmuls

    rng = np.random.default_rng(2)
    widths = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64}
    weights = {name: rng.standard_normal((64, n)).astype(np.float32) for name, n in widths.items()}
    nodes = [helper.make_node("MatMul", ["z" if name == "o_proj" else "x", f"{name}.weight"], [name], name=name)
             for name in widths]
    inputs = [helper.make_tensor_value_info(i, TensorProto.FLOAT, [3, 64]) for i in "xz"]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3, n]) for name, n in widths.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(w, f"{name}.weight") for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {i: rng.standard_normal((3, 64)).astype(np.float32) for i in "xz"}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    want = run(model)
    fuse_sibling_matmuls(model, INT4_FORMAT.eight_bit)
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Split", "MatMul", "MatMul"]
    fused = "q_proj.weight+k_proj.weight"
    assert {t.name for t in model.graph.initializer} >= {fused, "v_proj.weight", "o_proj.weight"}
    for got, expected in zip(run(model), want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    codes, scales = quantize_rows(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == fused)).T)
    parts = [quantize_rows(weights[name].T) for name in ("q_proj", "k_proj")]
    np.testing.assert_array_equal(codes, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(scales, np.concatenate([p[1] for p in parts]))


def test_int4_graphs_run_whole_on_the_htp_with_the_cpus_tokens(tiny_int4, tmp_path):
    """w4a16 on QNN's HTP (its x86 simulator): the 4-bit blocks stay 4-bit on the device, activations in
    float16; every operator on the HTP, and the CPU provider's greedy tokens."""
    import shutil

    artifact = tmp_path / "int4"
    shutil.copytree(tiny_int4, artifact)
    run_edgekv("compile", str(artifact), "--target", "qnn-htp", "--precision", "float16", check=True)
    for name, graph in load_verified(artifact).data["compiled"]["qnn-htp"]["graphs"].items():
        assert graph["placement"].get("MatMulNBits@device"), name
        assert not [key for key in graph["placement"] if key.endswith("@host")], name
    prompt = list(np.random.default_rng(5).integers(3, 300, 90))
    manifest = load_verified(artifact)
    rows = np.zeros((len(prompt), manifest.model["hidden"]), np.float32)
    Embedding.open(manifest).lookup(np.array(prompt), rows)
    assert (rows == 0).any()  # 8-bit rows: exact zeros, which Pow(x, 2) in the norm turned to garbage on the HTP
    logits = {backend: greedy_logits(artifact, prompt, backend=backend) for backend in ("cpu", "qnn-htp")}
    assert (logits["cpu"].argmax(-1) == logits["qnn-htp"].argmax(-1)).all()
    assert np.abs(logits["cpu"] - logits["qnn-htp"]).max() < 2e-2


def test_the_hexagon_profile_takes_int4_and_the_rk3588_one_does_not():
    from edgekv.calibration.int8_export import check_profile_allows
    from edgekv.core.errors import EdgekvError

    check_profile_allows(load_profile("npu-large"), "int4-weight-only")  # its HTP runs the w4a16 graphs
    with pytest.raises(EdgekvError, match="MatMulNBits"):
        check_profile_allows(load_profile("npu-small"), "int4-weight-only")


def test_split_activations_feed_every_kernel_two_rows_and_give_float32_activations(tiny_cpu_float, tiny_int4,
                                                                                    tiny_int4_split):
    """int4-split-activations: int4's weights, every decode kernel fed [input, its int8 rounding error], the
    prefill chunks' 4-bit kernels at accuracy level 0 and their 8-bit ones split. Its logits are those of
    the same weights with float32 activations (accuracy level 0) to a fifth of int4's distance from them.
    A profile without its operators refuses it and names the one it allows."""
    from edgekv.calibration.int8_export import check_profile_allows, quantize_artifact
    from edgekv.core.errors import EdgekvError

    for entry in load_verified(tiny_int4_split).graphs.values():
        model = onnx.load(tiny_int4_split / entry.file, load_external_data=False)
        kernels = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
        level = {name: next(a.i for a in n.attribute if a.name == "accuracy_level") for name, n in kernels.items()}
        split = {name for name, n in kernels.items() if "/rows" in n.input[0]}
        chunk = ".s1." not in entry.file
        assert kernels and split == {name for name in kernels if level[name] == 4}, entry.file
        assert (len(split) < len(kernels)) == chunk, entry.file
    artifacts = {"split": tiny_int4_split, "int4": tiny_int4,
                 "float": tiny_cpu_float.with_name("llama-cpu-float-activations")}
    quantize_artifact(tiny_cpu_float, artifacts["float"], "int4-weight-only", progress=lambda _: None,
                      weight_only=replace(INT4_FORMAT, accuracy_level=0, float_activations=INT4_FORMAT.eight_bit))
    tokens = list(range(3, 200))
    logits = {label: forced_logits(artifact, EvalRun("quest", None), tokens, 32)[0]
              for label, artifact in artifacts.items()}
    distance = {label: np.abs(logits[label] - logits["float"]).max() for label in ("int4", "split")}
    assert distance["split"] < distance["int4"] / 5, distance
    with pytest.raises(EdgekvError, match="Abs.*--quantize int4-weight-only"):
        check_profile_allows(load_profile("npu-large"), "int4-split-activations")
