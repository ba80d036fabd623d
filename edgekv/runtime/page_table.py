"""The page table: per layer and page, where its record is and when it was last used.

The layers hold the same pages (every token adds its K/V to each), so the table is [layers, capacity]
arrays, grown by doubling: the tier (host RAM or disk), the slot in that tier, the step it was last used
(for LRU spills) and the step it was last gathered while on the device (device_pool.py), or NOT_ON_DEVICE.
"""

from __future__ import annotations

import numpy as np

from edgekv.runtime.kernels.pages import DISK, HOST, NOT_ON_DEVICE, stamp_fetched, stamp_used

NEVER = np.iinfo(np.int64).max  # a stamp no page has: excluded from the LRU search


class PageTable:
    def __init__(self, layers: int):
        self.tier = np.zeros((layers, 0), dtype=np.int8)
        self.slot = np.zeros((layers, 0), dtype=np.int64)
        self.last_used = np.zeros((layers, 0), dtype=np.int64)
        self.device_stamp = np.zeros((layers, 0), dtype=np.int64)
        self.n_pages = [0] * layers
        self.clock = 0  # one tick per stamping: the steps of the LRUs

    @property
    def layers(self) -> int:
        return len(self.n_pages)

    def add(self, layer: int, page: int, slot: int) -> None:
        """Page `page` (the layer's next) now lives in host slot `slot`."""
        if page == self.tier.shape[1]:
            grow = max(64, self.tier.shape[1])
            self.tier = np.concatenate([self.tier, np.zeros((self.layers, grow), np.int8)], axis=1)
            self.slot = np.concatenate([self.slot, np.zeros((self.layers, grow), np.int64)], axis=1)
            self.last_used = np.concatenate([self.last_used, np.zeros((self.layers, grow), np.int64)], axis=1)
            self.device_stamp = np.concatenate([self.device_stamp, np.full((self.layers, grow), NOT_ON_DEVICE)],
                                               axis=1)
        self.tier[layer, page], self.slot[layer, page] = HOST, slot
        self.last_used[layer, page] = self.clock
        self.n_pages[layer] = page + 1

    def stamp(self, layer: int, pages: np.ndarray) -> int:
        """Stamp pages (repeats allowed) as the most recently used; returns how many entries are on disk."""
        self.clock += 1
        return stamp_used(self.last_used[layer], self.tier[layer], pages.ravel(), self.clock)

    def stamp_gathered(self, layer: int, pages: np.ndarray) -> tuple[int, int]:
        """stamp, and stamp them as on the device; returns the entries on disk and how many distinct pages
        were not on the device before."""
        self.clock += 1
        return stamp_fetched(self.last_used[layer], self.tier[layer], self.device_stamp[layer], pages.ravel(),
                             self.clock)

    def on_disk(self, layer: int, pages: np.ndarray) -> np.ndarray:
        """The distinct pages among `pages` whose records are on disk."""
        return np.unique(pages[self.tier[layer, pages] == DISK])

    def coldest_on_host(self, protect: tuple[int, int], pinned_from: int | None) -> tuple[int, int] | None:
        """The least recently used (layer, page) in host RAM, never `protect`, nor a page stamped at or
        after `pinned_from` (the pages of a gather under way); None when there is none."""
        usable_below = NEVER if pinned_from is None else pinned_from
        best = None
        for layer in range(self.layers):
            n = self.n_pages[layer]
            if n == 0:
                continue
            usable = (self.tier[layer, :n] == HOST) & (self.last_used[layer, :n] < usable_below)
            stamps = np.where(usable, self.last_used[layer, :n], NEVER)
            if protect[0] == layer and protect[1] < n:
                stamps[protect[1]] = NEVER
            page = int(np.argmin(stamps))
            if stamps[page] != NEVER and (best is None or stamps[page] < best[0]):
                best = (stamps[page], layer, page)
        return None if best is None else best[1:]

    def disk_pages(self) -> int:
        return sum(int((t[:n] == DISK).sum()) for t, n in zip(self.tier, self.n_pages))
