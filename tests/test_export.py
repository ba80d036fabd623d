"""The exported graphs against transformers, their static shapes, and the shared weight files."""

import numpy as np
import onnx
import pytest
import torch

from all_pages_loop import greedy_all_pages
from conftest import run_edgekv
from edgekv.core.manifest import load_verified
from edgekv.core.profiles import load_profile
from edgekv.export.models import load_model
from edgekv.export.validator import validate_artifact
from edgekv.runtime.backend import OnnxruntimeBackend
from edgekv.runtime.rope import Rope

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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_host_rope_tables_are_the_models_own(arch, tiny_model_dirs, tiny_artifacts):
    """cos/sin from the manifest's frequencies (float64 angles) against the model's rotary module (float32
    angles, whose rounding grows with the position: about 6e-8 rad per position)."""
    rotary = load_model(str(tiny_model_dirs[arch])).model.model.rotary_emb
    manifest = load_verified(tiny_artifacts[arch])
    positions = np.array([0, 1, 7, 100, 511, 4095, 32767])
    cos, sin = (np.zeros((len(positions), manifest.model["head_dim"]), np.float32) for _ in range(2))
    Rope.from_manifest(manifest.model).fill(positions, cos, sin)
    with torch.no_grad():
        want_cos, want_sin = rotary(torch.zeros(1), torch.tensor(positions).reshape(1, -1))
    tolerance = 1e-6 + 1e-7 * positions[:, None]
    assert np.all(np.abs(cos - want_cos[0].numpy()) <= tolerance)
    assert np.all(np.abs(sin - want_sin[0].numpy()) <= tolerance)


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
    assert k_shapes == [(dims["kv_heads"], profile.layer_budget(layer, False), dims["head_dim"])
                        for layer in range(dims["layers"])]
    dense = manifest.variant("dense-prefill")
    assert {g.budget for g in dense[1:]} == {dims["max_context"]} == {8192}
    assert {g.seq_len for g in dense} == {profile.prefill_chunk}


def test_the_host_rotates_with_the_models_own_rope_theta(default_artifact):
    manifest = load_verified(default_artifact)
    head_dim = manifest.model["head_dim"]
    expected = 1.0 / 100000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    assert np.allclose(manifest.model["rope"]["inv_freq"], expected, rtol=1e-6)
    assert manifest.model["rope_theta"] == 100000.0


def test_no_graph_looks_up_embeddings_or_computes_positions(default_artifact):
    """What NPU toolchains run on the CPU or get wrong in float16 stays on the host (modules.py)."""
    manifest = load_verified(default_artifact)
    for graph in manifest.graphs.values():
        model = onnx.load(str(default_artifact / graph.file), load_external_data=False)
        assert not {n.op_type for n in model.graph.node} & {"Gather", "Cos", "Sin", "Range"}, graph.name
        for spec in graph.inputs:
            assert spec.dtype == "float32" and len(spec.shape) <= 3, (graph.name, spec)


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
