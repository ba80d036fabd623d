"""Every compiled kernel against the numpy reference beside it (edgekv/runtime/kernels/)."""

import numpy as np
import pytest

from edgekv.runtime.bfloat16 import bfloat16_outward
from edgekv.runtime.kernels import attention, bounds, pages, rotation, top
from edgekv.runtime.rope import KeyShifter, Rope

RNG = np.random.default_rng(12)


def test_write_rows_is_its_reference():
    heads, page_size, head_dim = 3, 8, 32
    got, want = [np.zeros((heads, page_size, head_dim), np.float32) for _ in range(2)], \
        [np.zeros((heads, page_size, head_dim), np.float32) for _ in range(2)]
    got_bounds, want_bounds = np.zeros((heads, 2 * head_dim), np.float32), np.zeros((heads, 2 * head_dim), np.float32)
    for offset, n in ((0, 3), (3, 1), (4, 4)):
        keys = RNG.normal(size=(heads, n, head_dim)).astype(np.float32)
        values = RNG.normal(size=keys.shape).astype(np.float32)
        bounds.write_rows(*got, offset, keys, values, got_bounds)
        bounds.write_rows_reference(*want, offset, keys, values, want_bounds)
        for a, b in zip(got + [got_bounds], want + [want_bounds]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows", [1, 64])
def test_rotate_half_in_place_is_its_reference_and_transformers_rope(rows):
    """The host rotates each graph's new q and k as transformers' apply_rotary_pos_emb does, bit for bit."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = np.zeros((rows, 64), np.float32), np.zeros((rows, 64), np.float32)
    Rope(1.0 / 100000 ** (np.arange(0, 64, 2) / 64), 1.0).fill(np.arange(30000, 30000 + rows), cos, sin)
    q = RNG.normal(size=(9, rows, 64)).astype(np.float32)
    k = RNG.normal(size=(3, rows, 64)).astype(np.float32)
    want_q, want_k = (t.numpy() for t in apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k),
                                                               torch.from_numpy(cos), torch.from_numpy(sin),
                                                               unsqueeze_dim=0))
    np.testing.assert_array_equal(rotation.rotate_half_reference(q, cos, sin), want_q)
    rotation.rotate_half_in_place(q, k, cos, sin)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(k, want_k)


def test_rotate_keys_is_its_reference_and_ropes_rotation():
    inv_freq = 1.0 / 10000 ** (np.arange(0, 32, 2) / 32)
    cos, sin = rotation.shift_table(inv_freq, 5000)
    keys = RNG.normal(size=(40, 8, 32)).astype(np.float32)
    shifts = RNG.integers(-4999, 5000, size=(40, 8))
    got = rotation.rotate_keys(keys, shifts, cos, sin)
    np.testing.assert_allclose(got, rotation.rotate_keys_reference(keys, shifts, cos, sin), atol=1e-6)
    rope = Rope(inv_freq, 1.0)
    np.testing.assert_allclose(got, rope.rotate(keys, shifts), atol=2e-6)
    # the shifter grows its table to the largest shift asked for
    shifter = KeyShifter(rope)
    np.testing.assert_allclose(shifter.rotate(keys, shifts), got, atol=1e-6)
    np.testing.assert_allclose(shifter.rotate(keys, shifts * 3), rope.rotate(keys, shifts * 3), atol=2e-6)
    assert len(shifter.cos) > np.abs(shifts * 3).max()


def test_rotate_rows_is_ropes_rotation():
    rope = Rope(1.0 / 100000 ** (np.arange(0, 64, 2) / 64), 1.0)
    keys = RNG.normal(size=(3, 40, 64)).astype(np.float32)
    shifts = -RNG.integers(0, 40000, size=40)  # the clamped scheme's shifts: back to position 0
    got = rotation.rotate_rows(keys, shifts, rope.inv_freq)
    np.testing.assert_array_equal(got, rope.rotate(keys, np.broadcast_to(shifts, (3, 40))))  # the same arithmetic


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_bound_scores_is_its_reference(rows):
    kv_heads, head_dim, n_pages = 3, 64, 300
    low = RNG.normal(size=(kv_heads, head_dim, n_pages)).astype(np.float32)
    high = low + RNG.uniform(0, 2, size=low.shape).astype(np.float32)
    bits = bfloat16_outward(np.concatenate([high, low], axis=1).transpose(0, 2, 1)).transpose(0, 2, 1).copy()
    q = RNG.normal(size=(kv_heads, rows, head_dim)).astype(np.float32)
    q[0, 0, :5] = 0  # a zero channel reads either bound: both give 0
    got = np.empty((kv_heads, 250), np.float32)
    bounds.bound_scores(q, bits, 50, 300, got)
    np.testing.assert_allclose(got, bounds.bound_scores_reference(q, bits, 50, 300), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [3, 40])  # decode sized (BLAS with the keys on the left) and chunk sized
def test_attention_mass_is_its_reference(rows):
    heads, n_pages, page_size, head_dim, n_local = 2, 30, 8, 16, 12
    q = RNG.normal(size=(heads, rows, head_dim)).astype(np.float32) * 3
    keys = RNG.normal(size=(heads, n_pages, page_size, head_dim)).astype(np.float32)
    local = RNG.normal(size=(heads, n_local, head_dim)).astype(np.float32)
    visible = RNG.random((rows, n_local)) < 0.6
    visible[:, 0] = True
    np.testing.assert_allclose(attention.attention_mass(q, keys, local, visible),
                               attention.attention_mass_reference(q, keys, local, visible), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("shifted", [False, True])
def test_record_page_mass_is_its_reference(int8, shifted):
    """With shifts, the keys of the first candidates are rotated (the far keys of the far schemes: a page's
    shifts of one sign, any within it; some by 0 positions), the others read as they are."""
    kv_heads, page_size, head_dim, records, steps, groups = 3, 8, 16, 40, 2, 3
    span = kv_heads * page_size * head_dim
    element = np.int8 if int8 else np.float32
    rows_of_records = (RNG.integers(-127, 128, size=(records, 2 * span)) if int8
                       else RNG.normal(size=(records, 2 * span))).astype(element)
    scales = RNG.uniform(0.01, 0.05, size=(records, kv_heads, head_dim)).astype(np.float32) if int8 else None
    slots = np.stack([RNG.permutation(records)[:10] for _ in range(kv_heads)])
    q = RNG.normal(size=(kv_heads, groups * steps, head_dim)).astype(np.float32)
    local = RNG.normal(size=(kv_heads, 2 * page_size, head_dim)).astype(np.float32)
    local_positions = np.concatenate([np.arange(page_size), 100 + np.arange(page_size)])
    row_positions = np.array([103, 104])
    shifts, cos, sin = None, rotation.NO_TABLE, rotation.NO_TABLE
    if shifted:
        shifts = np.zeros(slots.shape + (page_size,), np.int64)
        shifts[:, :6] = RNG.integers(0, 900, size=(kv_heads, 6, page_size))  # |shift| < the table's 900 rows
        shifts[1, :6] *= -1
        shifts[2, 0] = 600 - np.arange(page_size)  # clamped: every key of the page at one position
        shifts[0, 0, :3] = 0
        cos, sin = rotation.shift_table(1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim), 900)
    got = np.empty(slots.shape, np.float32)
    attention.record_page_mass(q, rows_of_records, scales, slots, page_size, local, local_positions, row_positions,
                               shifts, cos, sin, got)
    want = attention.record_page_mass_reference(q, rows_of_records, scales, slots, page_size, local, local_positions,
                                                row_positions, shifts, cos, sin)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    if shifted:  # the rotation changes which keys a row attends to
        unshifted = attention.record_page_mass_reference(q, rows_of_records, scales, slots, page_size, local,
                                                         local_positions, row_positions, None, cos, sin)
        assert np.abs(unshifted - want).max() > 1e-3


def test_exp_and_largest_are_numpys():
    from numba import njit

    @njit
    def both(x):
        out = np.empty_like(x)
        for i in range(len(x)):
            out[i] = attention.exp_nonpositive(x[i])
        return out, attention.largest(x)

    x = -np.abs(RNG.normal(size=1001).astype(np.float32)) * 30
    x[:3] = (0, -87.5, -200)
    exps, top_value = both(x)
    np.testing.assert_allclose(exps, np.exp(np.maximum(x, -87)), rtol=3e-7)
    assert top_value == x.max()


@pytest.mark.parametrize("count", [1, 17, 300])
def test_top_by_histogram_is_its_reference(count):
    scores = RNG.normal(size=(3, 300)).astype(np.float32)
    got, want = top.top_by_histogram(scores, count), top.top_reference(scores, count)
    for row, a, b in zip(scores, got, want):
        assert sorted(a) == sorted(b)


def test_page_table_stamps_are_their_references():
    tier = RNG.integers(0, 2, size=50).astype(np.int8)
    chosen = RNG.integers(0, 50, size=30)  # with repeats
    last_used = [np.zeros(50, np.int64) for _ in range(2)]
    device = [np.full(50, pages.NOT_ON_DEVICE, np.int64) for _ in range(2)]
    device[0][::3] = device[1][::3] = 5
    assert pages.stamp_fetched(last_used[0], tier, device[0], chosen, 9) == \
        pages.stamp_fetched_reference(last_used[1], tier, device[1], chosen, 9)
    np.testing.assert_array_equal(last_used[0], last_used[1])
    np.testing.assert_array_equal(device[0], device[1])
    assert pages.stamp_used(last_used[0], tier, chosen[:7], 10) == pages.stamp_used_reference(last_used[1], tier,
                                                                                              chosen[:7], 10)


@pytest.mark.parametrize("excess", [1, 7, 20])
def test_evict_oldest_is_its_reference(excess):
    stamps = RNG.integers(0, 6, size=(3, 12)).astype(np.int64)  # ties at every stamp
    stamps[RNG.random(stamps.shape) < 0.2] = pages.NOT_ON_DEVICE
    got, want = stamps.copy(), stamps.copy()
    pages.evict_oldest(got, 10, excess)
    pages.evict_oldest_reference(want, 10, excess)
    np.testing.assert_array_equal(got, want)


def test_assign_slots_is_its_reference():
    got_table, want_table = np.full((2, 6), pages.EMPTY, np.int64), np.full((2, 6), pages.EMPTY, np.int64)
    for _ in range(20):
        middle = np.stack([RNG.choice(np.arange(1, 30), 5, replace=False) for _ in range(2)])
        got = pages.assign_slots(got_table, middle, 31)
        want = pages.assign_slots_reference(want_table, middle, 31)
        np.testing.assert_array_equal(got_table, want_table)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("new_pages", [1, 3])  # a decode step's page, a prefill chunk's
def test_plan_copies_is_its_reference(new_pages):
    got_table, want_table = np.full((2, 6), pages.EMPTY, np.int64), np.full((2, 6), pages.EMPTY, np.int64)
    for step in range(20):
        middle = np.stack([RNG.choice(np.arange(1, 30), 5, replace=False) for _ in range(2)])
        copy_sink = step % 7 == 0
        got = pages.plan_copies(got_table, middle, 30, 30 + new_pages, 11, copy_sink)
        want = pages.plan_copies_reference(want_table, middle, 30, 30 + new_pages, 11, copy_sink)
        np.testing.assert_array_equal(got_table, want_table)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert (got[0][got[2] == 0] == 0).all() and ((got[2] == 0).sum() == 2) == copy_sink  # the sink in slot 0
        assert set(got[0][got[2] >= 11 - new_pages]) == set(range(30, 30 + new_pages))  # new pages in the last slots


@pytest.mark.parametrize("int8", [False, True])
def test_page_copies_are_their_reference(int8):
    records, kv_heads, page_size, head_dim = 20, 3, 8, 16
    shape = (records, kv_heads, page_size, head_dim)
    if int8:
        keys, values = (RNG.integers(-127, 128, size=shape).astype(np.int8) for _ in range(2))
        k_scale = RNG.uniform(0.01, 0.1, size=(records, kv_heads, head_dim)).astype(np.float32)
        v_scale = RNG.uniform(0.01, 0.1, size=(records, kv_heads, page_size)).astype(np.float32)
    else:
        keys, values = (RNG.normal(size=shape).astype(np.float32) for _ in range(2))
        k_scale = v_scale = None
    n = 11  # not a multiple of the float kernel's four at a time
    slots, heads, out_pages = RNG.integers(0, records, n), RNG.integers(0, kv_heads, n), RNG.permutation(16)[:n]
    got = [np.zeros((kv_heads, 16, page_size, head_dim), np.float32) for _ in range(2)]
    want = [np.zeros_like(g) for g in got]
    if int8:  # entries of page 5 come from the float32 rows of the page being written
        page_of = RNG.integers(0, 8, n)
        page_of[[2, 7]] = 5
        open_k, open_v = (RNG.normal(size=(kv_heads, page_size, head_dim)).astype(np.float32) for _ in range(2))
        pages.copy_int8_pages(keys, values, k_scale, v_scale, slots, heads, *got, out_pages, page_of, 5, open_k,
                              open_v)
        pages.copy_pages_reference(keys, values, k_scale, v_scale, slots, heads, *want, out_pages, page_of == 5,
                                   open_k, open_v)
        assert np.array_equal(got[0][heads[2], out_pages[2]], open_k[heads[2]])
    else:
        pages.copy_float_pages(keys, values, slots, heads, *got, out_pages)
        pages.copy_pages_reference(keys, values, k_scale, v_scale, slots, heads, *want, out_pages)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)
