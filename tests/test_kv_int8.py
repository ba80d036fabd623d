"""INT8 KV pages in the host and disk tiers: the rounding bound, the page being written kept exact,
spilling that changes nothing, and a real engine run with its bytes moved."""

import numpy as np

from conftest import gather_pages
from edgekv.core.manifest import load_verified
from edgekv.runtime.engine import Engine
from edgekv.runtime.page_format import PageFormat
from edgekv.runtime.paged_cache import LayerPages
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.tiers import TieredPool

KV_HEADS, PAGE, HEAD_DIM = 3, 8, 64  # SmolLM2-135M's KV shape with npu-small's pages


def int8_store(tmp_path, host_pages: int = 1000) -> tuple[TieredPool, LayerPages]:
    page_bytes = PageFormat("int8", KV_HEADS, PAGE, HEAD_DIM).page_bytes
    pool = TieredPool(1, KV_HEADS, HEAD_DIM, PAGE, 1 << 30, host_pages * page_bytes, tmp_path / "spill.bin", "int8")
    return pool, LayerPages(0, pool)


def test_int8_pages_are_a_third_of_float_and_round_within_half_a_step():
    fmt = PageFormat("int8", KV_HEADS, PAGE, HEAD_DIM)
    assert fmt.page_bytes / fmt.float_page_bytes < 0.33
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(KV_HEADS, PAGE, HEAD_DIM)).astype(np.float32)
    keys[:, :, 5] *= 40  # an outlier channel: per-channel key scales keep the others fine
    values = rng.normal(size=keys.shape).astype(np.float32)
    store = np.zeros(2, fmt.record)
    fmt.encode(store, 1, keys, values)
    got_k, got_v = fmt.decode(store, (np.array([1]),))
    k_step = np.abs(keys).max(axis=1, keepdims=True) / 127  # per page, head and channel
    v_step = np.abs(values).max(axis=2, keepdims=True) / 127  # per page, head and token
    assert np.all(np.abs(got_k[0] - keys) <= k_step / 2 + 1e-6)
    assert np.all(np.abs(got_v[0] - values) <= v_step / 2 + 1e-6)
    assert np.abs(got_k[0][:, :, 0] - keys[:, :, 0]).max() < 0.02  # untouched by channel 5's outlier


def test_page_being_written_stays_exact_until_full(tmp_path):
    pool, store = int8_store(tmp_path)
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(KV_HEADS, PAGE + 5, HEAD_DIM)).astype(np.float32)
    store.append(keys, -keys)
    k, v = store.read()
    np.testing.assert_array_equal(k[:, PAGE:], keys[:, PAGE:])  # the open page: float32, exact
    assert 0 < np.abs(k[:, :PAGE] - keys[:, :PAGE]).max() < 0.05  # the full page: INT8
    np.testing.assert_array_equal(v[:, PAGE:], -keys[:, PAGE:])


def test_spilled_int8_pages_come_back_as_they_were(tmp_path):
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(KV_HEADS, 6 * PAGE, HEAD_DIM)).astype(np.float32)
    gathered = []
    for host_pages in (1000, 3):
        (tmp_path / str(host_pages)).mkdir()
        pool, store = int8_store(tmp_path / str(host_pages), host_pages)
        store.append(keys, 2 * keys)
        rounds = [gather_pages(pool, 0, np.broadcast_to(np.array(pages), (KV_HEADS, 2)))
                  for pages in ([0, 1], [4, 5], [2, 3])]
        gathered.append(rounds)
        if host_pages == 3:
            assert pool.pages_spilled > 0 and pool.pages_restored > 0
        pool.close()
    for (k_mem, v_mem), (k_disk, v_disk) in zip(*gathered):
        np.testing.assert_array_equal(k_mem, k_disk)
        np.testing.assert_array_equal(v_mem, v_disk)


def test_engine_with_int8_pages_moves_fewer_bytes_and_spills_exactly(tiny_artifacts, tmp_path):
    artifact = tiny_artifacts["llama"]
    model = load_verified(artifact).model
    page_bytes = PageFormat("int8", model["kv_heads"], PAGE, model["head_dim"]).page_bytes
    prompt = list(range(3, 200))  # 27 pages in each of 3 layers
    runs = {}
    for name, kwargs in (("float32", {}), ("int8", {"kv_dtype": "int8"}),
                         ("int8 spilled", {"kv_dtype": "int8", "host_kv_bytes": 40 * page_bytes})):
        engine = Engine.open(artifact, "quest", spill_dir=tmp_path, budget=64, **kwargs)
        try:
            tokens = list(engine.generate(prompt, 16, Sampler(SamplingConfig()), eos_ids=set()))
            usage = engine.cache.usage()
            runs[name] = (tokens, usage.transfer_bytes, usage.pages, usage.pages_spilled)
        finally:
            engine.close()
    assert runs["int8 spilled"][3] > 0
    assert runs["int8 spilled"][0] == runs["int8"][0]  # spilling moves records, it does not re-round them
    assert runs["int8"][1] < 0.4 * runs["float32"][1]
    assert sum(runs["int8"][2].values()) == sum(runs["float32"][2].values())
