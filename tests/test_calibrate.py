"""Budget calibration: attention mass on hand-built cases, the budget search, and `edgekv calibrate`
end to end on a tiny model (the calibrated static graphs compute what the masked larger graphs do)."""

import json

import numpy as np
import pytest

from conftest import run_edgekv
from edgekv.calibration import budgets
from edgekv.calibration.budgets import budgets_for_level, candidate_budgets, captured_mass
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import load_verified
from edgekv.core.profiles import load_profile
from edgekv.runtime.engine import Engine
from edgekv.runtime.paged_cache import LayerPages
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.tiers import TieredPool

PAGE = 4


def page_store(keys: np.ndarray, tmp_path) -> LayerPages:
    kv_heads, length, head_dim = keys.shape
    pool = TieredPool(1, kv_heads, head_dim, PAGE, 1 << 20, 1 << 20, tmp_path / "spill.bin")
    store = LayerPages(0, pool)
    store.append(keys, np.zeros_like(keys))
    return store


def test_captured_mass_counts_the_pages_quest_would_select(tmp_path):
    # 10 pages of 4 tokens; one query head looks only at page 6, whose keys align with it.
    head_dim, length = 8, 40
    keys = np.zeros((1, length, head_dim), np.float32)
    keys[0, 24:28, 0] = 1.0
    q = np.zeros((1, head_dim), np.float32)
    q[0, 0] = 50.0
    store = page_store(keys, tmp_path)
    mass = captured_mass(q, keys, store.bounds(), PAGE, 1.0, [2 * PAGE, 3 * PAGE, 10 * PAGE])
    # 2 pages: sink + current only, page 6 is missed; 3 pages: the top-ranked page 6 is in; all: everything.
    assert mass[0] < 0.01
    assert mass[1] > 0.99
    assert mass[2] == pytest.approx(1.0)


def test_captured_mass_of_uniform_attention_is_the_selected_share(tmp_path):
    keys = np.zeros((2, 64, 4), np.float32)  # every logit equal: attention is uniform over the 64 tokens
    q = np.ones((4, 4), np.float32)  # two query heads per KV head
    store = page_store(keys, tmp_path)
    mass = captured_mass(q, keys, store.bounds(), PAGE, 1.0, [8, 16, 32, 64])
    np.testing.assert_allclose(mass, [8 / 64, 16 / 64, 32 / 64, 1.0], atol=1e-6)


def test_budgets_for_level_takes_each_layers_smallest_sufficient_budget():
    candidates = [32, 64, 128, 256]
    mass = np.array([[0.2, 0.5, 0.9, 1.0], [0.95, 0.99, 1.0, np.nan]])  # layer 1's graph holds 128 at most
    assert budgets_for_level(mass, candidates, 0.9) == [128, 32]
    assert budgets_for_level(mass, candidates, 0.99) == [256, 64]
    assert budgets_for_level(mass, candidates, 1.0) == [256, 128]
    assert candidate_budgets(8, 512) == [32, 64, 128, 256, 512]
    assert candidate_budgets(8, 2048)[-1] == 2048


def test_search_finds_the_cheapest_set_meeting_the_target_or_names_the_weak_layers(monkeypatch):
    candidates = [32, 64, 128, 256]
    mass = np.array([[0.5, 0.8, 0.95, 1.0], [0.9, 0.97, 0.999, 1.0], [0.7, 0.85, 0.9, 0.93]])
    evaluated = []

    def agreement(artifact, prompts, scored, references, layer_budgets):  # grows with the budgets
        evaluated.append(layer_budgets)
        return 0.8 + sum(layer_budgets) / 4000

    monkeypatch.setattr(budgets, "agreement_with", agreement)
    monkeypatch.setattr(budgets, "dense_references", lambda artifact, prompts, scored: [])
    chosen, searched = budgets.search_budgets(None, [], 8, 0.95, mass, candidates, lambda _: None)
    cheapest = min((s for s in searched if s.agreement >= 0.95), key=lambda s: s.mean_budget)
    assert chosen.layer_budgets == cheapest.layer_budgets
    assert all(s.agreement < 0.95 for s in searched if s.mean_budget < chosen.mean_budget)
    assert len(evaluated) < len({tuple(budgets_for_level(mass, candidates, m)) for m in budgets.MASS_LEVELS})
    with pytest.raises(EdgekvError, match=r"no budget within this profile meets top-1 agreement 0.999: the best is "
                                          r"0.\d+.*layers .*2 \(0.930\)"):
        budgets.search_budgets(None, [], 8, 0.999, mass, candidates, lambda _: None)


@pytest.fixture(scope="module")
def calibrated(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "llama-calibrated"
    result = run_edgekv("calibrate", str(tiny_artifacts["llama"]), "--context", "256", "--scored-tokens", "16",
                        "--target-agreement", "0.9", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_calibrate_writes_profile_report_plot_and_artifact(calibrated, tiny_artifacts):
    out, stdout = calibrated
    report = json.loads(out.with_name(out.name + ".calibration.json").read_text())
    profile = load_profile(str(out.with_name(out.name + ".profile.toml")))
    assert list(profile.layer_budgets) == report["chosen"]["layer_budgets"]
    assert report["chosen"]["agreement"] >= 0.9 and report["held_out_agreement"] is not None
    assert out.with_name(out.name + ".calibration.png").stat().st_size > 10_000
    manifest = load_verified(out)
    assert [g.budget for g in manifest.variant("budget-decode")[1:]] == list(profile.layer_budgets)
    original = load_verified(tiny_artifacts["llama"])
    assert sum(profile.layer_budgets) < sum(g.budget for g in original.variant("budget-decode")[1:])
    assert "held-out prompts" in stdout


def test_calibrated_static_graphs_compute_what_masked_larger_graphs_do(calibrated, tiny_artifacts):
    out, _ = calibrated
    layer_budgets = list(load_verified(out).profile.layer_budgets)
    prompt = list(range(3, 300))  # longer than every calibrated budget: selection happens in every layer
    results = []
    for artifact, kwargs in ((out, {}), (tiny_artifacts["llama"], {"layer_budgets": layer_budgets})):
        engine = Engine.open(artifact, "quest", **kwargs)
        try:
            results.append(list(engine.generate(prompt, 12, Sampler(SamplingConfig()), eos_ids=set())))
        finally:
            engine.close()
    assert results[0] == results[1]


def test_calibrate_refuses_a_short_text_and_a_quantized_artifact(tiny_artifacts, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    result = run_edgekv("calibrate", str(tiny_artifacts["llama"]), "--context", "256", "--text", str(text),
                        "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "calibration text" in result.stderr and "fewer than the 512" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_edgekv("calibrate", str(tiny_artifacts["llama"]), "--context", "1024", "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "--context 1024 passes the model's trained context (512 tokens): calibrate inside it" in result.stderr
    assert not (tmp_path / "out").exists()
