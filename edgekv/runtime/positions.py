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
- grouped: the far keys keep their order, GROUP_TOKENS of them to a position (Self-Extend's floor
  division), the key at n at base + n // GROUP_TOKENS. The boundary sits as late as keeps every distance
  inside the trained context, so the near window is the whole trained context at first and shrinks as
  the far part grows, to nothing at GROUP_TOKENS times the trained context (past it, the oldest
  distances pass the trained context).

The boundary moves in steps of `step` tokens, so the far keys resident in a decode budget are rotated
again only once every `step` tokens or more. Queries keep their true positions (the graphs rotate them);
far keys are rotated on the host as they enter a budget (budget.BudgetBuffer.place_far), and their pages
are scored on bounds of their keys at their offsets from the base (FarPositions.offsets) with the query
rotated back by the base, so Quest's bound holds for the rotation the graph then sees (paged_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FOLD_TOKENS = 512  # the folded scheme's span of far positions
GROUP_TOKENS = 8  # far keys per position under the grouped scheme


def far_offsets(own: np.ndarray, fold: int, group: int) -> np.ndarray:
    """A far key's position less the base: n % fold (clamped: fold 1; folded), or n // group (grouped: fold 0)."""
    return own // group if fold == 0 else own % fold


@dataclass(frozen=True)
class FarPages:
    """One step's far pages, 0..pages-1: the key at position n sits at base + far_offsets(n, fold, group)."""

    pages: int
    base: int
    fold: int
    group: int = 1

    def positions(self, own: np.ndarray) -> np.ndarray:
        return self.base + far_offsets(own, self.fold, self.group)


@dataclass(frozen=True)
class FarPositions:
    near_tokens: int  # clamped, folded: the near window; grouped: how far the oldest far key may sit
    step: int  # a multiple of the page size
    fold: int  # 1: clamped, FOLD_TOKENS: folded, 0: grouped
    group: int = 1  # grouped: GROUP_TOKENS

    @classmethod
    def for_model(cls, scheme: str, trained_context: int, rows: int) -> "FarPositions":
        """The largest near window whose distances stay below the trained context for a step of up to
        `rows` query rows (the prefill chunk, a multiple of the page size): a query row sits at most
        near_tokens + step + rows + fold - 2 after the oldest far position, base. The fold is at most a
        quarter of the trained context (the tiny test models are trained on 512 tokens). grouped: a row
        sits at most start + rows - 1 - base after the oldest far key, kept within trained_context - 1."""
        if scheme == "grouped":
            if rows % GROUP_TOKENS:
                raise ValueError(f"the grouped scheme needs a step ({rows}) that is a multiple of {GROUP_TOKENS}")
            return cls(trained_context - rows, rows, 0, GROUP_TOKENS)
        fold = {"clamped": 1, "folded": min(FOLD_TOKENS, trained_context // 4)}[scheme]
        return cls(trained_context - 2 * rows - fold + 1, rows, fold)

    def offsets(self, own: np.ndarray) -> np.ndarray:
        """The far position of the keys at `own`, less the base (the rotation the far bounds are kept for)."""
        return far_offsets(own, self.fold, self.group)

    def far(self, start: int, page_size: int) -> FarPages | None:
        """The far pages of a step whose first row sits at `start`, or None while every key keeps its own
        position (clamped, folded: start < near_tokens + step; grouped: start <= near_tokens): then the
        scheme is exactly `absolute`."""
        if self.fold == 0:
            # The smallest boundary B (a multiple of the step) with start - B + B / group <= near_tokens,
            # at most the step's own first token.
            needed = -(-max(start - self.near_tokens, 0) * self.group // (self.group - 1))
            boundary = min(-(-needed // self.step) * self.step, start // self.step * self.step)
            if boundary <= 0:
                return None
            return FarPages(boundary // page_size, boundary - boundary // self.group, 0, self.group)
        boundary = (start - self.near_tokens) // self.step * self.step
        if boundary <= 0:
            return None
        return FarPages(boundary // page_size, boundary - self.fold, self.fold)
