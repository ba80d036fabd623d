"""Where page bytes live: a device pool, host RAM up to the host budget, and a disk spill file beyond it.

- Device pool: the LRU of recently gathered pages, with the profile's device capacity. On an NPU it is
  the memory the graph reads; a page gathered from outside it is a transfer, and its bytes are counted.
  Eviction is batched (down to DEVICE_EVICT_TO of capacity in one compiled pass over the stamps) so that
  keeping the LRU costs little per step.
  (On this CPU-only host the device pool is bookkeeping over host memory: what it measures is how many
  bytes an NPU would have to move per token.)
- Host pool: page slots in RAM, up to the profile's host KV budget.
- Disk: beyond the host budget the least recently used pages move to a memory-mapped file in the
  session directory. Nothing is ever dropped: a spilled page selected again is read back.

A page holds page_size tokens of K and V for every KV head of one layer, stored in the host and disk
tiers as one record of page_format.PageFormat (float32, or INT8 with per-page scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from edgekv.runtime.page_format import PageFormat
from edgekv.toolkit.errors import EdgekvError

HOST, DISK = 0, 1
NOT_ON_DEVICE = -1
DEVICE_EVICT_TO = 0.95


class SpillFile:
    """Page records in a memory-mapped file, grown by doubling; freed slots are reused."""

    def __init__(self, path: Path, record: np.dtype):
        self.path = path
        self.record = record
        self.capacity = 0
        self.next_slot = 0
        self.free: list[int] = []
        self.array: np.memmap | None = None
        path.touch()

    def _grow(self) -> None:
        self.capacity = max(64, self.capacity * 2)
        if self.array is not None:
            self.array.flush()
        with open(self.path, "r+b") as f:
            f.truncate(self.capacity * self.record.itemsize)
        self.array = np.memmap(self.path, dtype=self.record, mode="r+", shape=(self.capacity,))

    def store(self, record: np.ndarray) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            if self.next_slot == self.capacity:
                self._grow()
            slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.array[slot] = record
        return slot

    def load(self, slot: int) -> np.ndarray:
        """Read a page record back and free its slot (a copy: the slot may be reused at once)."""
        record = self.array[[slot]][0]  # fancy indexing copies (an integer index would give a view)
        self.free.append(slot)
        return record

    def close(self) -> None:
        self.array = None
        self.path.unlink(missing_ok=True)


class TieredPool:
    """Page bytes of every layer, with each page's tier and the device pool's LRU."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, page_size: int, device_bytes: int,
                 host_bytes: int, spill_path: Path, kv_dtype: str = "float32"):
        self.kv_heads, self.head_dim, self.page_size = kv_heads, head_dim, page_size
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self.format = PageFormat(kv_dtype, kv_heads, page_size, head_dim)
        self.page_bytes = self.format.page_bytes  # as stored in the host and disk tiers, and moved from them
        self.host_capacity = max(2, host_bytes // self.page_bytes)
        self.device_capacity = max(1, device_bytes // self.format.float_page_bytes)  # the graphs read float
        # Allocated once at full capacity: np.zeros maps untouched memory lazily, so RAM is only used as
        # pages arrive, and slots never move (no copies when the cache grows).
        self.host = np.zeros(self.host_capacity, dtype=self.format.record)
        self.host_k, self.host_v = self.host["k"], self.host["v"]  # field views, made once: decode writes through them
        # The records as rows of their element type, keys first: a kernel reads them with a unit stride,
        # where a field view's stride is the record's (numba does not vectorize such loops).
        element = np.int8 if self.format.quantized else np.float32
        assert self.format.record.fields["k"][1] == 0
        self.host_rows = self.host.view(element).reshape(self.host_capacity, -1)
        # INT8 pages are quantized once, when full: each layer's page being written stays float32 here
        # until then (re-quantizing it at every token would compound the rounding).
        self.open_page = np.full(layers, -1, dtype=np.int64)
        self.open_k = np.zeros((layers, kv_heads, page_size, head_dim), np.float32) if self.format.quantized else None
        self.open_v = np.zeros_like(self.open_k) if self.format.quantized else None
        self.host_used = 0  # slots handed out so far (free ones are reused first)
        self.host_free: list[int] = []
        # Per layer and page, [layers, capacity], grown by doubling (the layers hold the same pages): tier,
        # slot in that tier, the step it was last used (for LRU spills), and the step it was last gathered
        # while on the device, or NOT_ON_DEVICE.
        self.tier = np.zeros((layers, 0), dtype=np.int8)
        self.slot = np.zeros((layers, 0), dtype=np.int64)
        self.last_used = np.zeros((layers, 0), dtype=np.int64)
        self.device_stamp = np.zeros((layers, 0), dtype=np.int64)
        self.n_pages = [0] * layers
        self.clock = 0
        self.device_pages = 0
        self.spill_path = spill_path
        self.spill: SpillFile | None = None
        self.transfer_bytes = 0
        self.pages_spilled = 0
        self.pages_restored = 0

    # -- page table -------------------------------------------------------------------------------
    def allocate(self, layer: int, page: int) -> None:
        if page == self.tier.shape[1]:
            layers, grow = self.tier.shape[0], max(64, self.tier.shape[1])
            self.tier = np.concatenate([self.tier, np.zeros((layers, grow), np.int8)], axis=1)
            self.slot = np.concatenate([self.slot, np.zeros((layers, grow), np.int64)], axis=1)
            self.last_used = np.concatenate([self.last_used, np.zeros((layers, grow), np.int64)], axis=1)
            self.device_stamp = np.concatenate([self.device_stamp, np.full((layers, grow), NOT_ON_DEVICE)], axis=1)
        self.tier[layer, page] = HOST
        slot = self.slot[layer, page] = self._host_slot(protect=(layer, page))
        # A fresh page's unwritten rows are gathered (then masked) until filled: they must hold finite
        # values, since the additive mask cannot hide an infinite or NaN score from stale memory.
        self.host[slot] = np.zeros((), self.host.dtype)
        if self.format.quantized:
            self.open_page[layer] = page
            self.open_k[layer] = 0.0
            self.open_v[layer] = 0.0
        self.last_used[layer, page] = self.clock
        self.n_pages[layer] = page + 1

    def writable(self, layer: int, page: int) -> tuple[np.ndarray, np.ndarray]:
        """The float keys and values [kv_heads, page_size, head_dim] that a page being written is written
        into, in place: its host record (float32 pages; read back first if it was spilled), or the layer's
        float copy of its open page (INT8 pages, quantized by `seal` when full)."""
        self.last_used[layer, page] = self.clock
        if self.format.quantized:
            return self.open_k[layer], self.open_v[layer]
        if self.tier[layer, page] == DISK:
            self._restore(layer, page)
        slot = self.slot[layer, page]
        return self.host_k[slot], self.host_v[slot]

    def seal(self, layer: int, page: int) -> None:
        """A page has filled: an INT8 page is quantized once, for good (re-quantizing it at every token
        would compound the rounding)."""
        if not self.format.quantized:
            return
        if self.tier[layer, page] == DISK:
            self._restore(layer, page)
        self.format.encode(self.host, self.slot[layer, page], self.open_k[layer], self.open_v[layer])
        self.open_page[layer] = -1

    def read(self, layer: int, page: int) -> tuple[np.ndarray, np.ndarray]:
        """A page's keys and values [kv_heads, page_size, head_dim], read where they are (no tier change)."""
        if page == self.open_page[layer]:
            return self.open_k[layer].copy(), self.open_v[layer].copy()
        slot = self.slot[layer, page]
        store = self.spill.array if self.tier[layer, page] == DISK else self.host
        return self.format.decode(store, (slot,))

    def page_kv(self, layer: int, pages: np.ndarray, heads: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Float keys and values of host-resident pages (fetch them first): [*pages.shape, kv_heads, P, D],
        or with `heads` (broadcast against pages) one KV head per entry: [*shape, P, D]."""
        slots = self.slot[layer, pages]
        keys, values = self.format.decode(self.host, (slots,) if heads is None else (slots, heads))
        self._fill_open(layer, pages, heads, (keys, self.open_k), (values, self.open_v))
        return keys, values

    def copy_pages(self, layer: int, pages: np.ndarray, heads: np.ndarray, k_out: np.ndarray, v_out: np.ndarray,
                   out_pages: np.ndarray) -> None:
        """page_kv of full, host-resident pages (fetch them first; an INT8 layer's open page is not in its
        record yet), one KV head each, written straight into k_out/v_out [kv_heads, pages, P, D]: page
        pages[i], head heads[i] into [heads[i], out_pages[i]]."""
        self.format.copy_pages(self.host, self.slot[layer, pages], heads, k_out, v_out, out_pages)

    def copy_page(self, layer: int, page: int, k_out: np.ndarray, v_out: np.ndarray, out_page: int) -> None:
        """page_kv of one host-resident page (fetch it first), an INT8 layer's open page included, every KV
        head, written straight into k_out/v_out [kv_heads, pages, P, D] at out_page."""
        if page == self.open_page[layer]:
            k_out[:, out_page], v_out[:, out_page] = self.open_k[layer], self.open_v[layer]
        elif not self.format.quantized:
            slot = self.slot[layer, page]
            k_out[:, out_page], v_out[:, out_page] = self.host_k[slot], self.host_v[slot]
        else:
            heads = np.arange(self.kv_heads)
            self.copy_pages(layer, np.full(self.kv_heads, page), heads, k_out, v_out,
                            np.full(self.kv_heads, out_page))

    def page_keys(self, layer: int, pages: np.ndarray) -> np.ndarray:
        """Float keys of pages [kv_heads, k] (one row of pages per KV head): [kv_heads, k, P, D].

        For selection, which reads keys on the host without gathering them: spilled pages are read back
        from disk, but nothing enters the device pool or counts as a transfer."""
        self._to_host(layer, pages)
        heads = np.arange(self.kv_heads)[:, None]
        keys = self.format.decode_keys(self.host, (self.slot[layer, pages], heads))
        self._fill_open(layer, pages, heads, (keys, self.open_k))
        return keys

    def key_records(self, layer: int, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """page_keys of full pages [kv_heads, k] left where they are, for a kernel to read in place: the host
        records as rows of their element type (key [head, t, d] at (head * page_size + t) * head_dim + d),
        their INT8 key scales [records, kv_heads, head_dim] (None for float32 pages) and each page's record
        [kv_heads, k]."""
        self._to_host(layer, pages)
        return self.host_rows, self.host["k_scale"] if self.format.quantized else None, self.slot[layer, pages]

    def _fill_open(self, layer: int, pages: np.ndarray, heads: np.ndarray | None,
                   *decoded: tuple[np.ndarray, np.ndarray]) -> None:
        """Overwrite, in decoded arrays, the entries of an INT8 layer's open page with its float32 copy
        (`decoded`: pairs of a decoded array and open_k or open_v)."""
        if not self.format.quantized:
            return
        is_open = pages == self.open_page[layer]
        if heads is not None:
            is_open = np.broadcast_to(is_open, np.broadcast_shapes(pages.shape, heads.shape))
        if not is_open.any():
            return
        for array, open_array in decoded:
            if heads is None:
                array[is_open] = open_array[layer]
            else:
                array[is_open] = open_array[layer, np.broadcast_to(heads, is_open.shape)[is_open]]

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
            usable = (self.tier[layer, :n] == HOST) & (self.last_used[layer, :n] < usable_below)
            stamps = np.where(usable, self.last_used[layer, :n], np.iinfo(np.int64).max)
            if protect[0] == layer and protect[1] < n:
                stamps[protect[1]] = np.iinfo(np.int64).max
            page = int(np.argmin(stamps))
            if stamps[page] != np.iinfo(np.int64).max and (best is None or stamps[page] < best[0]):
                best = (stamps[page], layer, page)
        if best is None:
            raise EdgekvError(f"the host KV budget ({self.host_capacity} pages) cannot hold the pages of one "
                              "step; raise runtime.host_kv_bytes in the profile")
        _, layer, page = best
        slot = int(self.slot[layer, page])
        if self.spill is None:
            self.spill = SpillFile(self.spill_path, self.format.record)
        self.slot[layer, page] = self.spill.store(self.host[slot])
        self.tier[layer, page] = DISK
        if self.device_stamp[layer, page] != NOT_ON_DEVICE:
            self.device_stamp[layer, page] = NOT_ON_DEVICE
            self.device_pages -= 1
        self.pages_spilled += 1
        return slot

    def _restore(self, layer: int, page: int, pinned_from: int | None = None) -> None:
        record = self.spill.load(int(self.slot[layer, page]))
        slot = self._host_slot(protect=(layer, page), pinned_from=pinned_from)
        self.host[slot] = record
        self.slot[layer, page] = slot
        self.tier[layer, page] = HOST
        self.pages_restored += 1

    # -- gathering --------------------------------------------------------------------------------
    def fetch(self, layer: int, pages: np.ndarray) -> None:
        """Make a layer's selected pages (repeats allowed) readable on the host: stamp them as the most
        recent, read spilled ones back from disk, count the bytes of those not on the device, and keep the
        device pool within capacity."""
        self.clock += 1
        # One compiled pass stamps both LRUs (this runs for every layer and token); restoring a spilled
        # page afterwards never spills another one of these, as they are now the most recent.
        on_disk, arrived = stamp_fetched(self.last_used[layer], self.tier[layer], self.device_stamp[layer],
                                         pages.ravel(), self.clock)
        if on_disk:
            self._restore_all(layer, pages)
        if arrived:
            self.transfer_bytes += arrived * self.page_bytes
            self.device_pages += arrived
            if self.device_pages > self.device_capacity:
                self._evict_device()

    def _to_host(self, layer: int, pages: np.ndarray) -> None:
        """Stamp pages as the most recently used and read spilled ones back from disk."""
        self.clock += 1
        # Stamp first: these pages are the most recent, so restoring one never spills another.
        if stamp_used(self.last_used[layer], self.tier[layer], pages.ravel(), self.clock):
            self._restore_all(layer, pages)

    def _restore_all(self, layer: int, pages: np.ndarray) -> None:
        """Read a layer's spilled pages among `pages` (stamped at this clock) back from disk."""
        for page in np.unique(pages[self.tier[layer, pages] == DISK]):
            self._restore(layer, int(page), pinned_from=self.clock)

    def _evict_device(self) -> None:
        """Drop the least recently gathered pages of all layers until the pool is DEVICE_EVICT_TO full."""
        excess = self.device_pages - int(self.device_capacity * DEVICE_EVICT_TO)
        evict_oldest(self.device_stamp, max(self.n_pages), excess)
        self.device_pages -= excess

    def gather(self, layer: int, pages: np.ndarray, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Copy pages [kv_heads, k] (per KV head) into k_out/v_out [kv_heads, >= k*page_size, head_dim]."""
        self.fetch(layer, pages.ravel())
        heads, k = pages.shape
        span = k * self.page_size
        keys, values = self.page_kv(layer, pages, np.arange(heads)[:, None])
        k_out[:, :span] = keys.reshape(heads, span, self.head_dim)
        v_out[:, :span] = values.reshape(heads, span, self.head_dim)

    def fresh(self) -> "TieredPool":
        """An empty pool with the same capacities, format and spill path (this one must be closed)."""
        return TieredPool(len(self.tier), self.kv_heads, self.head_dim, self.page_size, self.device_bytes,
                          self.host_bytes, self.spill_path, self.format.kv_dtype)

    def counts(self) -> dict[str, int]:
        on_disk = sum(int((t[:n] == DISK).sum()) for t, n in zip(self.tier, self.n_pages))
        total = sum(self.n_pages)
        return {"device": self.device_pages, "host": total - on_disk, "disk": on_disk}

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
        return self.pool.page_keys(self.layer, pages)

    def records(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return self.pool.key_records(self.layer, pages)


# Compiled: these run for every layer and token on a few hundred pages, where numpy's per-call cost
# (a fancy index, a comparison, a unique) outweighs the work (benchmarks/RESULTS.md, host share).
@njit(cache=True)
def stamp_used(last_used: np.ndarray, tier: np.ndarray, pages: np.ndarray, clock: int) -> int:
    """Stamp pages (repeats allowed) as last used at `clock`; returns how many of the entries are on disk."""
    on_disk = 0
    for page in pages:
        last_used[page] = clock
        on_disk += tier[page] == DISK
    return on_disk


@njit(cache=True)
def stamp_fetched(last_used: np.ndarray, tier: np.ndarray, device_stamp: np.ndarray, pages: np.ndarray,
                  clock: int) -> tuple[int, int]:
    """stamp_used, and stamp the pages as on the device at `clock`; returns how many of the entries are on
    disk and how many distinct pages were not on the device before (a repeat finds the stamp its first
    entry left)."""
    arrived = 0
    for page in pages:
        arrived += device_stamp[page] == NOT_ON_DEVICE
        device_stamp[page] = clock
    return stamp_used(last_used, tier, pages, clock), arrived


@njit(cache=True)
def evict_oldest(device_stamp: np.ndarray, n_pages: int, excess: int) -> None:
    """Take the `excess` pages of oldest stamp off the device: device_stamp [layers, >= n_pages]."""
    layers = device_stamp.shape[0]
    stamps = np.empty(layers * n_pages, np.int64)
    count = 0
    for layer in range(layers):
        for page in range(n_pages):
            if device_stamp[layer, page] != NOT_ON_DEVICE:
                stamps[count] = device_stamp[layer, page]
                count += 1
    cutoff = np.partition(stamps[:count], excess - 1)[excess - 1]  # the newest stamp that leaves
    # Every page stamped before the cutoff leaves, and as many stamped at it (one fetch stamps many) as
    # make up the excess.
    at_cutoff = excess - np.sum(stamps[:count] < cutoff)
    for layer in range(layers):
        for page in range(n_pages):
            stamp = device_stamp[layer, page]
            if stamp != NOT_ON_DEVICE and (stamp < cutoff or (stamp == cutoff and at_cutoff > 0)):
                at_cutoff -= stamp == cutoff
                device_stamp[layer, page] = NOT_ON_DEVICE
