"""Page selection policies: which pages of a layer enter the graph's fixed KV budget this step.

A selection always holds the sink page (page 0) and the pages the step writes (the current, partly
filled page in decode; every page a prefill chunk covers), and between them `middle` pages chosen by
the policy, the same number for every KV head. While the context fits in the budget every page is
selected, which is exactly dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("quest", "streaming", "dense")


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


def quest_page_scores(q: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Quest's upper bound of q·k over each page, aggregated per KV head.

    q [q_heads, rows, head_dim] (post-RoPE, real rows only); bounds [kv_heads, 2*head_dim, pages], each
    page's per-channel key max then min. The bound sum_i max(q_i*max_i, q_i*min_i) equals
    relu(q)·max + min(q, 0)·min: one batched matrix product of [relu(q), min(q, 0)] with the bounds,
    over all pages at once (pages on the last axis keep each head's matrix contiguous for BLAS).
    The G query heads of a KV head's group, and all rows of a prefill chunk, are aggregated with max:
    a page is worth keeping if any of them wants it. Returns [kv_heads, pages].
    """
    kv_heads = bounds.shape[0]
    grouped = q.reshape(kv_heads, -1, q.shape[-1])  # [kv_heads, G*rows, head_dim]
    split = np.concatenate([np.maximum(grouped, 0), np.minimum(grouped, 0)], axis=-1)
    return np.matmul(split, bounds).max(axis=1)


def select_pages(policy: str, q: np.ndarray, bounds: np.ndarray, n_pages: int, first_new: int,
                 budget_pages: int) -> Selection:
    """The selection of one layer and step (quest or streaming; dense never selects).

    `first_new` is the first page the step writes.
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
    if policy == "streaming":
        middle = np.arange(first_new - room, first_new, dtype=np.int64)
        return Selection(np.broadcast_to(middle, (kv_heads, room)), first_new, n_pages)
    scores = quest_page_scores(q, bounds[:, :, 1:first_new])  # candidates: pages 1..first_new-1
    top = np.argpartition(-scores, room - 1, axis=1)[:, :room] if room else np.zeros((kv_heads, 0), np.int64)
    return Selection(top + 1, first_new, n_pages)
