"""The decode graph's KV input of one layer, kept resident from step to step.

Quest's selection changes by a few pages per token, so the budget buffer is not rebuilt each step:
each middle page keeps its slot while it stays selected, and only pages that enter the selection are
copied in. Layout, in pages of page_size slots:

    slot-page 0                 the sink page (page 0, copied once)
    slot-pages 1 .. B/P - 2     the middle pages, in whatever slot they first landed in
    slot-page B/P - 1           the current, partly filled page (copied every step: it grows)

Attention does not care about the order of its keys (they carry their positions from RoPE), so the
permuted layout is still exact. New middle pages take the lowest free slots, and the selection has
the same number of middle pages for every head: middle slots 1..m are therefore the filled ones for
every head and every layer of one budget, and one mask [S, B] serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from edgekv.runtime.selection import Selection
from edgekv.runtime.tiers import TieredPool

EMPTY = -1
WANTED, PRESENT = 1, 2  # assign_slots' per-page state bits
FAR_FUTURE = np.iinfo(np.int64).max  # the position given to empty slots: never visible


@dataclass
class ResidentBudget:
    k: np.ndarray  # [kv_heads, B, head_dim]: views of the layer's bound k_sel and v_sel
    v: np.ndarray
    page_size: int
    table: np.ndarray  # [kv_heads, B/page_size - 2]: the page held by each middle slot-page, or EMPTY
    holds_sink: bool = False  # slot-page 0 holds the sink page (full, so it never changes)
    pages_k: np.ndarray = field(init=False)  # k and v as [kv_heads, B/page_size, page_size, head_dim]
    pages_v: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        heads, budget, head_dim = self.k.shape
        self.pages_k = self.k.reshape(heads, budget // self.page_size, self.page_size, head_dim)
        self.pages_v = self.v.reshape(self.pages_k.shape)

    @classmethod
    def over(cls, k: np.ndarray, v: np.ndarray, page_size: int) -> "ResidentBudget":
        heads, budget, _ = k.shape
        return cls(k, v, page_size, np.full((heads, budget // page_size - 2), EMPTY, dtype=np.int64))

    def clear(self) -> None:
        """Forget the resident pages (after the cache they came from is replaced)."""
        self.table[:] = EMPTY
        self.holds_sink = False

    def update(self, pool: TieredPool, layer: int, selection: Selection) -> None:
        """Make the buffer hold `selection` (a decode step's: one new page), copying only what changed."""
        # Fetch the whole selection (sink and current page included): it keeps every selected page fresh
        # in the host and device LRUs, and counts transfers for pages that are not on the device.
        pool.fetch(layer, np.concatenate([selection.middle.ravel(), [0, selection.n_pages - 1]]))
        k, v = self.pages_k, self.pages_v
        heads_in, slot_pages, pages = assign_slots(self.table, np.ascontiguousarray(selection.middle),
                                                   selection.n_pages)
        pool.copy_pages(layer, pages, heads_in, k, v, slot_pages)  # middle pages are full
        if selection.has_sink and not self.holds_sink:
            pool.copy_page(layer, 0, k, v, 0)
            self.holds_sink = True
        pool.copy_page(layer, selection.n_pages - 1, k, v, k.shape[1] - 1)  # it grows: copied every step


# Compiled: it runs for every layer and token, and as a loop it is a few microseconds where numpy's
# masks, sorts and fancy indexing over the same few hundred entries took about 90 (benchmarks/RESULTS.md).
@njit(cache=True)
def assign_slots(table: np.ndarray, middle: np.ndarray, n_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Update table [kv_heads, slot-pages] in place to hold middle [kv_heads, m] (pages < n_pages): slots
    whose page left the selection are freed, and each arriving page takes the lowest free slot, in
    middle's order. Returns the arrivals as (head, slot-page of the buffer, page) arrays: the pages to
    copy in (the buffer's slot-page is the table's plus one: slot-page 0 is the sink's)."""
    heads, slots = table.shape
    m = middle.shape[1]
    rows = np.empty(heads * m, np.int64)
    slot_pages = np.empty(heads * m, np.int64)
    pages = np.empty(heads * m, np.int64)
    arrived = 0
    state = np.zeros(n_pages, np.int8)  # per page, for the head at hand: WANTED, or WANTED | PRESENT
    for head in range(heads):
        for j in range(m):
            state[middle[head, j]] = WANTED
        for slot in range(slots):
            page = table[head, slot]
            if page != EMPTY and state[page] == WANTED:
                state[page] = WANTED | PRESENT
            else:
                table[head, slot] = EMPTY
        free = 0
        for j in range(m):
            page = middle[head, j]
            if state[page] == WANTED:  # arriving: into the lowest free slot
                while table[head, free] != EMPTY:
                    free += 1
                table[head, free] = page
                rows[arrived], slot_pages[arrived], pages[arrived] = head, 1 + free, page
                arrived += 1
            state[page] = 0
    return rows[:arrived], slot_pages[:arrived], pages[:arrived]


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
