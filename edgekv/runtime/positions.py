"""Position schemes: the position a cached key takes when the step's queries attend to it.

- absolute: every key at its own position. Past the model's trained context the queries meet distances
  it never saw in training, and on SmolLM2 whole replies collapse (benchmarks/RESULTS.md).
- clamped: the pages of the last `near_tokens` tokens keep their own positions; every older page, the
  sink included, sits at one position just before them (InfLLM's fixed distance for far memory), so no
  distance a query meets passes the trained context. The far keys lose their order: on SmolLM2 a pass
  key among them is not read back even when its pages are in the budget.
- folded: as clamped, but the far keys are folded into the FOLD_TOKENS positions just before the near
  window, the key at n at base + n % FOLD_TOKENS: two far keys less than FOLD_TOKENS apart (a fact and
  its neighbours) keep their true distance and order, unless a multiple of FOLD_TOKENS lies between them.

The boundary moves in steps of `step` tokens, so the far keys resident in a decode budget are rotated
again only once every `step` tokens. Queries keep their true positions (the graphs rotate them); far
keys are rotated on the host as they enter a budget (budget.BudgetBuffer.place_far), and their pages are
scored on bounds of their keys at n % fold with the query rotated back by the base, so Quest's bound
holds for the rotation the graph then sees (paged_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FOLD_TOKENS = 512  # the folded scheme's span of far positions


@dataclass(frozen=True)
class FarPages:
    """One step's far pages, 0..pages-1: the key at position n sits at base + n % fold."""

    pages: int
    base: int
    fold: int

    def positions(self, own: np.ndarray) -> np.ndarray:
        return self.base + own % self.fold


@dataclass(frozen=True)
class FarPositions:
    near_tokens: int
    step: int  # a multiple of the page size
    fold: int  # 1: clamped, FOLD_TOKENS: folded

    @classmethod
    def for_model(cls, scheme: str, trained_context: int, rows: int) -> "FarPositions":
        """The largest near window whose distances stay below the trained context for a step of up to
        `rows` query rows (the prefill chunk, a multiple of the page size): a query row sits at most
        near_tokens + step + rows + fold - 2 after the oldest far position, base. The fold is at most a
        quarter of the trained context (the tiny test models are trained on 512 tokens)."""
        fold = {"clamped": 1, "folded": min(FOLD_TOKENS, trained_context // 4)}[scheme]
        return cls(trained_context - 2 * rows - fold + 1, rows, fold)

    def far(self, start: int, page_size: int) -> FarPages | None:
        """The far pages of a step whose first row sits at `start`, or None while every key keeps its own
        position (start < near_tokens + step): then the scheme is exactly `absolute`."""
        boundary = (start - self.near_tokens) // self.step * self.step
        if boundary <= 0:
            return None
        return FarPages(boundary // page_size, boundary - self.fold, self.fold)
