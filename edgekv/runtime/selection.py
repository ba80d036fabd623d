"""Page selection policies: which pages of a layer enter the graph's fixed KV budget this step.

Every policy returns pages [kv_heads, k], sorted ascending per head, with the same k for every head.
Always selected: the sink page (page 0) and the pages the current step writes (the current, partly
filled page in decode; every page a prefill chunk covers). While the context fits in the budget every
page is selected in order, which is exactly dense attention.

Because the always-selected pages are the lowest and highest page numbers, they land on the same
slots for every head after sorting, and the pages in between are wholly in the past: one mask
[S, B] serves all heads.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("quest", "streaming", "dense")


def quest_page_scores(q: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Quest's upper bound of q·k over each page, aggregated per KV head.

    q [q_heads, rows, head_dim] (post-RoPE, real rows only); bounds [kv_heads, pages, 2*head_dim], each
    page's per-channel key max then min. The bound sum_i max(q_i*max_i, q_i*min_i) equals
    relu(q)·max + min(q, 0)·min: one batched matrix product of [relu(q), min(q, 0)] with the bounds,
    over all pages at once. The G query heads of a KV head's group, and all rows of a prefill chunk,
    are aggregated with max: a page is worth keeping if any of them wants it.
    Returns [kv_heads, pages].
    """
    kv_heads = bounds.shape[0]
    grouped = q.reshape(kv_heads, -1, q.shape[-1])  # [kv_heads, G*rows, head_dim]
    split = np.concatenate([np.maximum(grouped, 0), np.minimum(grouped, 0)], axis=-1)
    return np.matmul(split, bounds.transpose(0, 2, 1)).max(axis=1)


def _with_forced(middle: np.ndarray, first_new: int, n_pages: int) -> np.ndarray:
    """Sink page + chosen middle pages [kv_heads, m] + the pages the step writes, sorted per head."""
    heads = middle.shape[0]
    sink = np.zeros((heads, 1), dtype=np.int64)
    new = np.broadcast_to(np.arange(first_new, n_pages, dtype=np.int64), (heads, n_pages - first_new))
    return np.concatenate([sink, np.sort(middle, axis=1), new], axis=1)


def select_pages(policy: str, q: np.ndarray, bounds: np.ndarray, n_pages: int, first_new: int,
                 budget_pages: int) -> np.ndarray:
    """Pages [kv_heads, k] for one layer and step (quest or streaming; dense never selects).

    `first_new` is the first page the step writes.
    """
    kv_heads = bounds.shape[0]
    if n_pages <= budget_pages:
        return np.broadcast_to(np.arange(n_pages, dtype=np.int64), (kv_heads, n_pages))
    first_new = max(first_new, 1)
    room = budget_pages - 1 - (n_pages - first_new)  # middle pages that fit besides sink and new pages
    if room < 0:
        raise ValueError(f"a step writing {n_pages - first_new} pages does not fit a budget of {budget_pages}")
    if policy == "streaming":
        middle = np.broadcast_to(np.arange(first_new - room, first_new, dtype=np.int64), (kv_heads, room))
        return _with_forced(middle, first_new, n_pages)
    scores = quest_page_scores(q, bounds[:, 1:first_new])  # candidates: pages 1..first_new-1
    top = np.argpartition(-scores, room - 1, axis=1)[:, :room] if room else np.zeros((kv_heads, 0), np.int64)
    return _with_forced(top + 1, first_new, n_pages)


def slot_positions(pages_head0: np.ndarray, page_size: int) -> np.ndarray:
    """Absolute position of every filled slot, from one head's pages (see the module docstring)."""
    return (pages_head0[:, None] * page_size + np.arange(page_size)).reshape(-1)

