"""How a page's keys and values are stored in the host and disk tiers (profile kv_dtype).

- float32: as the graphs read them.
- int8: symmetric INT8 with per-page scales, a quarter of the bytes plus the scales: keys with one scale
  per page, KV head and channel (keys have outlier channels), values with one per page, KV head and
  token (KIVI, Liu et al. 2024, quantizes keys per channel and values per token for the same reason).
  What the graphs receive is always float32: pages are dequantized as they are gathered, which is where
  an NPU's host link would carry the INT8 bytes.

A page is one record of a structured numpy dtype, so the host tier (an array of records) and the disk
spill file (a memory-mapped array of the same records) hold exactly the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.runtime.kernels.pages import copy_float_pages, copy_int8_pages

INT8_MAX = 127


@dataclass(frozen=True)
class PageFormat:
    kv_dtype: str
    kv_heads: int
    page_size: int
    head_dim: int

    @property
    def quantized(self) -> bool:
        return self.kv_dtype == "int8"

    @property
    def record(self) -> np.dtype:
        shape = (self.kv_heads, self.page_size, self.head_dim)
        if not self.quantized:
            return np.dtype([("k", np.float32, shape), ("v", np.float32, shape)])
        return np.dtype([("k", np.int8, shape), ("v", np.int8, shape),
                         ("k_scale", np.float32, (self.kv_heads, self.head_dim)),
                         ("v_scale", np.float32, (self.kv_heads, self.page_size))])

    @property
    def page_bytes(self) -> int:
        """Bytes of one stored page (what a transfer from the host or disk tier moves)."""
        return self.record.itemsize

    @property
    def float_page_bytes(self) -> int:
        """Bytes of one page as the graphs read it (what the device pool holds)."""
        return 2 * self.kv_heads * self.page_size * self.head_dim * 4

    def encode(self, store: np.ndarray, slot: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Write a page's keys and values [kv_heads, page_size, head_dim] into record `slot` of `store`."""
        if not self.quantized:
            store["k"][slot], store["v"][slot] = keys, values
            return
        k_scale = np.abs(keys).max(axis=1) / INT8_MAX  # [kv_heads, head_dim]
        v_scale = np.abs(values).max(axis=2) / INT8_MAX  # [kv_heads, page_size]
        k_scale[k_scale == 0] = 1.0
        v_scale[v_scale == 0] = 1.0
        store["k"][slot] = np.rint(keys / k_scale[:, None, :])
        store["v"][slot] = np.rint(values / v_scale[:, :, None])
        store["k_scale"][slot], store["v_scale"][slot] = k_scale, v_scale

    def decode(self, store: np.ndarray, index: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Float keys and values of the records at `index` ((slots,) or (slots, heads), numpy indexing
        on the record and head axes): [..., page_size, head_dim] each, copies."""
        if not self.quantized:
            return store["k"][index], store["v"][index]
        keys = store["k"][index].astype(np.float32) * store["k_scale"][index][..., None, :]
        values = store["v"][index].astype(np.float32) * store["v_scale"][index][..., :, None]
        return keys, values

    def copy_pages(self, store: np.ndarray, slots: np.ndarray, heads: np.ndarray, k_out: np.ndarray,
                   v_out: np.ndarray, out_pages: np.ndarray,
                   being_written: tuple[np.ndarray, int, np.ndarray, np.ndarray] | None = None) -> None:
        """decode() of one KV head of records `slots`, written straight into k_out/v_out [kv_heads, pages,
        page_size, head_dim]: record slots[i], head heads[i] into [heads[i], out_pages[i]]. INT8 records
        also take `being_written`, (pages, open_page, open_k, open_v): the entries whose page is open_page
        (quantized only once full, so not yet in its record) come from its float32 rows open_k/open_v."""
        if self.quantized:
            copy_int8_pages(store["k"], store["v"], store["k_scale"], store["v_scale"], slots, heads,
                            k_out, v_out, out_pages, *being_written)
        else:
            copy_float_pages(store["k"], store["v"], slots, heads, k_out, v_out, out_pages)
