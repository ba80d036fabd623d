"""The highest scores of each row: which pages a selection keeps."""

from __future__ import annotations

import numpy as np
from numba import njit

TOP_BINS = 256  # histogram bins of top_by_histogram
FEW_TIED = 64  # boundary-bin entries up to which a selection sort picks among them


def top_reference(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores of each row of [rows, candidates], in any order."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :count]


@njit(cache=True)
def top_by_histogram(scores: np.ndarray, count: int) -> np.ndarray:
    """top_reference (0 < count <= candidates; among tied scores any may be taken), faster than numpy's
    argpartition on a few hundred scores: per row, a histogram of the scores over TOP_BINS bins between
    their min and max finds the bin holding the count-th highest; the bins above it are taken whole, and
    the highest of that bin's entries make up the rest."""
    heads, n = scores.shape
    top = np.empty((heads, count), np.int64)
    bins = np.empty(TOP_BINS, np.int64)
    tied = np.empty(n, np.int64)  # the boundary bin's entries
    for head in range(heads):
        row = scores[head]
        low, high = row.min(), row.max()
        scale = (TOP_BINS - 1) / (high - low) if high > low else 0.0
        bins[:] = 0
        for i in range(n):
            bins[int((row[i] - low) * scale)] += 1
        boundary, above = TOP_BINS - 1, 0
        while above + bins[boundary] < count:
            above += bins[boundary]
            boundary -= 1
        taken = ties = 0
        for i in range(n):
            b = int((row[i] - low) * scale)
            if b > boundary:
                top[head, taken] = i
                taken += 1
            elif b == boundary:
                tied[ties] = i
                ties += 1
        need = count - taken
        if ties > FEW_TIED:  # a crowded bin (a few outlying scores squeeze the rest together)
            order = np.argsort(-row[tied[:ties]])
            for j in range(need):
                top[head, taken + j] = tied[order[j]]
            continue
        for j in range(need):  # selection sort of the few entries of the boundary bin
            best = j
            for t in range(j + 1, ties):
                if row[tied[t]] > row[tied[best]]:
                    best = t
            tied[j], tied[best] = tied[best], tied[j]
            top[head, taken + j] = tied[j]
    return top
