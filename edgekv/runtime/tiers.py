"""Where page bytes live, and the few ways they are read: the tiers of the paged KV cache.

- Host RAM (host_arena.HostArena) up to the profile's host KV budget; beyond it the least recently used
  pages move to a spill file in the session directory (host_arena.SpillFile). Nothing is ever dropped: a
  spilled page that is needed again is read back.
- The device pool (device_pool.DevicePool): which pages an NPU would hold, and the bytes it is sent.
- The page table (page_table.PageTable) says for every layer and page which tier and slot hold it.
- INT8 pages keep the page being written in float32 until it fills (open_pages.OpenPages).

A page holds page_size tokens of K and V for every KV head of one layer, one record of
page_format.PageFormat (float32, or INT8 with per-page scales). Pages are written through `writable`
and `seal`, and read three ways: `copy` into a graph's KV input (after `fetch`), `read_keys` and
`key_records` for a selection policy that reads keys on the host, and `read` for a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekv.core.errors import EdgekvError
from edgekv.runtime.device_pool import DevicePool
from edgekv.runtime.host_arena import HostArena, SpillFile
from edgekv.runtime.kernels.attention import record_keys
from edgekv.runtime.kernels.pages import DISK, HOST
from edgekv.runtime.kernels.rotation import NO_TABLE
from edgekv.runtime.open_pages import OpenPages
from edgekv.runtime.page_format import PageFormat
from edgekv.runtime.page_table import PageTable


class TieredPool:
    """Page bytes of every layer across the tiers."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, page_size: int, device_bytes: int,
                 host_bytes: int, spill_path: Path, kv_dtype: str = "float32"):
        self.kv_heads, self.head_dim, self.page_size = kv_heads, head_dim, page_size
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self.format = PageFormat(kv_dtype, kv_heads, page_size, head_dim)
        self.page_bytes = self.format.page_bytes  # as stored in the host and disk tiers, and moved from them
        self.arena = HostArena(self.format, max(2, host_bytes // self.page_bytes))
        # The device holds pages as the graphs read them: float32.
        self.device = DevicePool(max(1, device_bytes // self.format.float_page_bytes), self.page_bytes)
        self.table = PageTable(layers)
        self.open = OpenPages(layers, kv_heads, page_size, head_dim) if self.format.quantized else None
        self.spill_path = spill_path
        self.spill: SpillFile | None = None
        self.pages_spilled = 0
        self.pages_restored = 0

    @property
    def transfer_bytes(self) -> int:
        return self.device.transfer_bytes

    # -- writing ----------------------------------------------------------------------------------
    def allocate(self, layer: int, page: int) -> None:
        """A layer's next page, empty, in host RAM (spilling the coldest page when RAM is full)."""
        self.table.add(layer, page, self._host_slot(protect=(layer, page)))
        if self.open is not None:
            self.open.open(layer, page)

    def writable(self, layer: int, page: int) -> tuple[np.ndarray, np.ndarray]:
        """The float keys and values [kv_heads, page_size, head_dim] that a page being written is written
        into, in place: its host record (float32 pages; read back first if it was spilled), or the layer's
        open page (INT8 pages, quantized by `seal` when full)."""
        self.table.last_used[layer, page] = self.table.clock
        if self.open is not None:
            return self.open.k[layer], self.open.v[layer]
        if self.table.tier[layer, page] == DISK:
            self._restore(layer, page)
        slot = self.table.slot[layer, page]
        return self.arena.k[slot], self.arena.v[slot]

    def seal(self, layer: int, page: int) -> None:
        """A page has filled: an INT8 page is quantized once, for good."""
        if self.open is None:
            return
        if self.table.tier[layer, page] == DISK:
            self._restore(layer, page)
        self.format.encode(self.arena.records, self.table.slot[layer, page], self.open.k[layer], self.open.v[layer])
        self.open.close(layer)

    # -- reading ----------------------------------------------------------------------------------
    def fetch(self, layer: int, pages: np.ndarray) -> None:
        """Make a layer's selected pages (repeats allowed) readable by `copy`: stamp them as the most recent,
        read spilled ones back from disk, and count those that reach the device."""
        on_disk, arrived = self.table.stamp_gathered(layer, pages)
        if on_disk:
            self._restore_all(layer, pages)
        self.device.arrived(self.table, arrived)

    def copy(self, layer: int, pages: np.ndarray, heads: np.ndarray, k_out: np.ndarray, v_out: np.ndarray,
             out_pages: np.ndarray) -> None:
        """Fetched pages, one KV head each, as float32 into k_out/v_out [kv_heads, pages, P, D]: page
        pages[i], head heads[i] into [heads[i], out_pages[i]]."""
        slots = self.table.slot[layer, pages]
        being_written = None if self.open is None else (pages, self.open.page[layer], self.open.k[layer],
                                                        self.open.v[layer])
        self.format.copy_pages(self.arena.records, slots, heads, k_out, v_out, out_pages, being_written)

    def key_records(self, layer: int, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Full pages [kv_heads, k] (one row of pages per KV head) brought to host RAM, for a kernel to read
        their keys in place: the host records as rows of their element type (key [head, t, d] at
        (head * page_size + t) * head_dim + d), their INT8 key scales [records, kv_heads, head_dim] (None
        for float32 pages) and each page's record [kv_heads, k]. Spilled pages are read back, but nothing
        enters the device pool: selection reads keys on the host without gathering them."""
        if self.table.stamp(layer, pages):
            self._restore_all(layer, pages)
        scales = self.arena.records["k_scale"] if self.format.quantized else None
        return self.arena.rows, scales, self.table.slot[layer, pages]

    def read_keys(self, layer: int, pages: np.ndarray) -> np.ndarray:
        """Float keys of pages [kv_heads, k], an INT8 layer's open page included: [kv_heads, k, P, D]."""
        keys = record_keys(*self.key_records(layer, pages), self.page_size, self.head_dim)
        if self.open is not None:
            is_open = self.open.is_open(layer, pages)
            keys[is_open] = self.open.k[layer, np.nonzero(is_open)[0]]
        return keys

    def read(self, layer: int, page: int) -> tuple[np.ndarray, np.ndarray]:
        """A page's keys and values [kv_heads, page_size, head_dim], read where they are (no tier change)."""
        if self.open is not None and page == self.open.page[layer]:
            return self.open.k[layer].copy(), self.open.v[layer].copy()
        slot = self.table.slot[layer, page]
        store = self.spill.array if self.table.tier[layer, page] == DISK else self.arena.records
        return self.format.decode(store, (slot,))

    # -- host slots and spilling ------------------------------------------------------------------
    def _host_slot(self, protect: tuple[int, int], pinned_from: int | None = None) -> int:
        slot = self.arena.take()
        return self._spill_coldest(protect, pinned_from) if slot is None else slot

    def _spill_coldest(self, protect: tuple[int, int], pinned_from: int | None) -> int:
        """Move the least recently used host page to disk and return its slot, zeroed (as a slot never used
        is: HostArena.take)."""
        coldest = self.table.coldest_on_host(protect, pinned_from)
        if coldest is None:
            raise EdgekvError(f"the host KV budget ({self.arena.capacity} pages) cannot hold the pages of one "
                              "step; raise runtime.host_kv_bytes in the profile")
        layer, page = coldest
        slot = int(self.table.slot[layer, page])
        if self.spill is None:
            self.spill = SpillFile(self.spill_path, self.format.record)
        self.table.slot[layer, page] = self.spill.store(self.arena.records[slot])
        self.table.tier[layer, page] = DISK
        self.device.forget(self.table, layer, page)
        self.pages_spilled += 1
        self.arena.records[slot] = np.zeros((), self.arena.records.dtype)
        return slot

    def _restore(self, layer: int, page: int, pinned_from: int | None = None) -> None:
        record = self.spill.load(int(self.table.slot[layer, page]))
        slot = self._host_slot(protect=(layer, page), pinned_from=pinned_from)
        self.arena.records[slot] = record
        self.table.slot[layer, page] = slot
        self.table.tier[layer, page] = HOST
        self.pages_restored += 1

    def _restore_all(self, layer: int, pages: np.ndarray) -> None:
        """Read a layer's spilled pages among `pages`, stamped at this clock (so restoring one never spills
        another of them), back from disk."""
        for page in self.table.on_disk(layer, pages):
            self._restore(layer, int(page), pinned_from=self.table.clock)

    def fresh(self) -> "TieredPool":
        """An empty pool with the same capacities, format and spill path (this one must be closed)."""
        return TieredPool(self.table.layers, self.kv_heads, self.head_dim, self.page_size, self.device_bytes,
                          self.host_bytes, self.spill_path, self.format.kv_dtype)

    def counts(self) -> dict[str, int]:
        on_disk = self.table.disk_pages()
        return {"device": self.device.pages, "host": sum(self.table.n_pages) - on_disk, "disk": on_disk}

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None


@dataclass(frozen=True)
class LayerKeys:
    """One layer's keys in a pool, as a selection policy reads them on the host (rerank)."""

    pool: TieredPool
    layer: int

    def read(self, pages: np.ndarray) -> np.ndarray:
        return self.pool.read_keys(self.layer, pages)

    def records(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return self.pool.key_records(self.layer, pages)

    def shifts(self, pages: np.ndarray) -> tuple[None, np.ndarray, np.ndarray]:
        return None, NO_TABLE, NO_TABLE  # every key at its own position
