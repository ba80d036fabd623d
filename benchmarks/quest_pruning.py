"""Could Quest's selection score fewer pages, or fewer channels? Measured on real queries.

Usage: .venv/bin/python benchmarks/quest_pruning.py [ARTIFACT_DIR] [--context 8192] [--text FILE]
       [--groups 4,8,16,32] [--channels 8,16,32] [--steps 3] [--kv-dtype int8]

A group's bounds (the max of its pages' maxima, the min of their minima, per channel) bound every page in
it, so its Quest score is an upper bound of its pages' scores. Exact top-k by branch and bound: score
every group, expand groups in order of their score, and stop once the next group's score is below the
k-th best page score found so far. That scores fewer pages than Quest does only if most groups' bounds
fall below the k-th page's. The script prefills `context` tokens of a real text, captures each layer's
decode query rows and page bounds over `steps` tokens (PagedCache.reselect, as selection_oracle.py), and
prints the work (groups scored plus pages of expanded groups, over the pages Quest scores) per group size,
and checks that the k-th score equals Quest's.

Fewer channels (SparQ's approximation, Ribar et al. 2024): each query row's bound summed over only its
`channels` largest |q| channels, a quarter of the work at 16 of 64. No longer a bound, so no longer
exact: the script prints the share of Quest's pages each such ranking selects too (its recall). Two
stages (`--shortlists`): that ranking shortlists `factor` times k pages, Quest's exact bound picks k of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydoc_data.topics

from edgekv.core.constants import KV_DTYPES
from edgekv.core.manifest import load_verified
from edgekv.runtime.bfloat16 import widen_bfloat16
from edgekv.runtime.engine import Engine
from edgekv.runtime.kernels.bounds import bound_scores_reference
from edgekv.runtime.paged_cache import LayerPages
from edgekv.runtime.selection import Selection
from edgekv.runtime.tokens import ArtifactTokenizer


def group_scores(rows: np.ndarray, wide: np.ndarray, group: int) -> np.ndarray:
    """Quest scores [kv_heads, groups] of groups of `group` pages: rows [kv_heads, R, D], wide [kv_heads, 2D, pages]."""
    heads, channels, pages = wide.shape
    groups = -(-pages // group)
    padded = np.full((heads, channels, groups * group), np.nan, np.float32)
    padded[:, :, :pages] = wide
    padded = padded.reshape(heads, channels, groups, group)
    half = channels // 2
    bounds = np.concatenate([np.nanmax(padded[:, :half], axis=3), np.nanmin(padded[:, half:], axis=3)], axis=1)
    split = np.concatenate([np.maximum(rows, 0), np.minimum(rows, 0)], axis=-1)
    return np.matmul(split, bounds).max(axis=1)


def channel_scores(rows: np.ndarray, wide: np.ndarray, channels: int) -> np.ndarray:
    """Quest's scores [kv_heads, pages] over each row's `channels` largest |q| channels only."""
    head_dim = rows.shape[-1]
    scores = np.full((rows.shape[0], wide.shape[2]), -np.inf, np.float32)
    for head in range(rows.shape[0]):
        for row in rows[head]:
            kept = np.argsort(-np.abs(row))[:channels]
            bound_rows = np.where(row[kept] > 0, kept, head_dim + kept)  # the max where x > 0, else the min
            scores[head] = np.maximum(scores[head], row[kept] @ wide[head, bound_rows])
    return scores


def top_set(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argpartition(-scores, k)[:k].tolist())


def branch_and_bound(page_scores: np.ndarray, groups: np.ndarray, group: int, k: int) -> tuple[int, float]:
    """Groups expanded and the k-th best page score found, for one KV head."""
    found: list[float] = []
    kth = -np.inf
    expanded = 0
    for g in np.argsort(-groups):
        if len(found) >= k and groups[g] < kth:
            break
        found.extend(page_scores[g * group:(g + 1) * group])
        expanded += 1
        if len(found) >= k:
            kth = float(np.partition(np.array(found), -k)[-k])
    return expanded, kth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-cpu-int4-weight-only")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--text", type=Path, default=Path(pydoc_data.topics.__file__),
                        help="the prompt's text [default: Python's language reference topics]")
    parser.add_argument("--groups", default="4,8,16,32")
    parser.add_argument("--channels", default="8,16,32")
    parser.add_argument("--shortlists", default="2,4", help="shortlist factors of the two-stage ranking")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kv-dtype", choices=KV_DTYPES)
    args = parser.parse_args()
    tokenizer = ArtifactTokenizer.load(load_verified(args.artifact))
    prompt = tokenizer.encode(args.text.read_text())[:args.context]
    captured = []

    def capture(layer: int, q: np.ndarray, pages: LayerPages, selection: Selection) -> Selection:
        if q.shape[1] == 1 and selection.middle.shape[1] > 0:  # decode steps that choose pages
            bounds = pages.bounds()[:, :, 1:selection.first_new]  # the candidates: past pages but the sink
            captured.append((q.reshape(bounds.shape[0], -1, q.shape[-1]), bounds.copy(), selection.middle.shape[1]))
        return selection

    # absolute: every page scored on its bounds at its own position (a far scheme drops those of far pages)
    engine = Engine.open(args.artifact, "quest", kv_dtype=args.kv_dtype, positions="absolute")
    try:
        token = int(np.argmax(engine.prefill(prompt)))
        engine.cache.reselect = capture
        for _ in range(args.steps):
            token = int(np.argmax(engine.decode(token)))
    finally:
        engine.close()
    print(f"{len(prompt)} tokens, {len(captured)} layer selections of {captured[0][1].shape[2]} or more candidate "
          f"pages, k (pages chosen) {sorted({k for _, _, k in captured})}")
    for group in (int(g) for g in args.groups.split(",")):
        work, exact = [], True
        for rows, bits, k in captured:
            pages = bound_scores_reference(rows, bits, 0, bits.shape[2])
            groups = group_scores(rows, widen_bfloat16(bits), group)
            for head in range(rows.shape[0]):
                expanded, kth = branch_and_bound(pages[head], groups[head], group, k)
                work.append((expanded * group + groups.shape[1]) / bits.shape[2])
                exact &= kth == np.partition(pages[head], -k)[-k]
        print(f"groups of {group:>2} pages: work {np.median(work):.2f} of Quest's (median; p10 "
              f"{np.percentile(work, 10):.2f}, p90 {np.percentile(work, 90):.2f}); k-th score exact: {exact}")
    factors = [int(f) for f in args.shortlists.split(",")]
    for channels in (int(c) for c in args.channels.split(",")):
        recall, staged = [], {factor: [] for factor in factors}
        for rows, bits, k in captured:
            pages = bound_scores_reference(rows, bits, 0, bits.shape[2])
            approximate = channel_scores(rows, widen_bfloat16(bits), channels)
            recall += [len(top_set(approximate[h], k) & top_set(pages[h], k)) / k for h in range(rows.shape[0])]
            for factor in factors:
                for h in range(rows.shape[0]):
                    shortlist = np.array(sorted(top_set(approximate[h], min(factor * k, len(pages[h]) - 1))))
                    chosen = set(shortlist[list(top_set(pages[h][shortlist], k))].tolist())
                    staged[factor].append(len(chosen & top_set(pages[h], k)) / k)
        print(f"{channels:>2} largest |q| channels of {rows.shape[-1]}: Quest's pages chosen too {np.median(recall):.3f} "
              f"(median; p10 {np.percentile(recall, 10):.3f}, mean {np.mean(recall):.3f})")
        for factor in factors:
            print(f"   then Quest over a shortlist of {factor}k: {np.median(staged[factor]):.3f} (median; p10 "
                  f"{np.percentile(staged[factor], 10):.3f}, mean {np.mean(staged[factor]):.3f})")


if __name__ == "__main__":
    main()
