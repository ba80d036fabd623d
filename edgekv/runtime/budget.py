"""The decode graph's KV input of one layer, kept resident from step to step.

Quest's selection changes by a few pages per token, so the budget buffer is not rebuilt each step:
each middle page keeps its slot while it stays selected, and only pages that enter the selection are
copied in. Layout, in pages of page_size slots:

    slot-page 0                 the sink page (page 0)
    slot-pages 1 .. B/P - 2     the middle pages, in whatever slot they first landed in
    slot-page B/P - 1           the current, partly filled page (copied every step: it grows)

Attention does not care about the order of its keys (they carry their positions from RoPE), so the
permuted layout is still exact. New middle pages take the lowest free slots, and the selection has
the same number of middle pages for every head: middle slots 1..m are therefore the filled ones for
every head and every layer of one budget, and one mask [S, B] serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.runtime.selection import Selection
from edgekv.runtime.tiers import TieredPool

EMPTY = -1
FAR_FUTURE = np.iinfo(np.int64).max  # the position given to empty slots: never visible


@dataclass
class ResidentBudget:
    k: np.ndarray  # [kv_heads, B, head_dim]: views of the layer's bound k_sel and v_sel
    v: np.ndarray
    page_size: int
    table: np.ndarray  # [kv_heads, B/page_size - 2]: the page held by each middle slot-page, or EMPTY

    @classmethod
    def over(cls, k: np.ndarray, v: np.ndarray, page_size: int) -> "ResidentBudget":
        heads, budget, _ = k.shape
        return cls(k, v, page_size, np.full((heads, budget // page_size - 2), EMPTY, dtype=np.int64))

    def clear(self) -> None:
        """Forget the resident pages (after the cache they came from is replaced)."""
        self.table[:] = EMPTY

    def update(self, pool: TieredPool, layer: int, selection: Selection) -> None:
        """Make the buffer hold `selection` (a decode step's: one new page), copying only what changed."""
        heads = self.table.shape[0]
        hidx = np.arange(heads)[:, None]
        middle = selection.middle
        # Boolean page maps with one spare column: EMPTY (-1) in the table indexes it and is never wanted.
        wanted = np.zeros((heads, selection.n_pages + 1), dtype=bool)
        wanted[hidx, middle] = True
        keep = wanted[hidx, self.table]
        self.table[~keep] = EMPTY  # pages that left the selection free their slots
        # Fetch the whole selection (sink and current page included): it keeps every selected page fresh
        # in the host and device LRUs, and counts transfers for pages that are not on the device.
        pool.fetch(layer, np.concatenate([middle.ravel(), [0, selection.n_pages - 1]]))
        k = self.k.reshape(heads, -1, self.page_size, self.k.shape[-1])
        v = self.v.reshape(k.shape)
        if keep.sum() < middle.size:  # some pages entered the selection
            present = np.zeros_like(wanted)
            present[hidx, self.table] = True
            arriving = ~present[hidx, middle]
            # Per head: free slots in ascending order, arriving pages first; head h fills count[h] of them.
            free_slots = np.argsort(keep, axis=1, kind="stable")
            arriving_pages = np.take_along_axis(middle, np.argsort(~arriving, axis=1, kind="stable"), axis=1)
            count = arriving.sum(axis=1)
            rows, cols = np.nonzero(np.arange(middle.shape[1])[None, :] < count[:, None])
            slot_pages, pages = free_slots[rows, cols], arriving_pages[rows, cols]
            self.table[rows, slot_pages] = pages
            k[rows, 1 + slot_pages], v[rows, 1 + slot_pages] = pool.page_kv(layer, pages, rows)
        edges = [selection.n_pages - 1] + ([0] if selection.has_sink else [])
        keys, values = pool.page_kv(layer, np.array(edges))
        k[:, -1], v[:, -1] = keys[0], values[0]
        if selection.has_sink:
            k[:, 0], v[:, 0] = keys[1], values[1]


def slot_positions(selection: Selection, budget: int, page_size: int) -> np.ndarray:
    """Position of the token in each slot of a ResidentBudget [B]; middle pages, wholly in the past, are
    given position 0 (all the mask needs to know), empty slots FAR_FUTURE."""
    positions = np.full(budget, FAR_FUTURE, dtype=np.int64)
    if selection.has_sink:
        positions[:page_size] = np.arange(page_size)
    positions[page_size:page_size * (1 + selection.middle.shape[1])] = 0
    positions[-page_size:] = (selection.n_pages - 1) * page_size + np.arange(page_size)
    return positions


def gathered_positions(pages: np.ndarray, page_size: int) -> np.ndarray:
    """Position of the token in each filled slot of a buffer gathered page after page (prefill), from one
    head's sorted pages: the sink and middle pages are wholly in the past for every head, so the first
    head's positions serve them all."""
    return (pages[:, None] * page_size + np.arange(page_size)).reshape(-1)
