"""Where page bytes live: a device pool, host RAM up to the host budget, and a disk spill file beyond it.

- Device pool: the LRU of recently gathered pages, with the profile's device capacity. On an NPU it is
  the memory the graph reads; a page gathered from outside it is a transfer, and its bytes are counted.
  Eviction is batched (down to DEVICE_EVICT_TO of capacity in one vectorized pass) so that keeping the
  LRU costs a few array operations per step, not a Python loop over pages.
  (On this CPU-only host the device pool is bookkeeping over host memory: what it measures is how many
  bytes an NPU would have to move per token.)
- Host pool: page slots in RAM, up to the profile's host KV budget.
- Disk: beyond the host budget the least recently used pages move to a memory-mapped file in the
  session directory. Nothing is ever dropped: a spilled page selected again is read back.

A page holds page_size tokens of K and V for every KV head of one layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekv.toolkit.errors import EdgekvError

HOST, DISK = 0, 1
NOT_ON_DEVICE = -1
DEVICE_EVICT_TO = 0.95


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
        # Per layer, per page: the step it was last gathered while on the device, or NOT_ON_DEVICE.
        self.device_stamp = [np.zeros(0, dtype=np.int64) for _ in range(layers)]
        self.device_pages = 0
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
            self.device_stamp[layer] = np.concatenate([self.device_stamp[layer],
                                                       np.full(grow, NOT_ON_DEVICE, dtype=np.int64)])
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

    def read(self, layer: int, page: int) -> tuple[np.ndarray, np.ndarray]:
        """A page's keys and values [kv_heads, page_size, head_dim], read where they are (no tier change)."""
        slot = self.slot[layer][page]
        if self.tier[layer][page] == DISK:
            return self.spill.array[slot, 0], self.spill.array[slot, 1]
        return self.host_k[slot], self.host_v[slot]

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
        if self.device_stamp[layer][page] != NOT_ON_DEVICE:
            self.device_stamp[layer][page] = NOT_ON_DEVICE
            self.device_pages -= 1
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
    def fetch(self, layer: int, pages: np.ndarray) -> None:
        """Make a layer's selected pages (repeats allowed) readable on the host: stamp them as the most
        recent, read spilled ones back from disk, count the bytes of those not on the device, and keep the
        device pool within capacity. (Repeats are cheaper than np.unique here: most pages are resident.)"""
        self.clock += 1
        # Stamp first: pages of this fetch are the most recent, so restoring one never spills another.
        self.last_used[layer][pages] = self.clock
        tiers = self.tier[layer][pages]
        if (tiers == DISK).any():
            for page in np.unique(pages[tiers == DISK]):
                self._restore(layer, int(page), pinned_from=self.clock)
        stamps = self.device_stamp[layer]
        arriving = pages[stamps[pages] == NOT_ON_DEVICE]
        stamps[pages] = self.clock
        if arriving.size:
            arrived = len(np.unique(arriving))
            self.transfer_bytes += arrived * self.page_bytes
            self.device_pages += arrived
            if self.device_pages > self.device_capacity:
                self._evict_device()

    def _evict_device(self) -> None:
        """Drop the least recently gathered pages of all layers until the pool is DEVICE_EVICT_TO full."""
        stamps = np.concatenate([s[:n] for s, n in zip(self.device_stamp, self.n_pages)])
        on_device = np.flatnonzero(stamps != NOT_ON_DEVICE)
        excess = self.device_pages - int(self.device_capacity * DEVICE_EVICT_TO)
        oldest = on_device[np.argpartition(stamps[on_device], excess - 1)[:excess]]
        offsets = np.cumsum([0] + self.n_pages)
        for layer in range(len(self.device_stamp)):
            mine = oldest[(oldest >= offsets[layer]) & (oldest < offsets[layer + 1])]
            self.device_stamp[layer][mine - offsets[layer]] = NOT_ON_DEVICE
        self.device_pages -= excess

    def gather(self, layer: int, pages: np.ndarray, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Copy pages [kv_heads, k] (per KV head) into k_out/v_out [kv_heads, >= k*page_size, head_dim]."""
        self.fetch(layer, pages.ravel())
        slots = self.slot[layer][pages]
        heads, k = pages.shape
        span = k * self.page_size
        head_index = np.arange(heads)[:, None]
        k_out[:, :span] = self.host_k[slots, head_index].reshape(heads, span, self.head_dim)
        v_out[:, :span] = self.host_v[slots, head_index].reshape(heads, span, self.head_dim)

    def counts(self) -> dict[str, int]:
        on_disk = sum(int((t[:n] == DISK).sum()) for t, n in zip(self.tier, self.n_pages))
        total = sum(self.n_pages)
        return {"device": self.device_pages, "host": total - on_disk, "disk": on_disk}

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
