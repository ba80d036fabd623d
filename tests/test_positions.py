"""Position schemes of the paged cache (edgekv/runtime/positions.py): the far schemes' boundaries by hand, RoPE's rotation on the host, the far keys a graph receives and the bounds they are selected by, and
runs that must equal each other exactly."""

import numpy as np
import pytest

from edgekv.core.errors import EdgekvError
from edgekv.runtime.bfloat16 import widen_bfloat16
from edgekv.runtime.budget import OWN_POSITIONS
from edgekv.runtime import positions
from edgekv.runtime.engine import Engine
from edgekv.runtime.kernels.pages import EMPTY
from edgekv.runtime.kernels.rotation import rotate_half_reference
from edgekv.runtime.page_bounds import GROWTH, ROW_PAD_PAGES, PageBounds
from edgekv.runtime.positions import FOLD_TOKENS, GROUP_TOKENS, FarPages, FarPositions
from edgekv.runtime.rope import Rope

RNG = np.random.default_rng(21)


def test_clamped_and_folded_boundaries_by_hand():
    clamped = FarPositions.for_model("clamped", 8192, rows=64)  # SmolLM2 at npu-small's 64-token chunk
    assert (clamped.near_tokens, clamped.step, clamped.fold) == (8064, 64, 1)
    assert clamped.far(0, 8) is None and clamped.far(8127, 8) is None  # every key at its own position
    assert clamped.far(8128, 8) == FarPages(pages=8, base=63, fold=1)  # tokens 0..63 sit at 63
    assert clamped.far(8191, 8) == FarPages(pages=8, base=63, fold=1)
    assert clamped.far(8192, 8) == FarPages(pages=16, base=127, fold=1)
    assert clamped.far(131072, 8) == FarPages(pages=(131072 - 8064) // 8, base=131072 - 8064 - 1, fold=1)
    folded = FarPositions.for_model("folded", 8192, rows=64)
    assert (folded.near_tokens, folded.fold) == (8192 - 128 - FOLD_TOKENS + 1, FOLD_TOKENS)
    start = folded.near_tokens + 64 * 100  # 6400 far tokens, folded into the FOLD_TOKENS before token 6400
    far = folded.far(start, 8)
    assert far == FarPages(pages=800, base=6400 - FOLD_TOKENS, fold=FOLD_TOKENS)
    own = np.array([0, 1, FOLD_TOKENS - 1, FOLD_TOKENS, 6399])
    assert far.positions(own).tolist() == [6400 - FOLD_TOKENS, 6401 - FOLD_TOKENS, 6399, 6400 - FOLD_TOKENS,
                                           6400 - FOLD_TOKENS + 6399 % FOLD_TOKENS]


def test_grouped_boundaries_by_hand():
    grouped = FarPositions.for_model("grouped", 8192, rows=64)
    assert (grouped.near_tokens, grouped.step, grouped.fold, grouped.group) == (8128, 64, 0, 8)
    assert GROUP_TOKENS == 8
    assert grouped.far(8128, 8) is None  # every distance below 8192: exactly `absolute`
    # One token more: the boundary B must satisfy 8129 - B + B/8 <= 8128, so B >= 8/7: one step of 64 tokens,
    # which sit 8 to a position at 56..63, right before token 64.
    far = grouped.far(8129, 8)
    assert far == FarPages(pages=8, base=56, fold=0, group=8)
    assert far.positions(np.array([0, 7, 8, 63])).tolist() == [56, 56, 57, 63]
    # 16K: B >= (16384 - 8128) * 8/7 = 9435.4, so 9472; 9472 far tokens at 8288..9471, the near window
    # 9472..16383 at its own positions.
    far = grouped.far(16384, 8)
    assert far == FarPages(pages=9472 // 8, base=9472 - 9472 // 8, fold=0, group=8)
    assert far.positions(np.array([0, 4096, 9471])).tolist() == [8288, 8288 + 512, 9471]
    # Past 8 x (8192 - 64) = 65024 tokens the far part is everything before the step's own step.
    assert grouped.far(100_000, 8) == FarPages(pages=100_000 // 64 * 8, base=99_968 - 99_968 // 8, fold=0, group=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        FarPositions.for_model("grouped", 8192, rows=12)


@pytest.mark.parametrize("scheme", ["clamped", "folded", "grouped"])
def test_no_distance_passes_the_trained_context(scheme):
    trained, rows, page_size = 8192, 64, 8
    positions = FarPositions.for_model(scheme, trained, rows)
    for start in range(0, 60000, 7):  # grouped holds up to 8 x (8192 - 64) = 65024 tokens
        last_row = start + rows - 1
        far = positions.far(start, page_size)
        first_own = 0 if far is None else far.pages * page_size  # the oldest key at its own position
        if far is not None:
            far_positions = far.positions(np.arange(first_own))
            assert last_row - far_positions.min() < trained
            assert far_positions.max() <= first_own - 1  # before the near window (grouped, clamped: right before)
            if scheme != "folded":
                assert far_positions.max() == first_own - 1 and (np.diff(far_positions) >= 0).all()
            assert far_positions.min() >= first_own - max(far.fold, first_own // positions.group)
        if start + rows <= trained - max(positions.fold - 1, 0):
            assert far is None  # inside the trained context, less the fold: exactly `absolute`
        assert last_row - first_own < trained


def tiny_rope(head_dim: int = 16) -> Rope:
    return Rope(1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim), 1.0)


def test_rotations_compose_and_move_to_the_query():
    rope = tiny_rope()
    x, q = RNG.normal(size=(2, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(rope.rotate(rope.rotate(x, 700), -300), rope.rotate(x, 400), atol=1e-5)
    shifts = np.array([0, 3, 90, 1000, 9000])
    np.testing.assert_allclose(rope.rotate(rope.rotate(x, shifts), -shifts), x, atol=1e-5)
    # RoPE's own form at position n: x*cos + rotate_half(x)*sin (what the host applies to each graph's q, k)
    cos, sin = np.zeros((5, 16), np.float32), np.zeros((5, 16), np.float32)
    rope.fill(shifts, cos, sin)
    np.testing.assert_allclose(rope.rotate(x, shifts), rotate_half_reference(x, cos, sin), atol=1e-5)
    # q·R(p)k = (R(-p)q)·k: why far pages are scored with the query rotated back
    np.testing.assert_allclose((q * rope.rotate(x, 1234)).sum(-1), (rope.rotate(q, -1234) * x).sum(-1), atol=1e-4)


def random_ids(n: int) -> list[int]:
    return RNG.integers(3, 380, size=n).tolist()


def run(artifact, policy: str, positions: str, ids: list[int], steps: int, **options) -> tuple[np.ndarray, int]:
    """Greedy logits of the prompt's last token and `steps` more, and the pages spilled to disk."""
    engine = Engine.open(artifact, policy, positions=positions, **options)
    try:
        logits = [engine.prefill(ids)]
        for _ in range(steps):
            logits.append(engine.decode(int(np.argmax(logits[-1]))))
        return np.array(logits), engine.cache.usage().pages_spilled
    finally:
        engine.close()


@pytest.mark.parametrize("scheme", ["clamped", "folded", "grouped"])
@pytest.mark.parametrize("policy", ["quest", "rerank"])
def test_far_schemes_are_exactly_absolute_inside_their_near_window(tiny_artifacts, policy, scheme, monkeypatch):
    # The tiny models' trained context is 512: with npu-small's 64-row chunk, clamped keys keep their own
    # positions up to 448 tokens (a fold of 64 here: up to 385). 300 + 40 tokens pass every budget, so
    # selection (and rerank) really run.
    monkeypatch.setattr(positions, "FOLD_TOKENS", 64)
    ids = random_ids(300)
    absolute, _ = run(tiny_artifacts["llama"], policy, "absolute", ids, 40)
    far, _ = run(tiny_artifacts["llama"], policy, scheme, ids, 40)
    np.testing.assert_array_equal(absolute, far)


def far_keys_placed(engine: Engine, layer: int, buffer, far: FarPages) -> int:
    """Assert that each page a layer's budget buffer holds sits at the position the step sees it at: a far
    page's keys rotated to far.positions (recorded at far.base), a near page's as stored. Returns the number
    of far slot-pages checked."""
    keys, _ = engine.cache.layers[layer].read()  # post-RoPE, at their own positions
    held, page_size, checked = buffer.held_pages(), engine.cache.page_size, 0
    for head, slot in zip(*np.nonzero(held != EMPTY)):
        page = held[head, slot]
        own = page * page_size + np.arange(page_size)
        stored = keys[head, own]
        if page < far.pages:
            want = engine.rope.rotate(stored, far.positions(own) - own)
            assert buffer.rotated_to[head, slot] == far.base
            np.testing.assert_allclose(buffer.pages_k[head, slot], want, atol=1e-5)
            checked += 1
        else:
            assert buffer.rotated_to[head, slot] == OWN_POSITIONS
            np.testing.assert_array_equal(buffer.pages_k[head, slot], stored)
    return checked


@pytest.mark.parametrize("scheme,fold", [("clamped", 1), ("folded", 64), ("grouped", 0)])
@pytest.mark.parametrize("policy", ["quest", "rerank"])
def test_far_keys_reach_the_graph_rotated_and_their_bounds_hold(tiny_artifacts, policy, scheme, fold, monkeypatch):
    monkeypatch.setattr(positions, "FOLD_TOKENS", fold)
    engine = Engine.open(tiny_artifacts["qwen2"], policy, positions=scheme)
    try:
        engine.prefill(random_ids(1500))
        far = engine.cache.far  # the last prompt token sits at 1499
        if scheme == "grouped":  # 1499 - B + B/8 <= 512 - 64: B >= 1201.1, so 1216 (64-token steps)
            assert far == FarPages(pages=1216 // 8, base=1216 - 1216 // 8, fold=0, group=8)
        else:
            boundary = (1499 - (512 - 128 - fold + 1)) // 64 * 64
            assert far == FarPages(pages=boundary // 8, base=boundary - fold, fold=fold)
        page_size, checked = engine.cache.page_size, 0
        for layer, (_, buffer, _) in enumerate(engine.cache.buffers[True]):
            assert buffer.holds_sink
            checked += far_keys_placed(engine, layer, buffer, far)
            keys, _ = engine.cache.layers[layer].read()  # post-RoPE, at their own positions
            # Every full page's far bounds hold its keys rotated to their offsets from the base.
            full = engine.cache.layers[layer].length // page_size
            own = np.arange(full * page_size)
            folded = engine.rope.rotate(keys[:, :full * page_size], far.positions(own) - far.base - own)
            bounds = widen_bfloat16(engine.cache.layers[layer].folded.full[:, :, :full])
            pages = folded.reshape(keys.shape[0], full, page_size, -1)
            head_dim = keys.shape[-1]
            assert (pages.max(axis=2) <= np.moveaxis(bounds[:, :head_dim], 2, 1)).all()
            assert (pages.min(axis=2) >= np.moveaxis(bounds[:, head_dim:], 2, 1)).all()
        assert checked > 0
    finally:
        engine.close()


@pytest.mark.parametrize("policy,scheme", [("quest", "grouped"), ("streaming", "clamped")])
def test_a_prefill_chunks_far_keys_reach_its_graph_rotated(tiny_artifacts, policy, scheme):
    """A prefill chunk's budget buffer (one per budget, refilled layer after layer) holds its far pages'
    keys at their far positions and its near pages' at their own: checked on the last layer of each budget
    after the prompt's last chunk (tokens 1435..1498)."""
    engine = Engine.open(tiny_artifacts["qwen2"], policy, positions=scheme)
    try:
        engine.prefill(random_ids(1500))
        far = engine.cache.far_positions.far(1435, engine.cache.page_size)
        last = {budget: (layer, buffer) for layer, (budget, buffer, _) in enumerate(engine.cache.buffers[False])}
        assert sum(far_keys_placed(engine, layer, buffer, far) for layer, buffer in last.values()) > 0
    finally:
        engine.close()


@pytest.mark.parametrize("policy,scheme", [("quest", "clamped"), ("rerank", "folded"), ("rerank", "grouped")])
def test_a_long_far_run_spilled_to_disk_equals_it_in_memory(tiny_artifacts, tmp_path, policy, scheme):
    ids = random_ids(2500)
    in_memory, _ = run(tiny_artifacts["mistral"], policy, scheme, ids, 12)
    spilled, pages_spilled = run(tiny_artifacts["mistral"], policy, scheme, ids, 12, spill_dir=tmp_path,
                                 host_kv_bytes=600 * 2 * 2 * 8 * 16 * 4)  # 600 of its ~940 float32 pages
    assert pages_spilled > 0
    np.testing.assert_array_equal(in_memory, spilled)
    assert list(tmp_path.iterdir()) == []  # the session's spill file went with it


@pytest.mark.parametrize("policy,scheme", [("quest", "clamped"), ("rerank", "grouped")])
def test_far_pages_own_bounds_are_dropped_and_nothing_changes(tiny_artifacts, policy, scheme, monkeypatch):
    """Far pages are scored on their far bounds only, so their bounds at their own positions are dropped
    (PageBounds.drop_before): the same logits as a run that keeps them all, and a bounds array sized by the
    near pages instead of every page."""
    ids = random_ids(1500)

    def run_and_measure() -> tuple[np.ndarray, int]:
        engine = Engine.open(tiny_artifacts["mistral"], policy, positions=scheme)
        try:
            logits = [engine.prefill(ids)]
            for _ in range(12):
                logits.append(engine.decode(int(np.argmax(logits[-1]))))
            far, n_pages = engine.cache.far, engine.cache.layers[0].n_pages
            for pages in engine.cache.layers:
                if pages.metadata.first:  # dropped
                    assert 0 < pages.metadata.base <= pages.metadata.first == far.pages
                    # room for the kept pages (here 53 or 31 of 189) and a quarter more, not for every page
                    assert pages.metadata.full.shape[2] <= GROWTH * (n_pages - far.pages) + 64 + ROW_PAD_PAGES
                    with pytest.raises(ValueError, match="are dropped"):
                        pages.bounds()
            return np.array(logits), engine.cache.usage().bounds_bytes
        finally:
            engine.close()

    logits, bounds_bytes = run_and_measure()
    monkeypatch.setattr(PageBounds, "drop_before", lambda self, page: None)
    kept_logits, kept_bytes = run_and_measure()
    np.testing.assert_array_equal(logits, kept_logits)
    assert bounds_bytes < kept_bytes


def test_unknown_position_scheme_is_refused(tiny_artifacts):
    with pytest.raises(EdgekvError, match="unknown position scheme 'relative'; choose one of: absolute, clamped, folded, grouped"):
        Engine.open(tiny_artifacts["llama"], "quest", positions="relative")


def test_the_default_is_rerank_with_clamped_positions(tiny_artifacts):
    """The defaults the README states (chosen by measurement: benchmarks/RESULTS.md)."""
    engine = Engine.open(tiny_artifacts["llama"])
    try:
        assert (engine.policy, engine.positions) == ("rerank", "clamped")
        assert engine.cache.far_positions.fold == 1
    finally:
        engine.close()
