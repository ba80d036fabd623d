"""Bad input: a one-line error naming the problem, and a non-zero exit."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import run_edgekv


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_profile_lists_the_profiles():
    assert_one_line_error(run_edgekv("export", "--profile", "npu-huge"), "unknown profile 'npu-huge'",
                          "cpu, npu-large, npu-medium, npu-small")


def test_profile_with_unknown_key(tmp_path):
    shipped = Path(__file__).parents[1] / "edgekv" / "device_profiles" / "npu-small.toml"
    path = tmp_path / "bad.toml"
    path.write_text(shipped.read_text().replace("opset = 17", "opset = 17\nfoo = 1"))
    assert_one_line_error(run_edgekv("export", "--profile", str(path)), "unknown key 'graph.foo'")


def test_missing_model_path(tmp_path):
    assert_one_line_error(run_edgekv("export", "--model", str(tmp_path / "missing")), "not found")


def test_a_bad_model_or_profile_is_refused_before_the_exporter_loads(tmp_path):
    """A typo costs a fraction of a second, not the seconds of importing torch and transformers."""
    code = ("import sys\nfrom edgekv.cli.main import main\nsys.argv[1:] = sys.argv[2:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime.quantization') if m in sys.modules))")
    for args in (["--model", str(tmp_path / "missing")], ["--profile", str(tmp_path / "missing.toml")]):
        result = subprocess.run([sys.executable, "-c", code, "edgekv", "export", *args], capture_output=True,
                                text=True)
        assert result.stderr.startswith("error: "), result.stderr
        assert result.stdout.strip() == "[]", (args, result.stdout)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    assert_one_line_error(run_edgekv("export", "--model", str(tmp_path), "--out", str(tmp_path / "out")),
                          "unsupported architecture GPT2LMHeadModel", "LlamaForCausalLM")


def test_modified_graph_file_is_named_by_validate(tiny_artifacts, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifacts["llama"], copy)
    victim = copy / "graphs" / "layer01.s1.b512.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run_edgekv("validate", str(copy))
    assert result.returncode != 0
    assert "graphs/layer01.s1.b512.onnx: sha256 differs from the manifest" in result.stderr


def test_validate_on_a_non_artifact(tmp_path):
    assert_one_line_error(run_edgekv("validate", str(tmp_path)), "not an edgekv artifact",
                          "edgekv export --profile npu-small")


def test_a_mistyped_artifact_names_the_artifacts_beside_it(tiny_artifacts):
    root = tiny_artifacts["llama"].parent  # the tiny exports, one artifact per architecture
    names = ", ".join(sorted(path.name for path in tiny_artifacts.values()))
    assert_one_line_error(run_edgekv("validate", str(root / "lama")), "lama is not an edgekv artifact",
                          f"the artifacts in {root} are {names}; or create one with `edgekv export")
