"""Where page bytes live: a device pool, host RAM up to the host budget, and a disk spill file beyond it.

- Device pool: the LRU of recently gathered pages, with the profile's device capacity. On an NPU it is
  the memory the graph reads; a page gathered from outside it is a transfer, and its bytes are counted.
  (On this CPU-only host the device pool is bookkeeping over host memory: what it measures is how many
  bytes an NPU would have to move per token.)
- Host pool: page slots in RAM, up to the profile's host KV budget.
- Disk: beyond the host budget the least recently used pages move to a memory-mapped file in the
  session directory. Nothing is ever dropped: a spilled page selected again is read back.

A page holds page_size tokens of K and V for every KV head of one layer.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from edgekv.toolkit.errors import EdgekvError

HOST, DISK = 0, 1


class SpillFile:
    """Page slots in a memory-mapped file, grown by doubling; freed slots are reused."""

    def __init__(self, path: Path, page_shape: tuple[int, ...]):
        self.path = path
        self.page_shape = page_shape  # (2, kv_heads, page_size, head_dim): K and V
        self.capacity = 0
        self.next_slot = 0
        self.free: list[int] = []
        self.array: np.memmap | None = None
        path.touch()

    def _grow(self) -> None:
        self.capacity = max(64, self.capacity * 2)
        if self.array is not None:
            self.array.flush()
        page_bytes = int(np.prod(self.page_shape)) * 4
        with open(self.path, "r+b") as f:
            f.truncate(self.capacity * page_bytes)
        self.array = np.memmap(self.path, dtype=np.float32, mode="r+", shape=(self.capacity, *self.page_shape))

    def store(self, keys: np.ndarray, values: np.ndarray) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            if self.next_slot == self.capacity:
                self._grow()
            slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.array[slot, 0], self.array[slot, 1] = keys, values
        return slot

    def load(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Read a page back and free its slot (copies: the slot may be reused at once)."""
        keys, values = np.array(self.array[slot, 0]), np.array(self.array[slot, 1])
        self.free.append(slot)
        return keys, values

    def close(self) -> None:
        self.array = None
        self.path.unlink(missing_ok=True)


class TieredPool:
    """Page bytes of every layer, with each page's tier and the device pool's LRU."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, page_size: int, device_bytes: int,
                 host_bytes: int, spill_path: Path):
        self.kv_heads, self.head_dim, self.page_size = kv_heads, head_dim, page_size
        self.page_bytes = 2 * kv_heads * page_size * head_dim * 4
        self.host_capacity = max(2, host_bytes // self.page_bytes)
        self.device_capacity = max(1, device_bytes // self.page_bytes)
        # Allocated once at full capacity: np.zeros maps untouched memory lazily, so RAM is only used as
        # pages arrive, and slots never move (no copies when the cache grows).
        self.host_k = np.zeros((self.host_capacity, kv_heads, page_size, head_dim), dtype=np.float32)
        self.host_v = np.zeros_like(self.host_k)
        self.host_used = 0  # slots handed out so far (free ones are reused first)
        self.host_free: list[int] = []
        # Per layer, per page: tier, slot in that tier, and the step it was last used (for LRU spills).
        self.tier = [np.zeros(0, dtype=np.int8) for _ in range(layers)]
        self.slot = [np.zeros(0, dtype=np.int64) for _ in range(layers)]
        self.last_used = [np.zeros(0, dtype=np.int64) for _ in range(layers)]
        self.n_pages = [0] * layers
        self.clock = 0
        self.device_lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.spill_path = spill_path
        self.spill: SpillFile | None = None
        self.transfer_bytes = 0
        self.pages_spilled = 0
        self.pages_restored = 0

    # -- page table -------------------------------------------------------------------------------
    def allocate(self, layer: int, page: int) -> None:
        if page == len(self.tier[layer]):
            grow = max(64, len(self.tier[layer]))
            self.tier[layer] = np.concatenate([self.tier[layer], np.zeros(grow, dtype=np.int8)])
            self.slot[layer] = np.concatenate([self.slot[layer], np.zeros(grow, dtype=np.int64)])
            self.last_used[layer] = np.concatenate([self.last_used[layer], np.zeros(grow, dtype=np.int64)])
        self.tier[layer][page] = HOST
        slot = self.slot[layer][page] = self._host_slot(protect=(layer, page))
        # A fresh page's unwritten rows are gathered (then masked) until filled: they must hold finite
        # values, since the additive mask cannot hide an infinite or NaN score from stale memory.
        self.host_k[slot] = 0.0
        self.host_v[slot] = 0.0
        self.last_used[layer][page] = self.clock
        self.n_pages[layer] = page + 1

    def write(self, layer: int, page: int, offset: int, keys: np.ndarray, values: np.ndarray) -> None:
        if self.tier[layer][page] == DISK:
            self._restore(layer, page)
        slot = self.slot[layer][page]
        n = keys.shape[1]
        self.host_k[slot, :, offset:offset + n] = keys
        self.host_v[slot, :, offset:offset + n] = values
        self.last_used[layer][page] = self.clock

    # -- host slots and spilling ------------------------------------------------------------------
    def _host_slot(self, protect: tuple[int, int], pinned_from: int | None = None) -> int:
        if self.host_free:
            return self.host_free.pop()
        if self.host_used < self.host_capacity:
            self.host_used += 1
            return self.host_used - 1
        return self._spill_coldest(protect, pinned_from)

    def _spill_coldest(self, protect: tuple[int, int], pinned_from: int | None) -> int:
        """Move the least recently used host page to disk and return its slot. Never `protect`, nor a
        page stamped at or after `pinned_from` (the pages of the gather under way)."""
        usable_below = np.iinfo(np.int64).max if pinned_from is None else pinned_from
        best = None
        for layer in range(len(self.tier)):
            n = self.n_pages[layer]
            if n == 0:
                continue
            usable = (self.tier[layer][:n] == HOST) & (self.last_used[layer][:n] < usable_below)
            stamps = np.where(usable, self.last_used[layer][:n], np.iinfo(np.int64).max)
            if protect[0] == layer and protect[1] < n:
                stamps[protect[1]] = np.iinfo(np.int64).max
            page = int(np.argmin(stamps))
            if stamps[page] != np.iinfo(np.int64).max and (best is None or stamps[page] < best[0]):
                best = (stamps[page], layer, page)
        if best is None:
            raise EdgekvError(f"the host KV budget ({self.host_capacity} pages) cannot hold the pages of one "
                              "step; raise runtime.host_kv_bytes in the profile")
        _, layer, page = best
        slot = int(self.slot[layer][page])
        if self.spill is None:
            self.spill = SpillFile(self.spill_path, (2, self.kv_heads, self.page_size, self.head_dim))
        self.slot[layer][page] = self.spill.store(self.host_k[slot], self.host_v[slot])
        self.tier[layer][page] = DISK
        self.device_lru.pop((layer, page), None)
        self.pages_spilled += 1
        return slot

    def _restore(self, layer: int, page: int, pinned_from: int | None = None) -> None:
        keys, values = self.spill.load(int(self.slot[layer][page]))
        slot = self._host_slot(protect=(layer, page), pinned_from=pinned_from)
        self.host_k[slot], self.host_v[slot] = keys, values
        self.slot[layer][page] = slot
        self.tier[layer][page] = HOST
        self.pages_restored += 1

    # -- gathering --------------------------------------------------------------------------------
    def gather(self, layer: int, pages: np.ndarray, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Copy pages [kv_heads, k] (per KV head) into k_out/v_out [kv_heads, >= k*page_size, head_dim]."""
        self.clock += 1
        used = np.unique(pages)
        # Stamp first: pages of this gather are the most recent, so restoring one never spills another.
        self.last_used[layer][used] = self.clock
        for page in used[self.tier[layer][used] == DISK]:
            self._restore(layer, int(page), pinned_from=self.clock)
        for page in used.tolist():
            key = (layer, page)
            if key in self.device_lru:
                self.device_lru.move_to_end(key)
            else:
                self.transfer_bytes += self.page_bytes
                self.device_lru[key] = None
                if len(self.device_lru) > self.device_capacity:
                    self.device_lru.popitem(last=False)
        heads, k = pages.shape
        slots = self.slot[layer][pages]
        span = k * self.page_size
        head_index = np.arange(heads)[:, None]
        k_out[:, :span] = self.host_k[slots, head_index].reshape(heads, span, self.head_dim)
        v_out[:, :span] = self.host_v[slots, head_index].reshape(heads, span, self.head_dim)

    def counts(self) -> dict[str, int]:
        on_disk = sum(int((t[:n] == DISK).sum()) for t, n in zip(self.tier, self.n_pages))
        total = sum(self.n_pages)
        return {"device": len(self.device_lru), "host": total - on_disk, "disk": on_disk}

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
