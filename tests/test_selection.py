"""Page metadata, Quest scores and the selection policies on hand-made data."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import gather_pages
from edgekv.runtime.bfloat16 import bfloat16_outward, widen_bfloat16
from edgekv.runtime.budget import BudgetBuffer
from edgekv.runtime.kernels.attention import attention_mass, record_page_mass
from edgekv.runtime.host_arena import RELEASE_RECORDS, SpillFile
from edgekv.runtime.kernels.pages import DISK
from edgekv.runtime.page_bounds import GROWTH, ROW_PAD_PAGES, PageBounds
from edgekv.runtime.paged_cache import FarKeys, LayerPages
from edgekv.runtime.positions import FarPages
from edgekv.runtime.rope import KeyShifter, Rope
from edgekv.runtime.selection import quest_page_scores, select_pages, top_pages
from edgekv.runtime.tiers import LayerKeys, TieredPool

KV_HEADS, GROUPS, HEAD_DIM, PAGE = 2, 3, 16, 4  # HEAD_DIM: a multiple of kernels.bounds.SCORE_CHANNELS


def make_store(tmp_path, host_pages: int = 1000, device_pages: int = 1000, kv_dtype: str = "float32"):
    page_bytes = 2 * KV_HEADS * PAGE * HEAD_DIM * 4
    pool = TieredPool(1, KV_HEADS, HEAD_DIM, PAGE, device_pages * page_bytes, host_pages * page_bytes,
                      tmp_path / "spill.bin", kv_dtype)
    return pool, LayerPages(0, pool)


def test_page_min_max_follow_appends_in_uneven_chunks(tmp_path):
    pool, store = make_store(tmp_path)
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(KV_HEADS, 23, HEAD_DIM)).astype(np.float32)
    values = rng.normal(size=keys.shape).astype(np.float32)
    for start, stop in ((0, 3), (3, 4), (4, 13), (13, 23)):
        store.append(keys[:, start:stop], values[:, start:stop])
    assert (store.length, store.n_pages) == (23, 6)
    k_out, v_out = gather_pages(pool, 0, np.broadcast_to(np.arange(6), (KV_HEADS, 6)))
    np.testing.assert_array_equal(k_out[:, :23], keys)
    np.testing.assert_array_equal(v_out[:, :23], values)
    assert not k_out[:, 23:].any()  # the unwritten rows of the current page are zeros, never stale memory
    store.append(keys[:, -1:], values[:, -1:])  # the 24th token fills page 5 (its max and min repeat)
    bounds = widen_bfloat16(store.bounds())  # the open page's bounds are written when it fills
    for page in range(6):
        chunk = keys[:, page * PAGE:(page + 1) * PAGE]
        high, low = bounds[:, :HEAD_DIM, page], bounds[:, HEAD_DIM:, page]
        # bfloat16, rounded outward: still bounds, within one bfloat16 step (8 significant bits)
        assert (high >= chunk.max(axis=1)).all() and (low <= chunk.min(axis=1)).all()
        np.testing.assert_allclose(high, chunk.max(axis=1), rtol=2 ** -7)
        np.testing.assert_allclose(low, chunk.min(axis=1), rtol=2 ** -7)


def test_page_bounds_keep_every_page_as_they_grow_by_a_quarter_and_never_stride_a_multiple_of_4k():
    bounds, rng = PageBounds(3, 64), np.random.default_rng(2)
    sealed = []
    for page in range(2100):  # past the 2048-page doubling, where a power-of-two row is 4 KiB
        bounds.add_page(page)
        bounds.open[:] = rng.normal(size=bounds.open.shape)
        sealed.append(bfloat16_outward(bounds.open))
        bounds.seal(page)
        # a channel row's stride a multiple of 4 KiB puts the rows a score pass streams in the same L1 sets
        assert bounds.full.strides[1] % 4096 != 0
        # the whole array is resident: its slack past the pages is RAM
        assert bounds.full.shape[2] <= GROWTH * (page + 1) + 64 + ROW_PAD_PAGES
    np.testing.assert_array_equal(bounds.full[:, :, :2100], np.stack(sealed, axis=-1))


def test_page_bounds_behind_a_moving_first_page_are_dropped_and_the_rest_kept():
    """A far position scheme drops the bounds of pages that have become far, a window of about 1000 pages
    behind the newest: the array stays that window and a quarter more, and every kept page's bounds survive
    its moves, in column page - base."""
    bounds, rng, window = PageBounds(3, 64), np.random.default_rng(3), 1000
    sealed = []
    for page in range(6000):
        bounds.drop_before(page - window)
        bounds.add_page(page)
        bounds.open[:] = rng.normal(size=bounds.open.shape)
        sealed.append(bfloat16_outward(bounds.open))
        bounds.seal(page)
        assert bounds.full.strides[1] % 4096 != 0
        assert bounds.base <= bounds.first == max(page - window, 0)
        assert bounds.full.shape[2] <= GROWTH * (window + 1) + 64 + ROW_PAD_PAGES
    kept = np.stack(sealed[bounds.first:], axis=-1)
    np.testing.assert_array_equal(bounds.full[:, :, bounds.first - bounds.base:6000 - bounds.base], kept)


@pytest.mark.parametrize("steps", [1, 8])  # decode's few rows (compiled loop) and a chunk's many (BLAS)
def test_quest_score_is_the_per_channel_upper_bound(steps):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(KV_HEADS * GROUPS, steps, HEAD_DIM)).astype(np.float32)
    kmin = rng.normal(size=(5, KV_HEADS, HEAD_DIM)).astype(np.float32)
    kmax = kmin + rng.uniform(0, 2, size=kmin.shape).astype(np.float32)
    bits = bfloat16_outward(np.concatenate([kmax, kmin], axis=-1))  # [pages, kv_heads, 2*head_dim]
    kmax, kmin = np.split(widen_bfloat16(bits), 2, axis=-1)  # the bounds the score sees
    scores = quest_page_scores(q, np.ascontiguousarray(bits.transpose(1, 2, 0)), slice(0, 5))
    assert scores.shape == (KV_HEADS, 5)
    for head in range(KV_HEADS):
        rows = q[head * GROUPS:(head + 1) * GROUPS].reshape(-1, HEAD_DIM)  # the group's heads and rows
        for page in range(5):
            brute = max(sum(max(x * kmax[page, head, i], x * kmin[page, head, i]) for i, x in enumerate(row))
                        for row in rows)
            assert scores[head, page] == pytest.approx(brute, rel=1e-5)
            # The bound holds for any key inside the page's box.
            key = rng.uniform(kmin[page, head], kmax[page, head])
            assert (rows @ key).max() <= scores[head, page] + 1e-5


def test_quest_finds_the_page_a_query_wants(tmp_path):
    _, store = make_store(tmp_path)
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(KV_HEADS, 40, HEAD_DIM)).astype(np.float32) * 0.1
    keys[:, 21] = 5.0  # page 5 holds a key every query aligned with +1 wants
    store.append(keys, keys)
    q = np.ones((KV_HEADS * GROUPS, 1, HEAD_DIM), np.float32)
    pages = select_pages("quest", q, store.bounds(), store.n_pages, first_new=store.n_pages - 1, budget_pages=3).pages()
    assert pages.tolist() == [[0, 5, 9]] * KV_HEADS  # sink, the wanted page, the current page


def test_streaming_keeps_sink_and_recent_pages(tmp_path):
    _, store = make_store(tmp_path)
    store.append(*(np.zeros((KV_HEADS, 40, HEAD_DIM), np.float32),) * 2)
    q = np.ones((KV_HEADS * GROUPS, 1, HEAD_DIM), np.float32)
    pages = select_pages("streaming", q, store.bounds(), store.n_pages, first_new=9, budget_pages=4).pages()
    assert pages.tolist() == [[0, 7, 8, 9]] * KV_HEADS


@pytest.mark.parametrize("policy", ["quest", "rerank"])
def test_a_local_window_keeps_the_recent_pages_and_the_policy_chooses_the_rest(tmp_path, policy):
    """Page 2 holds the keys the query wants; pages 7 and 8 score nothing. Without a window the policy
    spends the room of 2 on the best-scoring old pages; with a window of 1 page it keeps page 8 and spends
    the other slot on page 2; with a window of the whole room it is streaming."""
    pool, store = make_store(tmp_path)
    keys = np.full((KV_HEADS, 10 * PAGE, HEAD_DIM), -1.0, np.float32)
    keys[:, 2 * PAGE:3 * PAGE] = 2.0  # page 2
    keys[:, 5 * PAGE:6 * PAGE] = 1.0  # page 5, the second best
    store.append(keys, keys)
    q = np.ones((KV_HEADS * GROUPS, 1, HEAD_DIM), np.float32)
    reader = LayerKeys(pool, 0) if policy == "rerank" else None

    def pages(local_pages: int) -> list:
        return select_pages(policy, q, store.bounds(), store.n_pages, 9, 4, reader, np.array([store.length - 1]),
                            local_pages=local_pages).pages().tolist()

    assert pages(0) == [[0, 2, 5, 9]] * KV_HEADS
    assert pages(1) == [[0, 2, 8, 9]] * KV_HEADS
    assert pages(2) == pages(5) == [[0, 7, 8, 9]] * KV_HEADS
    assert pages(2) == select_pages("streaming", q, store.bounds(), store.n_pages, 9, 4).pages().tolist()


@pytest.mark.parametrize("policy", ["quest", "rerank", "streaming"])
def test_every_page_is_selected_in_order_while_the_context_fits(tmp_path, policy):
    _, store = make_store(tmp_path)
    store.append(*(np.ones((KV_HEADS, 30, HEAD_DIM), np.float32),) * 2)
    q = np.ones((KV_HEADS * GROUPS, 1, HEAD_DIM), np.float32)
    pages = select_pages(policy, q, store.bounds(), store.n_pages, first_new=7, budget_pages=8).pages()
    assert pages.tolist() == [list(range(8))] * KV_HEADS


def mapped_kib(path: Path) -> int:
    """The KiB of `path` mapped into this process and resident (Linux's /proc/self/smaps)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_the_spill_file_releases_the_pages_it_maps(tmp_path):
    """The disk tier does not stay in the process's RAM: after 3 x RELEASE_RECORDS + 100 records stored, at most
    RELEASE_RECORDS of them are mapped and resident, and every record reads back unchanged."""
    record = np.dtype([("k", np.float32, (2, 8, 64)), ("v", np.float32, (2, 8, 64))])  # 8 KiB
    spill = SpillFile(tmp_path / "spill.bin", record)
    rng = np.random.default_rng(4)
    stored = [np.array(tuple(rng.normal(size=(2, 2, 8, 64))), dtype=record) for _ in range(3 * RELEASE_RECORDS + 100)]
    slots = [spill.store(r) for r in stored]
    assert 0 < mapped_kib(tmp_path / "spill.bin") <= RELEASE_RECORDS * record.itemsize // 1024
    for slot, want in zip(slots, stored):
        got = spill.load(slot)
        np.testing.assert_array_equal(got["k"], want["k"])
        np.testing.assert_array_equal(got["v"], want["v"])
    assert mapped_kib(tmp_path / "spill.bin") <= RELEASE_RECORDS * record.itemsize // 1024
    spill.close()


def test_spilled_pages_come_back_unchanged(tmp_path):
    pool, store = make_store(tmp_path, host_pages=3, device_pages=2)
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(KV_HEADS, 6 * PAGE, HEAD_DIM)).astype(np.float32)
    store.append(keys, -keys)
    assert pool.counts() == {"device": 0, "host": 3, "disk": 3}
    assert (tmp_path / "spill.bin").stat().st_size > 0
    for pages in ([0, 1], [4, 5], [2, 3]):
        k_out, v_out = gather_pages(pool, 0, np.broadcast_to(np.array(pages), (KV_HEADS, 2)))
        want = np.concatenate([keys[:, p * PAGE:(p + 1) * PAGE] for p in pages], axis=1)
        np.testing.assert_array_equal(k_out[:, :2 * PAGE], want)
        np.testing.assert_array_equal(v_out[:, :2 * PAGE], -want)
    assert pool.pages_restored >= 2 and sum(pool.counts()[t] for t in ("host", "disk")) == 6
    assert pool.transfer_bytes == 6 * pool.page_bytes  # every gathered page came from below the device pool
    pool.close()
    assert not (tmp_path / "spill.bin").exists()


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_a_page_spilled_while_it_is_written_is_read_back_and_completed(tmp_path, kv_dtype):
    """Another layer's new pages push this layer's half-written page to disk; the next token must bring
    it back before writing (an INT8 page is quantized when full, into its record read back)."""
    record_bytes = TieredPool(1, KV_HEADS, HEAD_DIM, PAGE, 0, 0, tmp_path / "probe", kv_dtype).page_bytes
    pool = TieredPool(2, KV_HEADS, HEAD_DIM, PAGE, 1 << 30, 3 * record_bytes, tmp_path / "spill.bin", kv_dtype)
    first, second = LayerPages(0, pool), LayerPages(1, pool)
    rng = np.random.default_rng(5)
    keys = rng.normal(size=(KV_HEADS, PAGE, HEAD_DIM)).astype(np.float32)
    first.append(keys[:, :2], -keys[:, :2])
    second.append(np.ones((KV_HEADS, 3 * PAGE, HEAD_DIM), np.float32), np.ones((KV_HEADS, 3 * PAGE, HEAD_DIM), np.float32))
    assert pool.table.tier[0, 0] == DISK  # layer 0's open page went to disk
    first.append(keys[:, 2:], -keys[:, 2:])  # completes the page
    got_k, got_v = pool.read(0, 0)
    atol = 0.05 if kv_dtype == "int8" else 0
    np.testing.assert_allclose(got_k, keys, atol=atol)
    np.testing.assert_allclose(got_v, -keys, atol=atol)
    pool.close()


def test_device_pool_evicts_the_least_recently_gathered_pages_of_any_layer(tmp_path):
    page_bytes = 2 * KV_HEADS * PAGE * HEAD_DIM * 4
    pool = TieredPool(2, KV_HEADS, HEAD_DIM, PAGE, 10 * page_bytes, 100 * page_bytes, tmp_path / "spill.bin")
    for layer in (0, 1):
        for page in range(6):
            pool.allocate(layer, page)

    def moved(layer: int, page: int) -> int:
        before = pool.transfer_bytes
        pool.fetch(layer, np.array([page]))
        return (pool.transfer_bytes - before) // page_bytes

    order = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (0, 3), (1, 3), (0, 4), (1, 4)]
    assert [moved(*p) for p in order] == [1] * 10 and pool.counts()["device"] == 10  # full, not over
    assert moved(1, 5) == 1  # over capacity: down to 95% of it, the two oldest (layer 0's pages 0 and 1) leave
    assert pool.counts()["device"] == 9
    assert [moved(0, 2), moved(1, 0), moved(0, 0), moved(0, 1)] == [0, 0, 1, 1]
    pool.close()


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("prefill", [False, True])
def test_budget_buffer_holds_exactly_the_selection_as_it_changes(tmp_path, kv_dtype, prefill):
    """Step after step, with selections that keep some pages and swap others, the buffer's visible rows are,
    per head, exactly the rows of the selected pages (INT8 pages: as the pool decodes them), and empty slots
    are masked; after clear(), over a new cache, the same (the sink page included). Decode steps write one
    page and keep the buffer; prefill chunks write several and clear it first, as the layers share it."""
    rng = np.random.default_rng(4)
    budget_pages = 9
    buffer = BudgetBuffer.over(np.zeros((KV_HEADS, budget_pages * PAGE, HEAD_DIM), np.float32),
                               np.zeros((KV_HEADS, budget_pages * PAGE, HEAD_DIM), np.float32), PAGE)
    for cache in range(2):
        (tmp_path / str(cache)).mkdir()
        pool, store = make_store(tmp_path / str(cache), kv_dtype=kv_dtype)
        keys = rng.normal(size=(KV_HEADS, 120, HEAD_DIM)).astype(np.float32)
        buffer.clear()
        check_budget_buffer(buffer, pool, store, keys, budget_pages, kv_dtype, rng, prefill)


def check_budget_buffer(buffer, pool, store, keys, budget_pages, kv_dtype, rng, prefill):
    for length in (1, 5, 9, 17, 23, 30, 60, 61, 64, 65, 90, 100, 119):
        start = store.length
        store.append(keys[:, start:length], -keys[:, start:length])
        q = rng.normal(size=(KV_HEADS * GROUPS, length - start if prefill else 1, HEAD_DIM)).astype(np.float32)
        first_new = start // PAGE if prefill else store.n_pages - 1
        selection = select_pages("quest", q, store.bounds(), store.n_pages, first_new, budget_pages)
        if prefill:
            buffer.clear()
        buffer.update(pool, 0, selection)
        visible = buffer.positions(selection) < length  # every stored position is at or before the step's last
        for head, pages in enumerate(selection.pages()):
            page_positions = (pages[:, None] * PAGE + np.arange(PAGE)).ravel()
            stored = page_positions < length
            rows = page_positions[stored]
            want_k, want_v = keys[head, rows], -keys[head, rows]
            if kv_dtype == "int8":
                decoded = [pool.read(0, int(page)) for page in pages]
                want_k = np.concatenate([k[head] for k, _ in decoded])[stored]
                want_v = np.concatenate([v[head] for _, v in decoded])[stored]
                np.testing.assert_allclose(want_k, keys[head, rows], atol=0.05)  # the reference is INT8's
            got_k, got_v = buffer.k[head][visible], buffer.v[head][visible]
            assert sorted(map(tuple, got_k)) == sorted(map(tuple, want_k)), length
            assert sorted(map(tuple, got_v)) == sorted(map(tuple, want_v)), length


def load_selection_oracle():
    path = Path(__file__).parents[1] / "benchmarks" / "selection_oracle.py"
    spec = importlib.util.spec_from_file_location("selection_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("steps", [1, 8])  # decode's few rows and a chunk's many take different products
def test_attention_mass_is_each_rows_softmax_summed_per_page(steps):
    """Against a plain softmax per row over every key it sees (the candidates, then the local keys where
    visible), summed over the rows and per page of page_size keys."""
    rng = np.random.default_rng(5)
    n_rows = GROUPS * steps
    rows = rng.normal(size=(KV_HEADS, n_rows, HEAD_DIM)).astype(np.float32)
    keys = rng.normal(size=(KV_HEADS, 5, PAGE, HEAD_DIM)).astype(np.float32)
    local = rng.normal(size=(KV_HEADS, 3, HEAD_DIM)).astype(np.float32)
    visible = rng.random((n_rows, 3)) < 0.5
    mass = attention_mass(rows, keys, local, visible)
    for head in range(KV_HEADS):
        want = np.zeros(5)
        for r in range(n_rows):
            logits = np.concatenate([keys[head].reshape(-1, HEAD_DIM) @ rows[head, r],
                                     np.where(visible[r], local[head] @ rows[head, r], -np.inf)]) / np.sqrt(HEAD_DIM)
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            want += weights[:5 * PAGE].reshape(5, PAGE).sum(axis=1)
        np.testing.assert_allclose(mass[head], want, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_decode_attention_mass_read_from_the_host_records_is_that_of_the_decoded_keys(tmp_path, kv_dtype):
    """The compiled decode path reads each candidate's keys where they lie (INT8 dequantized on the fly),
    in any order of pages per head, and must give attention_mass of the keys read_keys decodes, with the
    sink's and the current page's keys in each row's softmax as far as the row sees them."""
    pool, store = make_store(tmp_path, kv_dtype=kv_dtype)
    rng = np.random.default_rng(8)
    keys = rng.normal(size=(KV_HEADS, 12 * PAGE + 2, HEAD_DIM)).astype(np.float32)
    store.append(keys, keys)
    candidates = np.array([[3, 1, 10, 7], [2, 9, 4, 11]])  # pages wholly in the past, each head its own
    rows = 2 * rng.normal(size=(KV_HEADS, GROUPS, HEAD_DIM)).astype(np.float32)
    local = pool.read_keys(0, np.array([[0, 12]] * KV_HEADS)).reshape(KV_HEADS, -1, HEAD_DIM)
    local_positions = np.concatenate([np.arange(PAGE), 12 * PAGE + np.arange(PAGE)])
    row_positions = np.array([12 * PAGE + 1])  # the current page holds two tokens: the rest is unwritten
    mass = np.empty(candidates.shape, np.float32)
    layer_keys = LayerKeys(pool, 0)
    record_page_mass(rows, *layer_keys.records(candidates), PAGE, local, local_positions, row_positions,
                     *layer_keys.shifts(candidates), mass)
    visible = np.broadcast_to(local_positions <= row_positions[0], (GROUPS, 2 * PAGE))
    want = attention_mass(rows, layer_keys.read(candidates), local, visible)
    assert np.ptp(want, axis=1).min() > 0.1  # the pages differ: a permutation would show
    np.testing.assert_allclose(mass, want, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("fold,group", [(1, 1), (4, 1), (0, 4)])  # clamped; folded into 4; grouped by 4
def test_decode_attention_mass_of_far_keys_rotated_as_read_is_that_of_the_rotated_keys(tmp_path, kv_dtype, fold,
                                                                                         group):
    """Under the far position schemes the compiled decode path rotates the far candidates' keys as it
    reads them (FarKeys.shifts): it must give attention_mass of the keys FarKeys.read rotates first."""
    pool, store = make_store(tmp_path, kv_dtype=kv_dtype)
    rng = np.random.default_rng(9)
    keys = rng.normal(size=(KV_HEADS, 12 * PAGE + 2, HEAD_DIM)).astype(np.float32)
    store.append(keys, keys)
    rope = Rope(1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM), 1.0)
    far_keys = FarKeys(LayerKeys(pool, 0), FarPages(7, 7 * PAGE - (fold or 7 * PAGE // group), fold, group),
                        KeyShifter(rope))
    candidates = np.array([[3, 1, 10, 7], [2, 9, 4, 11]])  # far pages 1..6, near 7..11
    rows = 2 * rng.normal(size=(KV_HEADS, GROUPS, HEAD_DIM)).astype(np.float32)
    local = far_keys.read(np.array([[0, 12]] * KV_HEADS)).reshape(KV_HEADS, -1, HEAD_DIM)
    local_positions = np.concatenate([np.arange(PAGE), 12 * PAGE + np.arange(PAGE)])
    row_positions = np.array([12 * PAGE + 1])
    mass = np.empty(candidates.shape, np.float32)
    record_page_mass(rows, *far_keys.records(candidates), PAGE, local, local_positions, row_positions,
                     *far_keys.shifts(candidates), mass)
    visible = np.broadcast_to(local_positions <= row_positions[0], (GROUPS, 2 * PAGE))
    want = attention_mass(rows, far_keys.read(candidates), local, visible)
    np.testing.assert_allclose(mass, want, rtol=1e-4, atol=1e-7)
    unrotated = attention_mass(rows, LayerKeys(pool, 0).read(candidates), local, visible)
    assert np.abs(unrotated - want).max() > 1e-3  # the far keys' rotation shows in the mass


def test_rerank_and_the_oracle_keep_the_page_attention_wants_where_quests_bound_misleads(tmp_path):
    """Page 3's keys all align with the query; page 6's per-channel maxima come from different keys, so
    its Quest bound (3 per channel) beats page 3's (0.5 per channel) although each of its keys scores 0:
    Quest keeps page 6; the rerank policy (both pages in its shortlist) and the oracle of
    benchmarks/selection_oracle.py keep page 3."""
    pool, store = make_store(tmp_path)
    keys = np.zeros((KV_HEADS, 40, HEAD_DIM), np.float32)
    keys[:, 12:16] = 0.5
    keys[:, 24:28] = -1.0
    for i in range(HEAD_DIM):  # each of page 6's keys holds the max of a quarter of the channels
        keys[:, 24 + i % PAGE, i] = 3.0
    store.append(keys, keys)
    q = np.ones((KV_HEADS * GROUPS, 1, HEAD_DIM), np.float32)
    quest = select_pages("quest", q, store.bounds(), store.n_pages, first_new=store.n_pages - 1, budget_pages=3)
    assert quest.middle.tolist() == [[6]] * KV_HEADS
    rerank = select_pages("rerank", q, store.bounds(), store.n_pages, store.n_pages - 1, 3, LayerKeys(pool, 0),
                          row_positions=np.array([store.length - 1]))
    assert rerank.pages().tolist() == [[0, 3, 9]] * KV_HEADS
    study = load_selection_oracle()
    assert study.attention_mass_selection(0, q, store, quest).pages().tolist() == [[0, 3, 9]] * KV_HEADS


def test_a_decode_shortlist_holds_the_pages_kept_from_the_step_before(tmp_path):
    """Pages 5-9 bound high (each channel's max from a different key) and score 0; page 3's keys score 8
    but bound lower than those five. With a room of 1 the shortlist of 4 holds only misleading pages, and
    rerank picks one of them; with page 3 kept from the step before it is shortlisted, and chosen. Kept
    pages outside 1..older-1 (the sink, the page the step writes) change nothing."""
    pool, store = make_store(tmp_path)
    keys = np.full((KV_HEADS, 12 * PAGE, HEAD_DIM), -1.0, np.float32)
    keys[:, 3 * PAGE:4 * PAGE] = 0.5
    for page in range(5, 10):
        for i in range(HEAD_DIM):
            keys[:, page * PAGE + i % PAGE, i] = 3.0
    store.append(keys, keys)
    q = np.ones((KV_HEADS * GROUPS, 1, HEAD_DIM), np.float32)

    def middle(kept):
        return select_pages("rerank", q, store.bounds(), store.n_pages, 11, 3, LayerKeys(pool, 0),
                            np.array([store.length - 1]), kept=kept).middle.tolist()

    alone = middle(None)
    assert all(5 <= page <= 9 for (page,) in alone)
    assert middle(np.array([[3]] * KV_HEADS)) == [[3]] * KV_HEADS
    assert middle(np.array([[0, 11]] * KV_HEADS)) == alone


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("count", [1, 62, 499])
def test_top_pages_are_the_highest_of_distinct_scores(count, outliers):
    """Distinct scores, spread out (the bin of the count-th highest holds a few of them) or with a few
    huge ones, which put every other score into the histogram's lowest bin."""
    rng = np.random.default_rng(count)
    scores = rng.normal(size=(3, 500)).astype(np.float32)
    if outliers:
        scores[:, [7, 300]] = 1e6
    top = top_pages(scores, count)
    for row, chosen in zip(scores, top):
        assert len(set(chosen)) == count
        np.testing.assert_array_equal(np.sort(row[chosen]), np.sort(row)[len(row) - count:])


@pytest.mark.parametrize("count", [0, 1, 5, 39, 40])
def test_top_pages_are_the_highest_scores_ties_included(count):
    rng = np.random.default_rng(count)
    scores = rng.integers(0, 12, size=(3, 40)).astype(np.float32)  # many ties
    top = top_pages(scores, count)
    assert top.shape == (3, count)
    for row, chosen in zip(scores, top):
        assert len(set(chosen)) == count
        np.testing.assert_array_equal(np.sort(row[chosen]), np.sort(row)[len(row) - count:])
