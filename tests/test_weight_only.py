"""INT8 weight-only artifacts for CPU profiles: onnxruntime's MatMulNBits kernels."""

import numpy as np
import onnx
import pytest

from conftest import error_line, run_edgekv
from edgekv.calibration.weight_only import WEIGHT_ONLY_BLOCK
from edgekv.core.manifest import load_verified
from edgekv.core.profiles import load_profile
from edgekv.evaluation.evaluate import EvalRun, forced_logits
from edgekv.export.validator import validate_artifact


@pytest.fixture(scope="module")
def tiny_weight_only(tiny_model_dirs, tmp_path_factory):
    from edgekv.calibration.int8_export import export_for_profile

    # The cpu profile quantizes by default (its weight_dtype), as `edgekv export --profile cpu` does.
    assert load_profile("cpu").weight_dtype == "int8-weight-only"
    out = tmp_path_factory.mktemp("tiny-weight-only") / "llama-cpu"
    return export_for_profile(str(tiny_model_dirs["llama"]), "cpu", out, progress=lambda _: None).directory


def test_every_projection_is_matmulnbits_over_8bit_blocks(tiny_weight_only):
    manifest = load_verified(tiny_weight_only)
    assert manifest.data["quantization"]["format"] == "MatMulNBits"
    for entry in manifest.graphs.values():
        model = onnx.load(tiny_weight_only / entry.file, load_external_data=False)
        weights = {t.name for t in model.graph.initializer}
        assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights], entry.name
        kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert kernels, entry.name
        for node in kernels:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["bits"], attributes["block_size"]) == (8, WEIGHT_ONLY_BLOCK)
    stored = manifest.data["weights"]
    assert {e["dtype"] for n, e in stored.items() if n.endswith("_Q8")} == {"uint8"}
    # The variants of a step share one stored copy of each quantized weight.
    for index in range(manifest.model["layers"] + 1):
        used = {tuple(sorted(manifest.variant(v)[index].weights)) for v in manifest.data["variants"]}
        assert len(used) == 1


def test_weight_only_artifact_validates_and_tracks_float32(tiny_weight_only, tiny_artifacts):
    assert validate_artifact(load_verified(tiny_weight_only)).ok
    tokens = list(range(3, 200))
    # The tiny float artifact is npu-small's, whose KV side the cpu profile shares: only the weights differ.
    got = forced_logits(tiny_weight_only, EvalRun("quest", None), tokens, 32)[0]
    want = forced_logits(tiny_artifacts["llama"], EvalRun("quest", None), tokens, 32)[0]
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert relative < 0.05, relative


def test_npu_profile_refuses_weight_only_kernels(tiny_model_dirs, tmp_path):
    result = run_edgekv("export", "--model", str(tiny_model_dirs["llama"]), "--profile", "npu-small",
                        "--quantize", "int8-weight-only", "--out", str(tmp_path / "out"))
    last = error_line(result)
    assert "MatMulNBits" in last and "cpu" in last
    assert not (tmp_path / "out").exists()


def test_calibration_text_with_weight_only_is_refused(tiny_model_dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Weight-only graphs calibrate nothing on activations. " * 200)
    result = run_edgekv("export", "--model", str(tiny_model_dirs["llama"]), "--profile", "cpu",
                        "--calibration-text", str(text), "--out", str(tmp_path / "out"))
    last = error_line(result)
    assert "--calibration-text" in last and "int8-weight-only" in last
    assert "loading model" not in result.stderr  # refused before the model is loaded
    assert not (tmp_path / "out").exists()
