"""The paged KV cache of one layer: post-RoPE keys and values in pages, with Quest's page metadata.

Keys are stored after RoPE at their absolute positions, so a gathered page keeps its true positions.
Each page keeps, per KV head and channel, the min and max of its keys: the upper bound of q·k over the
page is then sum_i max(q_i*max_i, q_i*min_i) (Quest), computed for all pages at once in selection.py.
The bounds are laid out [kv_heads, 2*head_dim, pages] (max rows, then min rows): scoring runs along the
contiguous page axis, one channel row at a time (selection.py). They are kept in bfloat16, rounded
outward (each max up, each min down) so that the score stays an upper bound: decode reads every page's
bounds from memory at every layer and token, and half the bytes is a shorter read (benchmarks/RESULTS.md).
bfloat16 is float32's upper half, so widening it back is a shift.

Where a page's bytes live (host RAM or the disk spill file) is the business of tiers.py; this class
holds the per-layer page table and the metadata, which always stay in RAM.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from edgekv.runtime.tiers import TieredPool


class PageStore:
    """Pages of one layer. Page i holds the tokens at positions i*page_size .. (i+1)*page_size-1."""

    def __init__(self, layer: int, pool: TieredPool):
        self.layer = layer
        self.pool = pool
        self.page_size = pool.page_size
        self.length = 0  # tokens stored
        self.head_dim = pool.head_dim
        self._bounds = np.empty((pool.kv_heads, 2 * pool.head_dim, 64), dtype=np.uint16)  # full pages, bfloat16
        # The open page's bounds, updated at every token, are kept apart in one contiguous block: its
        # column of _bounds spans kv_heads*2*head_dim cache lines, each a likely miss after a graph call
        # has streamed the weights through the caches (writing it once per page instead of per token saved
        # about 8 us per layer and token). No selection reads it before: the open page is always selected.
        self._open_bounds = np.empty((pool.kv_heads, 2 * pool.head_dim), dtype=np.float32)

    @property
    def n_pages(self) -> int:
        return -(-self.length // self.page_size)

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append n tokens: keys and values [kv_heads, n, head_dim], post-RoPE."""
        n, p = keys.shape[1], self.page_size
        written = 0
        while written < n:
            page, offset = divmod(self.length, p)
            take = min(p - offset, n - written)
            if offset == 0:
                self._new_page(page)
            page_k, page_v = self.pool.writable(self.layer, page)
            write_rows(page_k, page_v, offset, keys[:, written:written + take], values[:, written:written + take],
                       self._open_bounds)
            if offset + take == p:
                self.pool.seal(self.layer, page)
                self._bounds[:, :, page] = bfloat16_outward(self._open_bounds)
            self.length += take
            written += take

    def _new_page(self, page: int) -> None:
        if page == self._bounds.shape[2]:  # grow the metadata by doubling: amortised O(1) per page
            self._bounds = np.concatenate([self._bounds, np.empty_like(self._bounds)], axis=2)
        self.pool.allocate(self.layer, page)

    def bounds(self) -> np.ndarray:
        """Per-page key max and min as bfloat16 bits (uint16; widen_bfloat16 gives float32), [kv_heads,
        2*head_dim, capacity]: the store's own array (no copy), whose
        columns 0 .. length // page_size - 1, the full pages, are set; the open page's column is written
        when it fills (a step's selection candidates are all full: the pages it writes are selected anyway).
        The page axis runs to the capacity so that the array stays C-contiguous, which the compiled decode
        score needs (a slice of it would not be)."""
        return self._bounds

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored keys and values, [kv_heads, length, head_dim] each, wherever their pages live."""
        pages = [self.pool.read(self.layer, page) for page in range(self.n_pages)]
        if not pages:
            empty = np.zeros((self.pool.kv_heads, 0, self.head_dim), np.float32)
            return empty, empty.copy()
        keys = np.concatenate([k for k, _ in pages], axis=1)[:, :self.length]
        values = np.concatenate([v for _, v in pages], axis=1)[:, :self.length]
        return keys, values


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


@intrinsic
def float32_from_bits(typingctx, bits):
    """A uint32's bits as a float32, in compiled code (numba has no scalar view)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(inline="always")
def bfloat16_value(bits: np.uint16) -> np.float32:
    """widen_bfloat16 of one value, in compiled code (a shift, vectorized in loops)."""
    return float32_from_bits(np.uint32(bits) << np.uint32(16))


# Compiled, one call: it runs for every layer and token on a few hundred numbers, where numpy's row
# copies, four reductions and their views cost more than the work, and every call made right after a
# graph call runs cold.
@njit(cache=True)
def write_rows(page_k: np.ndarray, page_v: np.ndarray, offset: int, keys: np.ndarray, values: np.ndarray,
               bounds: np.ndarray) -> None:
    """Write keys and values [kv_heads, n, head_dim] into a page's rows offset.. (page_k, page_v
    [kv_heads, page_size, head_dim]) and make bounds [kv_heads, 2*head_dim] (per channel the max, then
    the min) cover them: set from them when offset is 0 (a new page), else widened."""
    heads, n, head_dim = keys.shape
    page_k[:, offset:offset + n] = keys
    page_v[:, offset:offset + n] = values
    for head in range(heads):
        for i in range(head_dim):
            high = keys[head, 0, i] if offset == 0 else max(bounds[head, i], keys[head, 0, i])
            low = keys[head, 0, i] if offset == 0 else min(bounds[head, head_dim + i], keys[head, 0, i])
            for t in range(1, n):
                high = max(high, keys[head, t, i])
                low = min(low, keys[head, t, i])
            bounds[head, i], bounds[head, head_dim + i] = high, low
