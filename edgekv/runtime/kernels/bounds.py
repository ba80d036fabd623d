"""Quest's page bounds: keeping them as keys are written, and scoring a decode step's query rows on them.

A page's bound is, per KV head and channel, the max and the min of its keys ([kv_heads, 2*head_dim]:
max rows, then min rows). Its score for a query row x is the upper bound of x·k over the page's keys,
sum_i max(x_i*max_i, x_i*min_i) = relu(x)·max + min(x, 0)·min.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edgekv.runtime.bfloat16 import widen_bfloat16
from edgekv.runtime.kernels.intrinsics import bfloat16_value

SCORE_CHANNELS = 16  # channels bound_scores takes a pass


def widen_bounds_reference(bounds: np.ndarray, offset: int, keys: np.ndarray) -> None:
    """Make bounds [kv_heads, 2*head_dim] cover keys [kv_heads, n, head_dim]: set from them at offset 0 (a new
    page), else widened."""
    head_dim = keys.shape[2]
    high, low = keys.max(axis=1), keys.min(axis=1)
    if offset:
        high, low = np.maximum(high, bounds[:, :head_dim]), np.minimum(low, bounds[:, head_dim:])
    bounds[:, :head_dim], bounds[:, head_dim:] = high, low


def write_rows_reference(page_k: np.ndarray, page_v: np.ndarray, offset: int, keys: np.ndarray, values: np.ndarray,
                         bounds: np.ndarray) -> None:
    """Write keys and values [kv_heads, n, head_dim] into a page's rows offset.. (page_k, page_v [kv_heads,
    page_size, head_dim]) and widen the page's bounds over them (widen_bounds_reference)."""
    n = keys.shape[1]
    page_k[:, offset:offset + n], page_v[:, offset:offset + n] = keys, values
    widen_bounds_reference(bounds, offset, keys)


@njit(cache=True)
def widen_bounds(bounds: np.ndarray, offset: int, keys: np.ndarray) -> None:
    """widen_bounds_reference in one compiled call."""
    heads, n, head_dim = keys.shape
    for head in range(heads):
        for i in range(head_dim):
            high = keys[head, 0, i] if offset == 0 else max(bounds[head, i], keys[head, 0, i])
            low = keys[head, 0, i] if offset == 0 else min(bounds[head, head_dim + i], keys[head, 0, i])
            for t in range(1, n):
                high = max(high, keys[head, t, i])
                low = min(low, keys[head, t, i])
            bounds[head, i], bounds[head, head_dim + i] = high, low


@njit(cache=True)
def write_rows(page_k: np.ndarray, page_v: np.ndarray, offset: int, keys: np.ndarray, values: np.ndarray,
               bounds: np.ndarray) -> None:
    """write_rows_reference in one compiled call (numpy's row copies and four reductions cost more than the
    work on a few hundred numbers)."""
    n = keys.shape[1]
    page_k[:, offset:offset + n] = keys
    page_v[:, offset:offset + n] = values
    widen_bounds(bounds, offset, keys)


def bound_scores_reference(rows: np.ndarray, bounds: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Per KV head, each page's highest score over the rows: rows [kv_heads, R, head_dim] (float32), bounds
    [kv_heads, 2*head_dim, pages] as bfloat16 bits; pages start..stop-1. Returns [kv_heads, stop - start]."""
    wide = widen_bfloat16(bounds[:, :, start:stop])
    split = np.concatenate([np.maximum(rows, 0), np.minimum(rows, 0)], axis=-1)
    return np.matmul(split, wide).max(axis=1)


@njit(cache=True, fastmath=True)
def bound_scores(rows: np.ndarray, bounds: np.ndarray, start: int, stop: int, scores: np.ndarray) -> None:
    """bound_scores_reference into scores, reading per channel only the bound row each query row needs (its
    max where x > 0, else its min): decode reads every page's bounds from memory at every layer and token,
    and the product would also read the half it multiplies by zero. head_dim a multiple of SCORE_CHANNELS."""
    kv_heads, channels, _ = bounds.shape
    head_dim = channels // 2
    n = stop - start
    totals = np.empty((rows.shape[1], n), np.float32)
    for head in range(kv_heads):
        totals[:] = 0
        # SCORE_CHANNELS channels a pass, written out so that the page loop vectorizes: each row's running
        # totals are read and written that many times less often, and as many bound rows stream at once.
        for c in range(0, head_dim, SCORE_CHANNELS):
            for r in range(rows.shape[1]):
                x = rows[head, r, c:c + SCORE_CHANNELS]
                x0, x1, x2, x3, x4, x5, x6, x7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
                x8, x9, x10, x11, x12, x13, x14, x15 = x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]
                b0 = bounds[head, c if x0 > 0 else head_dim + c, start:stop]
                b1 = bounds[head, c + 1 if x1 > 0 else head_dim + c + 1, start:stop]
                b2 = bounds[head, c + 2 if x2 > 0 else head_dim + c + 2, start:stop]
                b3 = bounds[head, c + 3 if x3 > 0 else head_dim + c + 3, start:stop]
                b4 = bounds[head, c + 4 if x4 > 0 else head_dim + c + 4, start:stop]
                b5 = bounds[head, c + 5 if x5 > 0 else head_dim + c + 5, start:stop]
                b6 = bounds[head, c + 6 if x6 > 0 else head_dim + c + 6, start:stop]
                b7 = bounds[head, c + 7 if x7 > 0 else head_dim + c + 7, start:stop]
                b8 = bounds[head, c + 8 if x8 > 0 else head_dim + c + 8, start:stop]
                b9 = bounds[head, c + 9 if x9 > 0 else head_dim + c + 9, start:stop]
                b10 = bounds[head, c + 10 if x10 > 0 else head_dim + c + 10, start:stop]
                b11 = bounds[head, c + 11 if x11 > 0 else head_dim + c + 11, start:stop]
                b12 = bounds[head, c + 12 if x12 > 0 else head_dim + c + 12, start:stop]
                b13 = bounds[head, c + 13 if x13 > 0 else head_dim + c + 13, start:stop]
                b14 = bounds[head, c + 14 if x14 > 0 else head_dim + c + 14, start:stop]
                b15 = bounds[head, c + 15 if x15 > 0 else head_dim + c + 15, start:stop]
                total = totals[r]
                for page in range(n):  # indexed from 0 over the slices: numba vectorizes this form
                    total[page] += (x0 * bfloat16_value(b0[page]) + x1 * bfloat16_value(b1[page])
                                    + x2 * bfloat16_value(b2[page]) + x3 * bfloat16_value(b3[page])
                                    + x4 * bfloat16_value(b4[page]) + x5 * bfloat16_value(b5[page])
                                    + x6 * bfloat16_value(b6[page]) + x7 * bfloat16_value(b7[page])
                                    + x8 * bfloat16_value(b8[page]) + x9 * bfloat16_value(b9[page])
                                    + x10 * bfloat16_value(b10[page]) + x11 * bfloat16_value(b11[page])
                                    + x12 * bfloat16_value(b12[page]) + x13 * bfloat16_value(b13[page])
                                    + x14 * bfloat16_value(b14[page]) + x15 * bfloat16_value(b15[page]))
        for page in range(n):
            best = totals[0, page]
            for r in range(1, rows.shape[1]):
                best = max(best, totals[r, page])
            scores[head, page] = best
