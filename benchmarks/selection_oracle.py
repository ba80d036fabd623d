"""Is it the budget or the page ranking? Retrieve.Number through Quest's selection and through an oracle.

Usage: .venv/bin/python benchmarks/selection_oracle.py [ARTIFACT_DIR] [--contexts 8000] [--depths 0.1,0.5,0.9]
       [--selections quest,rerank,oracle,dense] [--json FILE]

`oracle` keeps the artifact's budgets (every prefill chunk's and every decode step's) but fills them with
the pages that hold the most of the true attention: each layer's rows of q against every cached key,
softmax, summed per page over the rows and the group's query heads. That is the quantity Quest's page
bounds stand in for, so where `oracle` retrieves what `quest` misses, the budget is enough and the
upper-bound ranking is what loses it. `quest`, `rerank` (the runtime's policy: Quest's shortlist
re-ranked by the attention the rows give it) and `dense` are the runtime's policies, for comparison. The
oracle is that re-ranking over every past page: it computes full attention on the host at every step
(minutes per 8K prompt).

The prompts are those of `edgekv eval --task retrieve-number` (the same seeds), so the rows compare
with its results.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgekv.evaluation.tasks import ANSWER_TOKENS, task_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.paged_cache import LayerPages
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.selection import Selection, most_attended
from edgekv.runtime.tiers import LayerKeys
from edgekv.runtime.tokens import ArtifactTokenizer

TASK = "retrieve-number"


def attention_mass_selection(layer: int, q: np.ndarray, store: LayerPages, selection: Selection) -> Selection:
    """`selection` with its middle pages replaced by the candidates holding the most attention mass, every
    past page a candidate (a PagedCache.reselect): the runtime's rerank without Quest's shortlist."""
    room, first_new = selection.middle.shape[1], selection.first_new
    if room == 0 or room >= first_new - 1:  # every candidate page fits: nothing to choose
        return selection
    kv_heads = store.pool.kv_heads
    candidates = np.broadcast_to(np.arange(1, first_new), (kv_heads, first_new - 1))
    row_positions = store.length - q.shape[1] + np.arange(q.shape[1])
    return Selection(most_attended(q, candidates, room, LayerKeys(store.pool, layer), row_positions, first_new, selection.n_pages),
                     first_new, selection.n_pages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-npu-small")
    parser.add_argument("--contexts", default="8000")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--selections", default="quest,oracle,dense")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for selection in args.selections.split(","):
        engine = Engine.open(args.artifact, "quest" if selection == "oracle" else selection)
        if selection == "oracle":
            engine.cache.reselect = attention_mass_selection
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        try:
            for context in (int(c) for c in args.contexts.split(",")):
                for i, depth in enumerate(float(d) for d in args.depths.split(",")):
                    engine.reset()
                    prompt = task_prompt(TASK, tokenizer.encode, context, depth, i)  # edgekv eval's seeds
                    start = time.perf_counter()
                    reply = tokenizer.decode(list(engine.generate(prompt.tokens, ANSWER_TOKENS[TASK],
                                                                  Sampler(SamplingConfig()), eos_ids=set())))
                    row = {"selection": selection, "context": len(prompt.tokens), "depth": depth,
                           "answer": prompt.answer, "reply": reply, "correct": prompt.answer in reply,
                           "seconds": round(time.perf_counter() - start, 1)}
                    rows.append(row)
                    print(f"{selection:<7} context {row['context']} depth {depth:.0%}: "
                          f"{'right' if row['correct'] else 'wrong'} {reply!r} ({row['seconds']:.0f} s)", flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"artifact": args.artifact, "task": TASK, "rows": rows}, f, indent=1)
        finally:
            engine.close()
    for selection in args.selections.split(","):
        hits = [r["correct"] for r in rows if r["selection"] == selection]
        print(f"{selection}: {sum(hits)}/{len(hits)} right")


if __name__ == "__main__":
    main()
