"""edgekv bench end to end on a tiny model, and the device projection on hand-computed figures."""

import json

import pytest

from conftest import run_edgekv
from edgekv.core.manifest import load_verified
from edgekv.evaluation.bench import DENSE_HEADROOM, usable_context
from edgekv.evaluation.projection import project_decode, weight_bytes
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S


def test_bench_writes_rows_json_and_plot(tiny_artifacts, tmp_path):
    result = run_edgekv("bench", str(tiny_artifacts["llama"]), "--contexts", "64,200", "--policies", "quest,dense",
                        "--steps", "2", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert result.returncode == 0, result.stderr
    assert "PROJECTED" in result.stdout and "quest" in result.stderr  # progress lines go to stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["policy"], r["context"]) for r in rows] == [("quest", 64), ("quest", 200), ("dense", 64), ("dense", 200)]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["reading_speed_ratio"] == pytest.approx(r["decode_tok_s"] / READING_SPEED_TOKENS_PER_S)
        assert 0.5 < r["graph_share"] + r["select_share"] + r["gather_share"] <= 1.0  # the rest: Python between
        assert r["projected"]["tok_s"] > 0
    quest_200 = rows[1]
    assert quest_200["kv_bytes"]["host"] > 0 and quest_200["select_share"] > 0
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_options(tiny_artifacts):
    for args, message in ((["--contexts", "1k"], "--contexts takes comma-separated integers"),
                          (["--policies", "quest,sparse"], "unknown policy 'sparse'")):
        result = run_edgekv("bench", str(tiny_artifacts["llama"]), *args)
        assert result.returncode == 1 and message in result.stderr


def test_dense_points_stop_short_of_the_static_context():
    assert usable_context(1024, "dense", 8192) == 1024
    assert usable_context(8192, "dense", 8192) == 8192 - DENSE_HEADROOM
    assert usable_context(16384, "dense", 8192) is None
    assert usable_context(16384, "quest", 8192) == 16384


def test_projection_adds_up_from_the_profile(tiny_artifacts):
    manifest = load_verified(tiny_artifacts["llama"])
    profile, model = manifest.profile, manifest.model
    p = project_decode(manifest, "quest", transfer_bytes_per_token=8e6, host_s_per_token=0.002)
    graphs = manifest.variant("budget-decode")
    kv = sum(g.budget for g in graphs[1:]) * 2 * model["kv_heads"] * model["head_dim"] * 4
    assert p.memory_ms == pytest.approx((weight_bytes(manifest) + kv) / (profile.memory_bandwidth_gbps * 1e9) * 1e3)
    assert p.transfer_ms == pytest.approx(8e6 / (profile.host_link_gbps * 1e9) * 1e3)
    assert p.calls_ms == pytest.approx(len(graphs) * profile.call_overhead_us / 1e3)
    assert p.step_ms == pytest.approx(max(p.memory_ms, p.compute_ms) + p.transfer_ms + p.calls_ms + 2.0)
    assert p.tok_s == pytest.approx(1e3 / p.step_ms)
    dense = project_decode(manifest, "dense", 0, 0.002)  # the dense graphs attend over the static context
    dense_kv = sum(g.budget for g in manifest.variant("dense-decode")[1:]) * 2 * model["kv_heads"] * model["head_dim"] * 4
    assert dense.memory_ms - p.memory_ms == pytest.approx((dense_kv - kv) / (profile.memory_bandwidth_gbps * 1e9) * 1e3)
