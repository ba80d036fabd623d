"""The attention a page's keys receive: what rerank ranks its shortlist by.

For query rows and candidate pages (wholly in the past, seen by every row), each row's softmax runs over
the candidates' keys and the step's local keys (the sink and the pages the step writes, each seen where
the row's position allows); a page's mass is what its keys receive, summed over the rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edgekv.runtime.kernels.intrinsics import float32_from_bits, prefetch
from edgekv.runtime.kernels.rotation import rotate_keys_reference

FEW_ROWS = 16  # rows per KV head up to which a step counts as decode sized (its products take another form)
MAX_LANES = 16  # running maxima of `largest`
PREFETCH_PAGES_AHEAD = 2  # pages record_page_mass asks the caches for ahead of the one it reads
TABLE_LINE = 16  # float32 values of a cos/sin table in a cache line

# Cephes' expf: exp(x) = 2^n * exp(r), r = x - n*ln(2) in [-ln(2)/2, ln(2)/2], exp(r) by a polynomial
# (within 2e-7 of np.exp).
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln(2) in two parts, for an exact r
EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


def attention_mass_reference(rows: np.ndarray, keys: np.ndarray, local_keys: np.ndarray,
                             local_visible: np.ndarray) -> np.ndarray:
    """rows [kv_heads, R, head_dim] (post-RoPE; R: the group's query heads times the step's rows); keys
    [kv_heads, pages, page_size, head_dim], the candidates; local_keys [kv_heads, L, head_dim], seen by row r
    where local_visible [R, L] says so. Returns the mass per candidate page [kv_heads, pages]."""
    heads, pages, page_size, head_dim = keys.shape
    scaled = rows / np.sqrt(head_dim)
    logits = scaled @ keys.reshape(heads, pages * page_size, head_dim).transpose(0, 2, 1)
    local = np.where(local_visible, scaled @ local_keys.transpose(0, 2, 1), -np.inf)
    every = np.concatenate([logits, local], axis=-1)
    weights = np.exp(every - every.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights[..., :pages * page_size].sum(axis=1).reshape(heads, pages, page_size).sum(-1)


def attention_mass(rows: np.ndarray, keys: np.ndarray, local_keys: np.ndarray, local_visible: np.ndarray) -> np.ndarray:
    """attention_mass_reference, the logits by BLAS and each row's softmax in one compiled pass."""
    heads, pages, page_size, head_dim = keys.shape
    scaled = rows * np.float32(1 / np.sqrt(head_dim))
    local = scaled @ local_keys.transpose(0, 2, 1)  # [h, R, L]
    local[:, ~local_visible] = -np.inf
    mass = np.zeros((heads, pages), np.float32)
    for head in range(heads):
        # One head's logits [1, R, pages*P] at a time: a prefill chunk's rows against a dense layer's
        # shortlist are tens of MiB a head, which the process would otherwise hold for all heads at once.
        logits = row_logits(scaled[head:head + 1], keys[head:head + 1].reshape(1, pages * page_size, head_dim))
        add_softmax_page_mass(logits[0], local[head], page_size, mass[head])
    return mass


def row_logits(rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """rows [h, R, D] times keys [h, K, D] transposed: [h, R, K], contiguous. For a few rows BLAS is faster
    with the keys on the left and the rows' transpose contiguous; for many, the plain product is."""
    if rows.shape[1] > FEW_ROWS:
        return rows @ keys.transpose(0, 2, 1)
    return np.ascontiguousarray((keys @ np.ascontiguousarray(rows.transpose(0, 2, 1))).transpose(0, 2, 1))


@njit(cache=True, fastmath=True)
def add_softmax_page_mass(logits: np.ndarray, local_logits: np.ndarray, page_size: int, mass: np.ndarray) -> None:
    """Add to mass [pages] each row's softmax over its logits [R, pages*page_size] and local_logits [R, L]
    (-inf where the row does not see a key), summed per page of the logits: one max, one exp pass and one
    flat accumulation per row, where numpy makes a pass over the logits for each of five operations."""
    weights = np.empty(logits.shape[1], np.float32)
    key_mass = np.zeros(logits.shape[1], np.float32)  # summed over the rows, then per page: flat loops vectorize
    for r in range(logits.shape[0]):
        row, local = logits[r], local_logits[r]
        top = max(largest(row), local.max())
        total = np.float32(0)
        for j in range(len(row)):
            weights[j] = exp_nonpositive(row[j] - top)
            total += weights[j]
        for j in range(len(local)):
            total += exp_nonpositive(local[j] - top)
        share = np.float32(1) / total
        for j in range(len(row)):
            key_mass[j] += weights[j] * share
    for i in range(len(mass)):
        for t in range(page_size):
            mass[i] += key_mass[i * page_size + t]


@njit(inline="always", fastmath=True)
def largest(values: np.ndarray) -> np.float32:
    """values.max() of a non-empty float32 array, in MAX_LANES running maxima that vectorize (numba's max
    is a scalar loop)."""
    lanes = np.full(MAX_LANES, values[0])
    whole = len(values) // MAX_LANES * MAX_LANES
    for j in range(0, whole, MAX_LANES):
        for lane in range(MAX_LANES):
            x = values[j + lane]
            lanes[lane] = x if x > lanes[lane] else lanes[lane]
    top = values[0]
    for lane in range(MAX_LANES):
        top = max(top, lanes[lane])
    for j in range(whole, len(values)):
        top = max(top, values[j])
    return top


@njit(inline="always", fastmath=True)
def exp_nonpositive(x: np.float32) -> np.float32:
    """np.exp(x) for x <= 0 (below -87, where float32 would go subnormal, the value of -87: about 1e-38),
    by Cephes' polynomial, which vectorizes where compiled np.exp calls libm for each value."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * LOG2E + np.float32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p0, p1, p2, p3, p4, p5 = EXP_POLY
    y = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * r * r + r + np.float32(1)
    return y * float32_from_bits(np.uint32(np.int32(n) + 127) << np.uint32(23))


def record_keys(records: np.ndarray, scales: np.ndarray | None, slots: np.ndarray, page_size: int,
                head_dim: int) -> np.ndarray:
    """The float keys [kv_heads, c, page_size, head_dim] of candidate [h, i], a page in record slots[h, i] of
    the host records (rows of their element type, key [head, t, d] at (head * page_size + t) * head_dim + d;
    INT8 keys times scales [records, kv_heads, head_dim])."""
    heads = slots.shape[0]
    per_head = records[:, :heads * page_size * head_dim].reshape(len(records), heads, page_size, head_dim)
    keys = per_head[slots, np.arange(heads)[:, None]].astype(np.float32)
    if scales is not None:
        keys *= scales[slots, np.arange(heads)[:, None]][:, :, None, :]
    return keys


def record_page_mass_reference(rows: np.ndarray, records: np.ndarray, scales: np.ndarray | None, slots: np.ndarray,
                               page_size: int, local_keys: np.ndarray, local_positions: np.ndarray,
                               row_positions: np.ndarray, shifts: np.ndarray | None, cos: np.ndarray,
                               sin: np.ndarray) -> np.ndarray:
    """attention_mass_reference of a decode step's rows [kv_heads, G*S, head_dim] (the S rows fastest) over
    the candidates' keys where they lie in the host records (record_keys), each key rotated by its shift
    (shifts [kv_heads, c, page_size], with rotation.shift_table's cos/sin; None: none rotated); local_keys
    [kv_heads, L, head_dim] at local_positions [L], each seen by the rows whose position (row_positions [S])
    is at least its own."""
    keys = record_keys(records, scales, slots, page_size, rows.shape[2])
    if shifts is not None:
        keys = rotate_keys_reference(keys, shifts, cos, sin)
    visible = local_positions[None, :] <= np.tile(row_positions, rows.shape[1] // len(row_positions))[:, None]
    return attention_mass_reference(rows, keys, local_keys, visible)


@njit(inline="always", fastmath=True)
def rotate_by(source: np.ndarray, shift: int, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """out = source [head_dim] rotated by `shift` positions (rotation.rotate_keys_reference's convention)."""
    half = len(source) // 2
    index, sign = (shift, np.float32(1)) if shift >= 0 else (-shift, np.float32(-1))
    for c in range(half):
        a, b = source[c], source[c + half]
        co, si = cos[index, c], sin[index, c] * sign
        out[c], out[c + half] = a * co - b * si, b * co + a * si


@njit(cache=True, fastmath=True)
def record_page_mass(rows: np.ndarray, records: np.ndarray, scales: np.ndarray | None, slots: np.ndarray,
                     page_size: int, local_keys: np.ndarray, local_positions: np.ndarray, row_positions: np.ndarray,
                     shifts: np.ndarray | None, cos: np.ndarray, sin: np.ndarray, mass: np.ndarray) -> None:
    """record_page_mass_reference into mass [kv_heads, c], reading the keys in place: copying the shortlist's
    keys out of the records first (numpy's fancy index) cost more than the product.

    A page's keys are shifted by s0 + d (s0: its first key's shift; d within a page under every far scheme:
    -t under clamped, 0 under folded), and q·R(s0 + d)k = (R(-s0)q)·(R(d)k): the rows are rotated once a
    page, by one row of the cos/sin table, and a key only by d, whose rows of the table stay in cache.
    Rotating each key by its whole shift read a table row per key, spread over the context's length.
    A page's shifts have one sign (every scheme's do), so the table that covers them covers d."""
    kv_heads, n_rows, head_dim = rows.shape
    n, n_local, steps = slots.shape[1], local_keys.shape[1], len(row_positions)
    span = page_size * head_dim  # one KV head's keys of a page, contiguous in its record
    line = max(1, 64 // records.itemsize)  # elements per cache line
    logits = np.empty((n_rows, n * page_size), np.float32)
    local_logits = np.empty((n_rows, n_local), np.float32)
    scaled = np.empty((n_rows, head_dim), np.float32)
    page_rows = np.empty((n_rows, head_dim), np.float32)  # the rows rotated back by the page's first shift
    head_rows = np.empty((n_rows, head_dim), np.float32)  # those times an INT8 page's key scales
    key_values = np.empty(head_dim, np.float32)  # a shifted key, dequantized
    rotated = np.empty(head_dim, np.float32)  # and rotated by its shift within the page
    for head in range(kv_heads):
        for r in range(n_rows):
            for d in range(head_dim):
                scaled[r, d] = rows[head, r, d] / np.sqrt(np.float32(head_dim))
            for j in range(n_local):
                logit = np.float32(0)
                for d in range(head_dim):
                    logit += scaled[r, d] * local_keys[head, j, d]
                local_logits[r, j] = logit if local_positions[j] <= row_positions[r % steps] else -np.inf
        page_rows[:] = scaled
        head_rows[:] = scaled
        for i in range(n):
            # The pages lie scattered in memory and the step runs cold after a graph call: without asking
            # for the next pages ahead, the loop waits on memory.
            if i + PREFETCH_PAGES_AHEAD < n:
                ahead = slots[head, i + PREFETCH_PAGES_AHEAD] * records.shape[1] + head * span
                for offset in range(0, span, line):
                    prefetch(records, ahead + offset)
                if shifts is not None:  # and the cos/sin row its rows are rotated by
                    row = abs(shifts[head, i + PREFETCH_PAGES_AHEAD, 0]) * cos.shape[1]
                    for offset in range(0, cos.shape[1], TABLE_LINE):
                        prefetch(cos, row + offset)
                        prefetch(sin, row + offset)
            slot = slots[head, i]
            first = 0 if shifts is None else shifts[head, i, 0]
            if shifts is not None:
                for r in range(n_rows):
                    rotate_by(scaled[r], -first, cos, sin, page_rows[r])
            if scales is not None or shifts is not None:
                for r in range(n_rows):
                    for d in range(head_dim):
                        head_rows[r, d] = page_rows[r, d] * (np.float32(1) if scales is None else scales[slot, head, d])
            for t in range(page_size):
                key = records[slot, head * span + t * head_dim:head * span + (t + 1) * head_dim]
                within = 0 if shifts is None else shifts[head, i, t] - first
                if within == 0:
                    for r in range(n_rows):
                        acc = np.float32(0)
                        for d in range(head_dim):
                            acc += head_rows[r, d] * np.float32(key[d])
                        logits[r, i * page_size + t] = acc
                    continue
                for d in range(head_dim):
                    key_values[d] = np.float32(key[d]) * (np.float32(1) if scales is None else scales[slot, head, d])
                rotate_by(key_values, within, cos, sin, rotated)
                for r in range(n_rows):
                    acc = np.float32(0)
                    for d in range(head_dim):
                        acc += page_rows[r, d] * rotated[d]
                    logits[r, i * page_size + t] = acc
        mass[head] = 0
        add_softmax_page_mass(logits, local_logits, page_size, mass[head])
