"""A graph's KV input of one layer: the fixed budget of slots that the selected pages are copied into.

Layout, in pages of page_size slots:

    slot-page 0                    the sink page (page 0)
    slot-pages 1 .. B/P - 1 - n    the middle pages, each in whatever slot it first landed in
    the last n slot-pages          the pages the step writes, in order (decode: the current page)

Decode keeps one buffer per layer from step to step: Quest's selection changes by a few pages per token,
so each middle page keeps its slot while it stays selected and only pages that enter the selection are
copied in (the sink once, the current page every step: it grows). A prefill chunk's buffer serves the
layers one after the other: it is cleared before each, and the same update fills it.

Attention does not care about the order of its keys (they carry their positions from RoPE), so the
permuted layout is still exact. New middle pages take the lowest free slots, and the selection has the
same number of middle pages for every head: middle slots 1..m are therefore the filled ones for every
head and every layer of one budget, and one mask [S, B] serves them all.

Under a far position scheme (clamped, folded, grouped; positions.py) the far pages' keys are rotated in their
slots to their far positions (place_far); each slot-page records the base its keys were rotated to, so a
resident far page is rotated again only when the base moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgekv.runtime.kernels.pages import EMPTY, plan_copies
from edgekv.runtime.positions import FarPages
from edgekv.runtime.rope import KeyShifter
from edgekv.runtime.selection import Selection
from edgekv.runtime.tiers import TieredPool

FAR_FUTURE = np.iinfo(np.int64).max  # the position given to empty slots: never visible
OWN_POSITIONS = np.iinfo(np.int64).min  # a slot-page whose keys are at their own positions, as stored


@dataclass
class BudgetBuffer:
    k: np.ndarray  # [kv_heads, B, head_dim]: views of a graph's bound k_sel and v_sel
    v: np.ndarray
    page_size: int
    table: np.ndarray  # [kv_heads, B/page_size - 2]: the page held by each middle slot-page, or EMPTY
    holds_sink: bool = False  # slot-page 0 holds the sink page (full, so it never changes)
    pages_k: np.ndarray = field(init=False)  # k and v as [kv_heads, B/page_size, page_size, head_dim]
    pages_v: np.ndarray = field(init=False)
    # [kv_heads, B/page_size]: the far base each slot-page's keys were rotated to, or OWN_POSITIONS
    rotated_to: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        heads, budget, head_dim = self.k.shape
        self.pages_k = self.k.reshape(heads, budget // self.page_size, self.page_size, head_dim)
        self.pages_v = self.v.reshape(self.pages_k.shape)
        self.rotated_to = np.full(self.pages_k.shape[:2], OWN_POSITIONS, np.int64)

    @classmethod
    def over(cls, k: np.ndarray, v: np.ndarray, page_size: int) -> "BudgetBuffer":
        heads, budget, _ = k.shape
        return cls(k, v, page_size, np.full((heads, budget // page_size - 2), EMPTY, dtype=np.int64))

    def clear(self) -> None:
        """Forget the resident pages (the cache they came from was replaced, or another layer comes next)."""
        self.table[:] = EMPTY
        self.holds_sink = False
        self.rotated_to[:] = OWN_POSITIONS

    def update(self, pool: TieredPool, layer: int, selection: Selection) -> None:
        """Make the buffer hold `selection`: copy in the middle pages it does not hold yet, the sink once, and
        the pages the step writes (they grow)."""
        new = np.arange(selection.first_new, selection.n_pages)
        # Fetch the whole selection: it keeps every selected page fresh in the host and device LRUs, and
        # counts transfers for pages that are not on the device.
        pool.fetch(layer, np.concatenate([selection.middle.ravel(), [0], new]))
        # Middle pages are full and kept while selected: only arrivals are copied, with the pages the step
        # writes (they grow) and the sink once.
        copy_sink = selection.has_sink and not self.holds_sink
        pages, page_heads, slots = plan_copies(self.table, np.ascontiguousarray(selection.middle),
                                               selection.first_new, selection.n_pages, self.pages_k.shape[1],
                                               copy_sink)
        self.holds_sink |= copy_sink
        pool.copy(layer, pages, page_heads, self.pages_k, self.pages_v, slots)
        self.rotated_to[page_heads, slots] = OWN_POSITIONS

    def held_pages(self) -> np.ndarray:
        """The page in each slot-page but the last (the sink's, then the table's), or EMPTY: [kv_heads, n]."""
        sink = np.full((self.table.shape[0], 1), 0 if self.holds_sink else EMPTY, np.int64)
        return np.concatenate([sink, self.table], axis=1)

    def place_far(self, far: FarPages, shifter: KeyShifter) -> None:
        """Rotate the keys of the resident far pages (the sink and middle pages before far.pages) to their
        far positions, from their own positions or from an earlier base."""
        held = self.held_pages()
        heads, slots = np.nonzero((held != EMPTY) & (held < far.pages)
                                  & (self.rotated_to[:, :held.shape[1]] != far.base))
        if len(heads) == 0:
            return
        own = held[heads, slots][:, None] * self.page_size + np.arange(self.page_size)
        before = self.rotated_to[heads, slots][:, None]
        shifts = np.where(before == OWN_POSITIONS, far.positions(own) - own, far.base - before)
        self.pages_k[heads, slots] = shifter.rotate(self.pages_k[heads, slots], shifts)
        self.rotated_to[heads, slots] = far.base

    def positions(self, selection: Selection) -> np.ndarray:
        """Position of the token in each slot [B] while the buffer holds `selection`; middle pages, wholly in
        the past, are given position 0 (all the mask needs to know), empty slots FAR_FUTURE."""
        p, budget = self.page_size, self.k.shape[1]
        positions = np.full(budget, FAR_FUTURE, dtype=np.int64)
        if selection.has_sink:
            positions[:p] = np.arange(p)
        positions[p:p * (1 + selection.middle.shape[1])] = 0
        n_new = selection.n_pages - selection.first_new
        positions[budget - n_new * p:] = selection.first_new * p + np.arange(n_new * p)
        return positions
