"""Quest's page metadata of one layer: per page, KV head and channel, the min and max of its keys.

Keys are stored after RoPE at their absolute positions, so a page's bounds hold for its true positions.
The upper bound of q·k over a page is then sum_i max(q_i*max_i, q_i*min_i) (Quest), computed for all
pages at once in selection.py. The bounds are laid out [kv_heads, 2*head_dim, pages] (max rows, then min
rows): scoring runs along the contiguous page axis, one channel row at a time. Full pages keep them in
bfloat16, rounded outward (each max up, each min down) so that the score stays an upper bound: decode
reads every page's bounds at every layer and token, and half the bytes is a shorter read.
"""

from __future__ import annotations

import numpy as np

from edgekv.runtime.bfloat16 import bfloat16_outward

# Pages of slack past each growth of the capacity, which is a multiple of 64 pages: 64 bytes, so that a
# channel row's stride is never a multiple of 4 KiB. At power-of-two strides the sixteen rows a score pass
# streams map to the same L1 sets and evict each other (the score at 4096 pages took 1.9x as long;
# benchmarks/RESULTS.md).
ROW_PAD_PAGES = 32
# The capacity grows by a quarter: a row's unused tail shares memory pages with the next row's start, so
# the whole array is resident and its slack is RAM (doubling left up to half of it unused; RESULTS.md).
GROWTH = 1.25


class PageBounds:
    def __init__(self, kv_heads: int, head_dim: int):
        self.full = np.empty((kv_heads, 2 * head_dim, 64 + ROW_PAD_PAGES), dtype=np.uint16)  # full pages, bfloat16 bits
        # The open page's bounds, updated at every token, are kept apart in one contiguous block: its
        # column of `full` spans kv_heads*2*head_dim cache lines, each a likely miss after a graph call has
        # streamed the weights through the caches. No selection reads them: the open page is always selected.
        self.open = np.empty((kv_heads, 2 * head_dim), dtype=np.float32)

    def add_page(self, page: int) -> None:
        if page == self.full.shape[2]:  # grow by a constant factor: amortised O(1) per page
            capacity = -(-int(page * GROWTH) // 64) * 64 + ROW_PAD_PAGES
            grown = np.empty(self.full.shape[:2] + (capacity,), self.full.dtype)
            grown[:, :, :page] = self.full
            self.full = grown

    def seal(self, page: int) -> None:
        """The open page filled: its bounds join the full pages'."""
        self.full[:, :, page] = bfloat16_outward(self.open)
