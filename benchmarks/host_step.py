"""Where the host's share of a decode step goes: each part of it timed inside the real runtime.

Usage: .venv/bin/python benchmarks/host_step.py [ARTIFACT_DIR] [--policy quest|rerank] [--contexts 1024,8192]
       [--steps 24] [--kv-dtype int8]

Like `edgekv bench`, the engine is prefilled with seeded random tokens to each context and decodes 4
untimed tokens, then `steps` timed ones. The parts of the host's work (appending the new K/V, scoring,
the top-k, rerank's attention over its shortlist, the rest of the selection, updating the resident budget
and, inside that, the tier bookkeeping and the page copies) are wrapped with timers and reported in
microseconds per layer and step. The wrappers add a few microseconds each, so the parts sum to a little
more than an untimed run's host time.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

import edgekv.runtime.paged_cache as paged_cache_module
import edgekv.runtime.selection as selection_module
from edgekv.core.constants import KV_DTYPES
from edgekv.runtime.budget import BudgetBuffer
from edgekv.runtime.engine import Engine
from edgekv.runtime.paged_cache import LayerPages
from edgekv.runtime.tiers import TieredPool

WARMUP_TOKENS = 4
PARTS = ("append new K/V and page bounds", "selection", "  of which: scoring (matrix products)", "  of which: top-k",
         "  of which: shortlist attention (rerank)",
         "resident budget update", "  of which: tier bookkeeping (fetch)", "  of which: page copies (copy)")


def timed(spent: dict[str, float], name: str, function: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    return wrapper


def instrument(spent: dict[str, float]) -> None:
    append, select, scores, top_k, attention, update, fetch, copies = PARTS
    LayerPages.append = timed(spent, append, LayerPages.append)
    # select_pages calls the scoring through its module, the cache calls select_pages through its own.
    selection_module.quest_page_scores = timed(spent, scores, selection_module.quest_page_scores)
    selection_module.top_pages = timed(spent, top_k, selection_module.top_pages)
    selection_module.most_attended = timed(spent, attention, selection_module.most_attended)
    paged_cache_module.select_pages = timed(spent, select, paged_cache_module.select_pages)
    BudgetBuffer.update = timed(spent, update, BudgetBuffer.update)
    TieredPool.fetch = timed(spent, fetch, TieredPool.fetch)
    TieredPool.copy = timed(spent, copies, TieredPool.copy)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-npu-small")
    parser.add_argument("--policy", choices=("quest", "rerank"), default="quest")
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, help="how pages are stored, instead of the profile's")
    args = parser.parse_args()
    spent: dict[str, float] = defaultdict(float)
    instrument(spent)
    engine = Engine.open(args.artifact, args.policy, kv_dtype=args.kv_dtype)
    rng = np.random.default_rng(0)
    vocab, layers = engine.manifest.model["vocab"], engine.manifest.model["layers"]
    try:
        for context in (int(c) for c in args.contexts.split(",")):
            engine.reset()
            token = int(np.argmax(engine.prefill(rng.integers(vocab // 8, vocab, context).tolist())))
            for _ in range(WARMUP_TOKENS):
                token = int(np.argmax(engine.decode(token)))
            spent.clear()
            engine.timers.reset()
            start = time.perf_counter()
            for _ in range(args.steps):
                token = int(np.argmax(engine.decode(token)))
            step = (time.perf_counter() - start) / args.steps
            timers = engine.timers
            print(f"context {context}: step {step * 1e3:.1f} ms; graph calls {timers.graph_s / args.steps / step:.1%}, "
                  f"selection {timers.select_s / args.steps / step:.1%}, "
                  f"gathering {timers.gather_s / args.steps / step:.1%}")
            for name in PARTS:
                print(f"  {name:<40} {spent[name] / args.steps / layers * 1e6:7.1f} us per layer and step")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
