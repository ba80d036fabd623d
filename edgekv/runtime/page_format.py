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
from numba import njit

KV_DTYPES = ("float32", "int8")
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
        values = store["v"][index].astype(np.float32) * store["v_scale"][index][..., :, None]
        return self.decode_keys(store, index), values

    def copy_pages(self, store: np.ndarray, slots: np.ndarray, heads: np.ndarray, k_out: np.ndarray,
                   v_out: np.ndarray, out_pages: np.ndarray) -> None:
        """decode() of one KV head of records `slots`, written straight into k_out/v_out [kv_heads, pages,
        page_size, head_dim]: record slots[i], head heads[i] into [heads[i], out_pages[i]]."""
        if self.quantized:
            copy_int8_pages(store["k"], store["v"], store["k_scale"], store["v_scale"], slots, heads,
                            k_out, v_out, out_pages)
        else:
            copy_float_pages(store["k"], store["v"], slots, heads, k_out, v_out, out_pages)

    def decode_keys(self, store: np.ndarray, index: tuple) -> np.ndarray:
        """decode()'s keys alone (selection reads keys, not values)."""
        if not self.quantized:
            return store["k"][index]
        return store["k"][index].astype(np.float32) * store["k_scale"][index][..., None, :]


# Compiled: a decode step copies a few dozen page-heads per layer into the resident budgets, and numpy's
# fancy indexing made two copies of each and cost several microseconds per call (benchmarks/RESULTS.md).
# Element loops, not slice assignments: the record fields are strided views, for which numba's slice copy
# is generic code (45 page-heads in cache: 15.5 us, the loops 8.7). Four pages at a time: their sources are
# scattered in DRAM, and eight streams in flight instead of two cut the copies in the runtime from 54-58
# to 32-41 us per layer and step at 8K (eight at a time: no better; benchmarks/host_step.py).
@njit(cache=True)
def copy_float_pages(keys, values, slots, heads, k_out, v_out, out_pages) -> None:
    page_size, head_dim = keys.shape[2], keys.shape[3]
    n = len(slots)
    done = 0
    while done + 4 <= n:
        s0, s1, s2, s3 = slots[done], slots[done + 1], slots[done + 2], slots[done + 3]
        h0, h1, h2, h3 = heads[done], heads[done + 1], heads[done + 2], heads[done + 3]
        o0, o1, o2, o3 = out_pages[done], out_pages[done + 1], out_pages[done + 2], out_pages[done + 3]
        for t in range(page_size):
            for d in range(head_dim):
                k_out[h0, o0, t, d] = keys[s0, h0, t, d]
                k_out[h1, o1, t, d] = keys[s1, h1, t, d]
                k_out[h2, o2, t, d] = keys[s2, h2, t, d]
                k_out[h3, o3, t, d] = keys[s3, h3, t, d]
                v_out[h0, o0, t, d] = values[s0, h0, t, d]
                v_out[h1, o1, t, d] = values[s1, h1, t, d]
                v_out[h2, o2, t, d] = values[s2, h2, t, d]
                v_out[h3, o3, t, d] = values[s3, h3, t, d]
        done += 4
    for i in range(done, n):
        slot, head, out = slots[i], heads[i], out_pages[i]
        for t in range(page_size):
            for d in range(head_dim):
                k_out[head, out, t, d] = keys[slot, head, t, d]
                v_out[head, out, t, d] = values[slot, head, t, d]


@njit(cache=True)
def copy_int8_pages(keys, values, k_scale, v_scale, slots, heads, k_out, v_out, out_pages) -> None:
    page_size, head_dim = keys.shape[2], keys.shape[3]
    for i in range(len(slots)):
        slot, head, out = slots[i], heads[i], out_pages[i]
        for t in range(page_size):
            for d in range(head_dim):
                k_out[head, out, t, d] = keys[slot, head, t, d] * k_scale[slot, head, d]
                v_out[head, out, t, d] = values[slot, head, t, d] * v_scale[slot, head, t]
