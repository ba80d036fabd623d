"""Page selection policies: which pages of a layer enter the graph's fixed KV budget this step.

A selection always holds the sink page (page 0) and the pages the step writes (the current, partly
filled page in decode; every page a prefill chunk covers), and between them `middle` pages chosen by
the policy, the same number for every KV head. While the context fits in the budget every page is
selected, which is exactly dense attention.

- quest: the pages of highest Quest bound (an upper bound of q·k over the page, from its key min/max).
- rerank: Quest's shortlist of a few times the free room (RERANK_SHORTLIST_*), re-ranked by the
  attention the step's query rows really give each page (softmax over the shortlist, the sink and the
  step's pages). A bound adds each channel's largest product, which can come from different keys, so
  on repeated text many filler pages bound as high as the one page a question needs; their true
  attention does not (benchmarks/selection_oracle.py). A decode step's shortlist also holds the pages
  its layer chose at the step before, so a page the question needs, once found, is not lost to a bound
  that ranks it low for one token. It reads the shortlist's keys: a cost that
  stops growing once the context passes the shortlist.
- streaming: the most recent pages (StreamingLLM).

(`dense` is not a policy of this cache but the static full-context cache: kv_cache.StaticCache.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgekv.runtime.kernels.attention import FEW_ROWS, attention_mass, record_page_mass
from edgekv.runtime.kernels.bounds import SCORE_CHANNELS, bound_scores, bound_scores_reference
from edgekv.runtime.kernels.top import top_by_histogram

# rerank reads the keys of this many times the free room, per KV head: 4 for one query row (decode), 8
# for a prefill chunk, whose one selection serves all its rows (with 4 in prefill, Retrieve.Number at
# 8000 tokens lost one number of three; benchmarks/RESULTS.md).
RERANK_SHORTLIST_ROW, RERANK_SHORTLIST_CHUNK = 4, 8


class KeyReader(Protocol):
    """A layer's cached keys as a policy reads them on the host (tiers.LayerKeys)."""

    def read(self, pages: np.ndarray) -> np.ndarray:
        """Float keys of pages [kv_heads, k]: [kv_heads, k, page_size, head_dim]."""
        ...

    def records(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Full pages [kv_heads, k] where they lie: (records, INT8 key scales or None, slots [kv_heads, k])."""
        ...

    def shifts(self, pages: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The positions each key of pages [kv_heads, k] is rotated by from where records() holds it to
        where the step sees it ([kv_heads, k, page_size], or None: none), with the cos/sin table
        (kernels/rotation.py) that covers them."""
        ...


@dataclass
class Selection:
    """The pages of one layer and step: sink (page 0, when the step does not write it), `middle`
    [kv_heads, m] wholly in the past (any order), and the pages the step writes, first_new..n_pages-1."""

    middle: np.ndarray
    first_new: int
    n_pages: int

    @property
    def has_sink(self) -> bool:
        return self.first_new > 0

    def pages(self) -> np.ndarray:
        """Every selected page, [kv_heads, k], sorted per head."""
        heads = self.middle.shape[0]
        sink = np.zeros((heads, int(self.has_sink)), dtype=np.int64)
        new = np.broadcast_to(np.arange(self.first_new, self.n_pages, dtype=np.int64),
                              (heads, self.n_pages - self.first_new))
        return np.concatenate([sink, np.sort(self.middle, axis=1), new], axis=1)


@dataclass(frozen=True)
class FarView:
    """Pages 0..pages-1 as a step sees them under a far position scheme (runtime/positions.py): the key at
    n sits at base + m(n) (m: n % fold, n // group). They are scored on the bounds of their keys rotated to
    m(n) (`bounds`) with the query rows rotated back by the base (`q`): q·R(b + m)k = (R(-b)q)·R(m)k, so the
    bound holds for the keys the graph receives. rerank reads their keys rotated to those positions (`keys`).
    The near pages' bounds at their own positions may start at a later page than 0 (`near_base`, at most
    `pages`): the far pages' are dropped (page_bounds.PageBounds.drop_before)."""

    pages: int
    q: np.ndarray
    bounds: np.ndarray
    keys: KeyReader | None = None
    near_base: int = 0


def quest_page_scores(q: np.ndarray, bounds: np.ndarray, pages: slice) -> np.ndarray:
    """Quest's upper bound of q·k over each page of `pages`, aggregated per KV head.

    q [q_heads, rows, head_dim] (post-RoPE, real rows only); bounds [kv_heads, 2*head_dim, >= pages.stop],
    each page's per-channel key max then min as bfloat16 bits (LayerPages.bounds). The G query heads of a
    KV head's group, and all rows of a prefill chunk, are aggregated with max: a page is worth keeping if
    any of them wants it. Returns [kv_heads, len(pages)]. A decode step's few rows go through the compiled
    kernel (head_dims that are a multiple of SCORE_CHANNELS, as every supported model's), a prefill
    chunk's many rows through one batched product (BLAS).
    """
    kv_heads = bounds.shape[0]
    grouped = q.reshape(kv_heads, -1, q.shape[-1])  # [kv_heads, G*rows, head_dim]
    if grouped.shape[1] <= FEW_ROWS and q.shape[-1] % SCORE_CHANNELS == 0:
        scores = np.empty((kv_heads, pages.stop - pages.start), np.float32)
        bound_scores(np.ascontiguousarray(grouped), np.ascontiguousarray(bounds), pages.start, pages.stop, scores)
        return scores
    return bound_scores_reference(grouped, bounds, pages.start, pages.stop)


def candidate_scores(q: np.ndarray, bounds: np.ndarray, first_new: int, far: FarView | None) -> np.ndarray:
    """Quest's bounds of the candidate pages 1..first_new-1, the far ones' (if any) under their position;
    `bounds` holds page p's at its own position in column p - far.near_base."""
    base = 0 if far is None else far.near_base
    if far is None or far.pages <= 1:
        return quest_page_scores(q, bounds, slice(1 - base, first_new - base))
    split = min(far.pages, first_new)
    return np.concatenate([quest_page_scores(far.q, far.bounds, slice(1, split)),
                           quest_page_scores(q, bounds, slice(split - base, first_new - base))], axis=1)


def top_pages(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores of each row of [kv_heads, candidates], in any order."""
    if count == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    return top_by_histogram(np.ascontiguousarray(scores, np.float32), count)


def select_pages(policy: str, q: np.ndarray, bounds: np.ndarray, n_pages: int, first_new: int,
                 budget_pages: int, keys: KeyReader | None = None, row_positions: np.ndarray | None = None,
                 far: FarView | None = None, local_pages: int = 0, kept: np.ndarray | None = None) -> Selection:
    """The selection of one layer and step (quest, rerank or streaming).

    `first_new` is the first page the step writes. rerank also needs the layer's `keys` and the positions
    of q's rows. `far`: the far pages under a far position scheme, if any. `local_pages`:
    the most recent pages before the step's, kept whatever their score (a local window), the rest of the
    room chosen by the policy among the older pages. `kept` [kv_heads, k]: pages rerank shortlists whatever
    their bound (the layer's previous selection).
    """
    kv_heads = bounds.shape[0]
    if first_new == 0:
        return Selection(np.zeros((kv_heads, 0), dtype=np.int64), 0, n_pages)
    if n_pages <= budget_pages:
        middle = np.arange(1, first_new, dtype=np.int64)
        return Selection(np.broadcast_to(middle, (kv_heads, len(middle))), first_new, n_pages)
    room = budget_pages - 1 - (n_pages - first_new)  # middle pages that fit besides sink and new pages
    if room < 0:
        raise ValueError(f"a step writing {n_pages - first_new} pages does not fit a budget of {budget_pages}")
    window = room if policy == "streaming" else min(local_pages, room)
    local = np.broadcast_to(np.arange(first_new - window, first_new, dtype=np.int64), (kv_heads, window))
    room, older = room - window, first_new - window  # the policy chooses `room` of pages 1..older-1
    if room == 0:
        return Selection(local, first_new, n_pages)
    if policy == "quest":
        chosen = top_pages(candidate_scores(q, bounds, older, far), room) + 1
        return Selection(np.concatenate([chosen, local], axis=1), first_new, n_pages)
    factor = RERANK_SHORTLIST_ROW if q.shape[1] == 1 else RERANK_SHORTLIST_CHUNK
    shortlist = min(older - 1, factor * room)
    if shortlist == older - 1:  # every candidate is shortlisted: no need for their bounds
        candidates = np.broadcast_to(np.arange(1, older), (kv_heads, shortlist))
    else:
        scores = candidate_scores(q, bounds, older, far)
        if kept is not None:
            shortlist_kept(scores, kept, older)
        candidates = top_pages(scores, shortlist) + 1
    chosen = most_attended(q, candidates, room, keys if far is None else far.keys, row_positions, first_new,
                           n_pages)
    return Selection(np.concatenate([chosen, local], axis=1), first_new, n_pages)


def shortlist_kept(scores: np.ndarray, kept: np.ndarray, older: int) -> None:
    """Raise the scores [kv_heads, older-1] of pages 1..older-1 to their head's highest, for the pages of
    kept [kv_heads, k] among them: the top of the shortlist holds them (ties at the highest score aside)."""
    heads = np.broadcast_to(np.arange(kept.shape[0])[:, None], kept.shape)
    inside = (kept >= 1) & (kept < older)
    scores[heads[inside], kept[inside] - 1] = scores.max(axis=1)[heads[inside]]


def most_attended(q: np.ndarray, candidates: np.ndarray, room: int, keys: KeyReader, row_positions: np.ndarray,
                  first_new: int, n_pages: int) -> np.ndarray:
    """The `room` pages of candidates [kv_heads, c] (pages wholly in the past) that receive the most of
    q's attention (kernels.attention, with the sink and the step's pages first_new..n_pages-1 in each row's
    softmax), per KV head: [kv_heads, room]. `keys` and `row_positions` as in select_pages. A decode
    step's few rows read the keys where they lie, rotating those that must be (KeyReader.shifts)."""
    kv_heads = candidates.shape[0]
    local_pages = np.concatenate([[0], np.arange(first_new, n_pages)])
    local_keys = keys.read(np.broadcast_to(local_pages, (kv_heads, len(local_pages))))
    page_size, head_dim = local_keys.shape[2:]
    local_keys = local_keys.reshape(kv_heads, -1, head_dim)
    local_positions = (local_pages[:, None] * page_size + np.arange(page_size)).ravel()
    rows = q.reshape(kv_heads, -1, head_dim)  # [kv_heads, G*S]: the step's S rows fastest
    if rows.shape[1] <= FEW_ROWS:
        mass = np.empty(candidates.shape, np.float32)
        record_page_mass(rows, *keys.records(candidates), page_size, local_keys, local_positions, row_positions,
                         *keys.shifts(candidates), mass)
    else:
        groups = rows.shape[1] // len(row_positions)
        visible = np.tile(local_positions[None, :] <= row_positions[:, None], (groups, 1))
        mass = attention_mass(rows, keys.read(candidates), local_keys, visible)
    return np.take_along_axis(candidates, top_pages(mass, room), axis=1)
