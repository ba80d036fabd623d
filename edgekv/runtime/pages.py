"""The paged KV cache of one layer: post-RoPE keys and values in pages, with Quest's page metadata.

Keys are stored after RoPE at their absolute positions, so a gathered page keeps its true positions.
Each page keeps, per KV head and channel, the min and max of its keys: the upper bound of q·k over the
page is then sum_i max(q_i*max_i, q_i*min_i) (Quest), computed for all pages at once in selection.py.

Where a page's bytes live (host RAM or the disk spill file) is the business of tiers.py; this class
holds the per-layer page table and the metadata, which always stay in RAM.
"""

from __future__ import annotations

import numpy as np

from edgekv.runtime.tiers import TieredPool


class PageStore:
    """Pages of one layer. Page i holds the tokens at positions i*page_size .. (i+1)*page_size-1."""

    def __init__(self, layer: int, pool: TieredPool):
        self.layer = layer
        self.pool = pool
        self.page_size = pool.page_size
        self.length = 0  # tokens stored
        capacity = 64
        self.kmin = np.empty((capacity, pool.kv_heads, pool.head_dim), dtype=np.float32)
        self.kmax = np.empty_like(self.kmin)

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
            k, v = keys[:, written:written + take], values[:, written:written + take]
            self.pool.write(self.layer, page, offset, k, v)
            if offset == 0:
                self.kmin[page], self.kmax[page] = k.min(axis=1), k.max(axis=1)
            else:
                np.minimum(self.kmin[page], k.min(axis=1), out=self.kmin[page])
                np.maximum(self.kmax[page], k.max(axis=1), out=self.kmax[page])
            self.length += take
            written += take

    def _new_page(self, page: int) -> None:
        if page == len(self.kmin):  # grow the metadata by doubling: amortised O(1) per page
            self.kmin = np.concatenate([self.kmin, np.empty_like(self.kmin)])
            self.kmax = np.concatenate([self.kmax, np.empty_like(self.kmax)])
        self.pool.allocate(self.layer, page)

    def metadata(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-page key min and max, [n_pages, kv_heads, head_dim] each (views, no copy)."""
        return self.kmin[:self.n_pages], self.kmax[:self.n_pages]
