"""bfloat16 bits in uint16 arrays: the upper half of float32, so widening is a shift and narrowing drops
the lower half (rounded outward here, for bounds that must stay bounds)."""

from __future__ import annotations

import numpy as np


def bfloat16_outward(bounds: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float32 bounds [..., 2*head_dim] (per channel the max, then the min), each max
    rounded up and each min rounded down, so that they still bound the keys."""
    bits = np.ascontiguousarray(bounds, np.float32).view(np.uint32)
    half = bounds.shape[-1] // 2
    # Dropping the low half rounds toward zero: right for a max below zero and a min above it; the others
    # move one bfloat16 step away from zero when the dropped bits were not all zero.
    away = np.concatenate([bounds[..., :half] > 0, bounds[..., half:] < 0], axis=-1)
    return ((bits >> 16) + (away & ((bits & 0xFFFF) != 0))).astype(np.uint16)


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
