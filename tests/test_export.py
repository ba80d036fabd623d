"""The exported graphs against transformers, their static shapes, and the shared weight files."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from all_pages_loop import greedy_all_pages
from conftest import run_edgekv
from edgekv.core.manifest import load_verified
from edgekv.core.profiles import load_profile
from edgekv.export.models import load_model
from edgekv.export.validator import validate_artifact
from edgekv.runtime.backend import OnnxruntimeBackend

NEW_TOKENS = 32
LOGITS_TOLERANCE = 1e-3


def reference(loaded, prompt: list[int]):
    """transformers' own greedy tokens and last prompt token logits (float32)."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = loaded.model(ids).logits[0, -1].numpy()
        tokens = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=loaded.tokenizer.eos_token_id)[0, len(prompt):].tolist()
    return tokens, logits


def assert_graphs_match_transformers(artifact, loaded, prompt):
    backend = OnnxruntimeBackend.open(load_verified(artifact))
    want_tokens, want_logits = reference(loaded, prompt)
    for policy in ("budget", "dense"):
        tokens, logits = greedy_all_pages(backend, policy, prompt, NEW_TOKENS)
        assert np.abs(logits - want_logits).max() < LOGITS_TOLERANCE, policy
        assert tokens == want_tokens, policy


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_models_match_transformers(arch, tiny_model_dirs, tiny_artifacts):
    loaded = load_model(str(tiny_model_dirs[arch]))
    # Longer than one 64-token prefill chunk, so chunking and the left-padded last chunk are exercised.
    prompt = loaded.tokenizer("The grass is green. The sky is blue. The sun is yellow. Here we go. " * 6).input_ids
    assert 64 < len(prompt) < 128
    assert_graphs_match_transformers(tiny_artifacts[arch], loaded, prompt)


def test_default_model_matches_transformers(default_artifact, default_model):
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt = default_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert_graphs_match_transformers(default_artifact, default_model, prompt)


def test_default_artifact_validates_for_npu_small(default_artifact):
    result = run_edgekv("validate", str(default_artifact))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_every_shape_is_static_and_budgets_follow_the_profile(default_artifact):
    manifest = load_verified(default_artifact)
    profile = load_profile("npu-small")
    dims = manifest.model
    for graph in manifest.graphs.values():
        for spec in graph.inputs + graph.outputs:
            assert all(isinstance(d, int) and d > 0 for d in spec.shape), (graph.name, spec)
    decode = manifest.variant("budget-decode")
    assert len(decode) == dims["layers"] + 1
    k_shapes = [next(t.shape for t in g.inputs if t.name == "k_sel") for g in decode[1:]]
    assert k_shapes == [(1, dims["kv_heads"], profile.layer_budget(layer, False), dims["head_dim"])
                        for layer in range(dims["layers"])]
    dense = manifest.variant("dense-prefill")
    assert {g.budget for g in dense[1:]} == {dims["max_context"]} == {8192}
    assert {g.seq_len for g in dense} == {profile.prefill_chunk}


def test_graphs_bake_in_the_models_own_rope_theta(default_artifact):
    manifest = load_verified(default_artifact)
    embed = onnx.load(str(default_artifact / manifest.variant("budget-decode")[0].file), load_external_data=False)
    constants = [numpy_helper.to_array(t) for t in embed.graph.initializer
                 if t.data_location != onnx.TensorProto.EXTERNAL]
    constants += [numpy_helper.to_array(a.t) for n in embed.graph.node if n.op_type == "Constant" for a in n.attribute]
    head_dim = manifest.model["head_dim"]
    expected = 1.0 / 100000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    inv_freqs = [c.ravel() for c in constants if c.size == head_dim // 2 and c.dtype == np.float32]
    assert any(np.allclose(c, expected, rtol=1e-6) for c in inv_freqs)
    assert manifest.model["rope_theta"] == 100000.0


def test_each_weight_is_stored_once(default_artifact, default_model):
    manifest = load_verified(default_artifact)
    entries = manifest.data["weights"].values()
    locations = [(e["file"], e["offset"]) for e in entries]
    assert len(locations) == len(set(locations))
    # Tied embeddings: named_parameters() lists the shared tensor once, and so must the artifact.
    param_bytes = sum(p.numel() * 4 for _, p in default_model.model.named_parameters())
    small = sum(p.numel() * 4 for _, p in default_model.model.named_parameters() if p.numel() * 4 < 4096)
    assert sum(e["length"] for e in entries) == param_bytes - small
    # The prefill, decode and dense graphs of a layer use the same tensors by the same names.
    graphs = manifest.graphs
    assert (set(graphs["layer05.s1.b512"].weights) == set(graphs["layer05.s64.b1024"].weights)
            == set(graphs["layer05.s1.b8192"].weights))


def test_validate_reports_every_violation_against_a_stricter_profile(tiny_artifacts, tmp_path):
    text = load_profile("npu-small").to_tables()
    text["graph"]["allowed_ops"] = [op for op in text["graph"]["allowed_ops"] if op != "Softmax"]
    text["graph"]["max_tensor_bytes"] = 1024
    manifest = load_verified(tiny_artifacts["llama"])
    from edgekv.core.profiles import profile_from_dict

    report = validate_artifact(manifest, profile_from_dict(text, "strict"))
    assert not report.ok
    assert any("operator Softmax is not in the profile's allowed_ops" in v for v in report.violations)
    assert any("above the profile's max_tensor_bytes 1024" in v for v in report.violations)
