"""Position schemes: the position a cached key takes when the step's queries attend to it.

- absolute: every key at its own position. Past the model's trained context the queries meet distances
  it never saw in training, and on SmolLM2 whole replies collapse (benchmarks/RESULTS.md).
- clamped: the pages of the last `near_tokens` tokens keep their own positions; every older page, the
  sink included, sits at one position just before them (InfLLM's fixed distance for far memory), so no
  distance a query meets passes the trained context. The boundary moves in steps of `step` tokens, so
  the far keys resident in a decode budget are rotated again only once every `step` tokens.

Queries keep their true positions (the graphs rotate them); far keys are rotated on the host as they
enter a budget (budget.BudgetBuffer.place_far), and their pages are scored on bounds of their keys
before RoPE with the query rotated back by the far position, so Quest's bound holds for the rotation
the graph then sees (paged_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FarPages:
    """One step's far pages, 0..pages-1, each of their keys at `position`."""

    pages: int
    position: int


@dataclass(frozen=True)
class ClampedPositions:
    near_tokens: int
    step: int  # a multiple of the page size

    @classmethod
    def for_model(cls, trained_context: int, rows: int) -> "ClampedPositions":
        """The largest near window whose distances, far position included, stay below the trained context
        for a step of up to `rows` query rows (the prefill chunk, a multiple of the page size): a query
        row sits at most near_tokens + step + rows - 1 after the far position."""
        return cls(trained_context - 2 * rows, rows)

    def far(self, start: int, page_size: int) -> FarPages | None:
        """The far pages of a step whose first row sits at `start`, or None while every key keeps its own
        position (start < near_tokens + step): then the scheme is exactly `absolute`."""
        boundary = (start - self.near_tokens) // self.step * self.step
        if boundary <= 0:
            return None
        return FarPages(boundary // page_size, boundary - 1)
