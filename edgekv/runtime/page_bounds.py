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
    """The bounds of pages first.. (all of them unless drop_before was called): page p in column p - base of
    `full`."""

    def __init__(self, kv_heads: int, head_dim: int):
        self.full = np.empty((kv_heads, 2 * head_dim, 64 + ROW_PAD_PAGES), dtype=np.uint16)  # full pages, bfloat16 bits
        self.base = 0  # the page in column 0 of `full`
        self.first = 0  # the first page whose bounds are kept (pages base..first-1 are dead columns)
        # The open page's bounds, updated at every token, are kept apart in one contiguous block: its
        # column of `full` spans kv_heads*2*head_dim cache lines, each a likely miss after a graph call has
        # streamed the weights through the caches. No selection reads them: the open page is always selected.
        self.open = np.empty((kv_heads, 2 * head_dim), dtype=np.float32)

    def add_page(self, page: int) -> None:
        if page - self.base == self.full.shape[2]:  # full: the kept columns move to column 0 of a new array
            kept = page - self.first
            # A constant factor more than the kept pages: amortised O(1) copies per page, whether the pages
            # all stay or a window of them moves along (then the array is sized by the window).
            capacity = -(-int(kept * GROWTH) // 64) * 64 + ROW_PAD_PAGES
            moved = np.empty(self.full.shape[:2] + (capacity,), self.full.dtype)
            moved[:, :, :kept] = self.full[:, :, self.first - self.base:page - self.base]
            self.full, self.base = moved, self.first

    def seal(self, page: int) -> None:
        """The open page filled: its bounds join the full pages'."""
        self.full[:, :, page - self.base] = bfloat16_outward(self.open)

    def drop_before(self, page: int) -> None:
        """Forget the bounds of the pages before `page`, which no selection will score on these bounds again
        (a far position scheme scores them on their far bounds from now on); their memory is reused when
        the array next fills."""
        self.first = max(self.first, page)
