"""The paged KV cache: every token's K/V in pages across the tiers, and per layer and step the pages a
selection policy picks copied into the graph's fixed budget.

Per layer and step:
    append   the new K/V into the layer's pages (tiers.TieredPool), widening the open page's bounds
    select   which pages enter the budget (selection.select_pages: quest, rerank or streaming)
    gather   the selection into the graph's k_sel/v_sel (budget.BudgetBuffer) and the mask for it

Decode keeps one budget buffer per layer, resident from step to step; a prefill chunk has one per
distinct budget, filled layer after layer. While the context fits in the budget every page is selected:
exactly dense attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgekv.core.constants import MASK_VALUE
from edgekv.core.manifest import GraphEntry
from edgekv.runtime.budget import BudgetBuffer
from edgekv.runtime.kernels.bounds import widen_bounds, write_rows
from edgekv.runtime.kernels.rotation import rotate_rows
from edgekv.runtime.kv_cache import KV, CacheUsage, LayerInputs, fill_mask
from edgekv.runtime.page_bounds import PageBounds
from edgekv.runtime.positions import FarPages, FarPositions
from edgekv.runtime.rope import KeyShifter, Rope
from edgekv.runtime.selection import FarView, Selection, select_pages
from edgekv.runtime.stats import HostTimers
from edgekv.runtime.tiers import LayerKeys, TieredPool


class LayerPages:
    """One layer's handle on the pool: how many tokens it holds, their pages' bounds, and its writes and
    reads. Page i holds the tokens at positions i*page_size .. (i+1)*page_size-1. Given a Rope and a far
    position scheme (clamped, folded, grouped), it also keeps the bounds of the keys rotated to their offsets
    from the far base (FarPositions.offsets: n % fold, n // group), in `folded`."""

    def __init__(self, layer: int, pool: TieredPool, rope: Rope | None = None,
                 far_positions: FarPositions | None = None):
        self.layer = layer
        self.pool = pool
        self.page_size = pool.page_size
        self.length = 0  # tokens stored
        self.metadata = PageBounds(pool.kv_heads, pool.head_dim)
        self.rope, self.far_positions = rope, far_positions
        self.folded = PageBounds(pool.kv_heads, pool.head_dim) if far_positions is not None else None

    @property
    def n_pages(self) -> int:
        return -(-self.length // self.page_size)

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append n tokens: keys and values [kv_heads, n, head_dim], post-RoPE."""
        n, p = keys.shape[1], self.page_size
        if self.folded is not None:
            own = np.arange(self.length, self.length + n)
            folded = rotate_rows(keys, self.far_positions.offsets(own) - own, self.rope.inv_freq)  # Rope.rotate
        written = 0
        while written < n:
            page, offset = divmod(self.length, p)
            take = min(p - offset, n - written)
            if offset == 0:
                self.metadata.add_page(page)
                self.pool.allocate(self.layer, page)
            page_k, page_v = self.pool.writable(self.layer, page)
            write_rows(page_k, page_v, offset, keys[:, written:written + take], values[:, written:written + take],
                       self.metadata.open)
            if self.folded is not None:
                if offset == 0:
                    self.folded.add_page(page)
                widen_bounds(self.folded.open, offset, folded[:, written:written + take])
            if offset + take == p:
                self.pool.seal(self.layer, page)
                self.metadata.seal(page)
                if self.folded is not None:
                    self.folded.seal(page)
            self.length += take
            written += take

    def bounds(self) -> np.ndarray:
        """Per-page key max and min as bfloat16 bits (uint16), [kv_heads, 2*head_dim, capacity]: the array
        itself (no copy), whose columns 0 .. length // page_size - 1, the full pages, are set. The page axis
        runs to the capacity so that the array stays C-contiguous, which the compiled decode score needs.
        Refused once a far position scheme has dropped the far pages' (PagedCache.begin)."""
        if self.metadata.first:
            raise ValueError(f"the bounds of pages 0..{self.metadata.first - 1} at their own positions are dropped: "
                             "they are far pages, scored on their far bounds (`folded`)")
        return self.metadata.full

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored keys and values, [kv_heads, length, head_dim] each, wherever their pages live."""
        pages = [self.pool.read(self.layer, page) for page in range(self.n_pages)]
        if not pages:
            empty = np.zeros((self.pool.kv_heads, 0, self.pool.head_dim), np.float32)
            return empty, empty.copy()
        keys = np.concatenate([k for k, _ in pages], axis=1)[:, :self.length]
        values = np.concatenate([v for _, v in pages], axis=1)[:, :self.length]
        return keys, values


@dataclass
class FarKeys:
    """A layer's keys as a step's queries see them under a far position scheme: the far pages'
    rotated from their own positions to their far ones (rerank reads them)."""

    keys: LayerKeys
    far: FarPages
    shifter: KeyShifter

    def read(self, pages: np.ndarray) -> np.ndarray:
        keys = self.keys.read(pages)
        page_size = keys.shape[2]
        heads, columns = np.nonzero(pages < self.far.pages)
        own = pages[heads, columns][:, None] * page_size + np.arange(page_size)
        keys[heads, columns] = self.shifter.rotate(keys[heads, columns], self.far.positions(own) - own)
        return keys

    def records(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return self.keys.records(pages)

    def shifts(self, pages: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        own = pages[..., None] * self.keys.pool.page_size + np.arange(self.keys.pool.page_size)
        shifts = np.where(own < self.far.pages * self.keys.pool.page_size, self.far.positions(own) - own, 0)
        return shifts, *self.shifter.table(shifts)


# Called with a layer's selection (and its layer, query rows and pages) to replace it by another of the
# same size (benchmarks/selection_oracle.py ranks the pages by their true attention through it).
Reselect = Callable[[int, np.ndarray, LayerPages, Selection], Selection]


@dataclass
class PagedCache:
    policy: str  # quest | rerank | streaming
    pool: TieredPool
    decode_pages: list[int]  # per layer: pages a decode selection may fill
    budget_scale: float  # the share of each prefill graph's budget that selection may fill
    timers: HostTimers
    reselect: Reselect | None = None
    mask_value: float = MASK_VALUE
    far_positions: FarPositions | None = None  # clamped, folded or grouped (positions.py); None: absolute
    rope: Rope | None = None  # the model's RoPE, which those schemes rotate keys with
    local_pages: int = 0  # the most recent pages every quest or rerank selection keeps
    family = "budget"
    layers: list[LayerPages] = field(init=False)
    buffers: dict[bool, list[tuple[int, BudgetBuffer, np.ndarray]]] = field(default_factory=dict)
    # The step under way (begin): its variant, rows, padding, first page written, and the masks filled so far.
    decoding: bool = field(init=False, default=False)
    row_positions: np.ndarray = field(init=False, default=None)
    pad: int = field(init=False, default=0)
    first_new: int = field(init=False, default=0)
    masked: dict[int, int] = field(init=False, default_factory=dict)  # budget -> the page limit its mask holds
    far: FarPages | None = field(init=False, default=None)  # the step's far pages (far_positions)
    shifter: KeyShifter | None = field(init=False, default=None)  # rotates far keys (far_positions)
    # Per layer: the middle pages of its last selection, which rerank's next decode step shortlists.
    chosen: list[np.ndarray | None] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.layers = self._new_layers()
        if self.far_positions is not None:
            self.shifter = KeyShifter(self.rope)

    def _new_layers(self) -> list[LayerPages]:
        self.chosen = [None] * self.pool.table.layers
        if self.far_positions is None:
            return [LayerPages(layer, self.pool) for layer in range(self.pool.table.layers)]
        return [LayerPages(layer, self.pool, self.rope, self.far_positions)
                for layer in range(self.pool.table.layers)]

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def inputs(self, graphs: list[GraphEntry], decoding: bool) -> list[LayerInputs]:
        """Decode: each layer its own buffer, kept resident; prefill: one per distinct budget. One mask per
        budget either way."""
        masks: dict[int, np.ndarray] = {}
        newest: dict[int, tuple[BudgetBuffer, LayerInputs]] = {}  # per budget: its last buffer made
        entries, inputs = [], []
        for graph in graphs[1:]:
            spec = {t.name: t for t in graph.inputs}
            if graph.budget not in masks:
                masks[graph.budget] = np.zeros(spec["mask"].shape, np.float32)
            if decoding or graph.budget not in newest:
                k, v = (np.zeros(spec[name].shape, np.float32) for name in ("k_sel", "v_sel"))
                newest[graph.budget] = (BudgetBuffer.over(k, v, self.page_size), (k, v, masks[graph.budget]))
            buffer, bound = newest[graph.budget]
            entries.append((graph.budget, buffer, masks[graph.budget]))
            inputs.append(bound)
        self.buffers[decoding] = entries
        return inputs

    def begin(self, decoding: bool, start: int, row_positions: np.ndarray, pad: int) -> None:
        self.decoding, self.row_positions, self.pad = decoding, row_positions, pad
        self.first_new = start // self.page_size
        self.masked = {}
        self.far = self.far_positions.far(start, self.page_size) if self.far_positions is not None else None
        if self.far is not None:
            # Far pages stay far (the boundary only moves forward, and no cache is ever cut short: a restore
            # appends every key again), so their bounds at their own positions are never read again.
            for pages in self.layers:
                pages.metadata.drop_before(self.far.pages)

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        started = time.perf_counter()
        self.layers[layer].append(keys, values)
        self.timers.gather_s += time.perf_counter() - started

    def prepare(self, layer: int, q: np.ndarray) -> None:
        started = time.perf_counter()
        budget, buffer, mask = self.buffers[self.decoding][layer]
        pages = self.layers[layer]
        limit = self.decode_pages[layer] if self.decoding else int(budget * self.budget_scale) // self.page_size
        keys = LayerKeys(self.pool, layer) if self.policy == "rerank" else None
        far = None
        if self.far is not None:
            far = FarView(self.far.pages, self.rope.rotate(q, -self.far.base), pages.folded.full,
                          FarKeys(keys, self.far, self.shifter) if keys is not None else None, pages.metadata.base)
        selection = select_pages(self.policy, q, pages.metadata.full, pages.n_pages, self.first_new, limit, keys,
                                 self.row_positions[self.pad:], far, self.local_pages,
                                 kept=self.chosen[layer] if self.decoding else None)
        if self.reselect is not None:
            selection = self.reselect(layer, q, pages, selection)
        self.chosen[layer] = selection.middle
        selected = time.perf_counter()
        if not self.decoding:  # the buffer held the previous layer's pages
            buffer.clear()
        buffer.update(self.pool, layer, selection)
        if self.far is not None:
            buffer.place_far(self.far, self.shifter)
        if self.masked.get(budget) != limit:  # one fill serves every layer of that budget and page limit
            fill_mask(mask, buffer.positions(selection), pages.length, self.row_positions, self.pad,
                      self.mask_value)
            self.masked[budget] = limit
        self.timers.select_s += selected - started
        self.timers.gather_s += time.perf_counter() - selected

    def snapshot(self) -> KV:
        return [pages.read() for pages in self.layers]

    def restore(self, kv: KV) -> None:
        self.reset()
        for pages, (keys, values) in zip(self.layers, kv):
            pages.append(keys, values)

    def reset(self) -> None:
        self.pool.close()
        self.pool = self.pool.fresh()
        self.layers = self._new_layers()
        for _, buffer, _ in self.buffers.get(True, []):
            buffer.clear()

    def usage(self) -> CacheUsage:
        pages = self.pool.counts()
        bounds = [layer.metadata for layer in self.layers] + [layer.folded for layer in self.layers if layer.folded]
        return CacheUsage(pages, {tier: n * self.pool.page_bytes for tier, n in pages.items()},
                          self.pool.transfer_bytes, self.pool.pages_spilled, self.pool.pages_restored,
                          sum(b.full.nbytes + b.open.nbytes for b in bounds))

    def close(self) -> None:
        self.pool.close()
