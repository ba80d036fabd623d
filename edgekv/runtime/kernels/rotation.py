"""RoPE's rotations on the host: the step's new queries and keys at their positions, and cached keys by a
number of positions with cos/sin read from a table of shifts.

A key rotated at position n and rotated again by s positions is the key rotated at n + s (rotations
compose), so the far position schemes move a far key to its far position by rotating it
by the difference. The table holds cos/sin of s x inv_freq for s = 0..n-1 (float64 angles, float32 values); a
negative shift reads the table at -s with the sine's sign flipped.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NO_TABLE = np.zeros((1, 1), np.float32)  # the cos/sin a kernel is given where no key is shifted


def rotate_half_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE as transformers applies it (rotate-half convention): x [heads, S, D] times cos [S, D] plus
    x with its halves swapped and the first negated, times sin [S, D]."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


@njit(cache=True)
def rotate_half_in_place(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """rotate_half_reference of q [Hq, S, D] and k [Hkv, S, D], in place, with the same float32 products
    and sums: what the graphs computed before the rotation moved to the host (one call for both)."""
    for x in (q, k):
        heads, rows, dim = x.shape
        half = dim // 2
        for head in range(heads):
            for r in range(rows):
                for c in range(half):
                    a, b = x[head, r, c], x[head, r, c + half]
                    x[head, r, c] = a * cos[r, c] + -b * sin[r, c]
                    x[head, r, c + half] = b * cos[r, c + half] + a * sin[r, c + half]


def shift_table(inv_freq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, D/2] float32 of the rotations by 0..n-1 positions."""
    angles = np.multiply.outer(np.arange(n, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_keys_reference(keys: np.ndarray, shifts: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """keys [..., D] each rotated by its shift (shifts: keys' leading shape), rotate-half convention:
    (a, b) -> (a cos - b sin, b cos + a sin) per channel pair."""
    c, s = cos[np.abs(shifts)], sin[np.abs(shifts)] * np.sign(shifts)[..., None]
    half = cos.shape[1]
    a, b = keys[..., :half], keys[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(np.float32)


@njit(cache=True)
def rotate_keys(keys: np.ndarray, shifts: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rotate_keys_reference for keys [m, page_size, D] and shifts [m, page_size], in one compiled pass."""
    m, rows, dim = keys.shape
    half = dim // 2
    out = np.empty_like(keys)
    for i in range(m):
        for r in range(rows):
            shift = shifts[i, r]
            index, sign = (shift, 1.0) if shift >= 0 else (-shift, -1.0)
            for c in range(half):
                a, b = keys[i, r, c], keys[i, r, c + half]
                co, si = cos[index, c], sin[index, c] * sign
                out[i, r, c] = a * co - b * si
                out[i, r, c + half] = b * co + a * si
    return out


@njit(cache=True)
def rotate_rows(x: np.ndarray, shifts: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """rope.Rope.rotate for x [heads, n, D] rotated by shifts [n] (one per row, every head alike), in one
    compiled pass with its float64 angles and products: a decode step rotates one key per layer, for which
    numpy's dozen calls cost far more than the work."""
    heads, n, dim = x.shape
    half = dim // 2
    out = np.empty_like(x)
    for t in range(n):
        for c in range(half):
            angle = np.float64(shifts[t]) * inv_freq[c]
            co, si = np.cos(angle), np.sin(angle)
            for head in range(heads):
                a, b = np.float64(x[head, t, c]), np.float64(x[head, t, c + half])
                out[head, t, c] = a * co - b * si
                out[head, t, c + half] = b * co + a * si
    return out
