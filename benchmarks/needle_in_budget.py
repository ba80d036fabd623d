"""Is a missed answer lost by the ranking or by its positions? (issue 21)

Runs one retrieval prompt through the real runtime with `quest` under a position scheme, and with --force
also with the answer's pages put into every decode selection of every layer (in place of the oldest
other middle pages, so the question's recent pages stay); with --force-prefill into every prefill
chunk's selection after the answer too. A reply still wrong with the pages in the budget is lost by
what else the graph sees (the positions, the rest of the budget), not by the selection of the answer.
--trained T runs the scheme as if the model had been trained on T tokens: a far scheme inside the real
trained context, where `absolute` retrieves, shows what the far positions alone cost.

Usage: .venv/bin/python benchmarks/needle_in_budget.py TASK CONTEXT DEPTH SEED [--positions P] [--force]
           [--force-prefill] [--trained T]
(SEED as `edgekv eval` numbers its depths: the index of the depth in --depths.)
"""

from __future__ import annotations

import argparse

import numpy as np

from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.manifest import default_artifact_dir
from edgekv.evaluation.tasks import ANSWER_TOKENS, task_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.positions import FarPositions
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.selection import Selection
from edgekv.runtime.tokens import ArtifactTokenizer


def answer_pages(tokens: list[int], answer: list[int], page_size: int, margin: int = 8) -> np.ndarray:
    """The pages from `margin` tokens before the answer's first mention to `margin` after its last."""
    starts = [i for i in range(len(tokens)) if tokens[i:i + len(answer)] == answer]
    first, last = starts[0] - margin, starts[-1] + len(answer) + margin
    return np.arange(max(first, 0) // page_size, last // page_size + 1)


def run(artifact, task: str, context: int, depth: float, seed: int, positions: str, force: bool,
        force_prefill: bool = False, trained: int = 0) -> str:
    engine = Engine.open(artifact, "quest", positions=positions)
    if trained and positions != "absolute":  # before any token: every layer's far bounds follow the new scheme
        engine.cache.far_positions = FarPositions.for_model(positions, trained, engine.prefill_step.seq_len)
        for pages in engine.cache.layers:
            pages.far_positions = engine.cache.far_positions
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        prompt = task_prompt(task, tokenizer.encode, context, depth, seed)
        needle = answer_pages(prompt.tokens, tokenizer.encode(" " + prompt.answer), engine.cache.page_size)
        held = []

        def reselect(layer, q, pages, selection):
            if q.shape[1] != 1 and not (force_prefill and selection.first_new > needle[-1]):
                return selection  # a prefill chunk keeps its own selection, unless forced after the answer
            if q.shape[1] == 1:
                held.append(np.isin(needle, selection.middle).mean())
            if not force:
                return selection
            middle = selection.middle.copy()
            for head in range(middle.shape[0]):
                others = sorted((p for p in middle[head] if p not in needle), reverse=True)
                middle[head] = np.concatenate([needle, others[:middle.shape[1] - len(needle)]])
            return Selection(middle, selection.first_new, selection.n_pages)

        engine.cache.reselect = reselect
        reply = tokenizer.decode(list(engine.generate(prompt.tokens, ANSWER_TOKENS[task], Sampler(SamplingConfig()),
                                                      eos_ids=set())))
        far = engine.cache.far
        return (f"{task} {len(prompt.tokens)} tokens, depth {depth}, {positions}"
                f"{f' (as if trained on {trained})' if trained else ''}, answer pages forced: {force}"
                f"{' (prefill too)' if force_prefill else ''}: "
                f"{'right' if prompt.answer in reply else 'wrong'} {reply!r} (answer {prompt.answer}, pages "
                f"{needle[0]}..{needle[-1]}, far pages {far.pages if far else 0}; the answer's pages held by the "
                f"decode selections before forcing: {np.mean(held):.0%})")
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("context", type=int)
    parser.add_argument("depth", type=float)
    parser.add_argument("seed", type=int)
    parser.add_argument("--positions", default="absolute")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--force-prefill", action="store_true")
    parser.add_argument("--trained", type=int, default=0)
    parser.add_argument("--artifact", default=str(default_artifact_dir(DEFAULT_MODEL, "npu-small")))
    args = parser.parse_args()
    print(run(args.artifact, args.task, args.context, args.depth, args.seed, args.positions, args.force,
              args.force_prefill, args.trained), flush=True)


if __name__ == "__main__":
    main()
