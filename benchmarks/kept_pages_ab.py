"""rerank's decode shortlist with and without the pages its layer chose the step before, on one prefill.

Per retrieval prompt (as `edgekv eval` builds them, its seeds numbered by depth): one prefill, a greedy
reply with the kept pages (the runtime as it is), then the prefilled cache restored (bit-exact, the
kept pages too) and a reply whose decode shortlists come from Quest's bounds alone. `dense` answers the
prompts where either misses, inside the trained context (as far as it goes). The first prompt is also
answered a second time with the kept pages after the restore, which must give the first reply again.
One line per prompt, and JSON lines with --jsonl.

Usage: .venv/bin/python benchmarks/kept_pages_ab.py [ARTIFACT] [--tasks retrieve-number,passkey,text-passkey]
           [--contexts 2048,4096,8000] [--depths 0,0.25,0.5,0.75,1] [--jsonl PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import edgekv.runtime.paged_cache as paged_cache
from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.manifest import default_artifact_dir
from edgekv.evaluation.tasks import ANSWER_TOKENS, task_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.tokens import ArtifactTokenizer


def greedy(engine: Engine, logits: np.ndarray, count: int) -> list[int]:
    """`count` greedy tokens from the prompt's logits (as Sampler(SamplingConfig()) picks them)."""
    tokens = [int(np.argmax(logits))]
    while len(tokens) < count:
        tokens.append(int(np.argmax(engine.decode(tokens[-1]))))
    return tokens


def without_kept(select_pages):
    """select_pages that ignores the kept pages while `switch["off"]` is set."""
    switch = {"off": False}

    def select(*args, **kwargs):
        if switch["off"]:
            kwargs["kept"] = None
        return select_pages(*args, **kwargs)
    return select, switch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", default=str(default_artifact_dir(DEFAULT_MODEL, "npu-small")))
    parser.add_argument("--tasks", default="retrieve-number,passkey,text-passkey")
    parser.add_argument("--contexts", default="2048,4096,8000")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--jsonl", type=Path)
    args = parser.parse_args()
    paged_cache.select_pages, switch = without_kept(paged_cache.select_pages)
    engine, dense = Engine.open(args.artifact, "rerank"), None
    tokenizer = ArtifactTokenizer.load(engine.manifest)
    checked = False
    try:
        for task in args.tasks.split(","):
            for context in map(int, args.contexts.split(",")):
                for seed, depth in enumerate(map(float, args.depths.split(","))):
                    prompt = task_prompt(task, tokenizer.encode, context, depth, seed)
                    engine.reset()
                    logits = engine.prefill(prompt.tokens)
                    kv, chosen = engine.kv_snapshot(), list(engine.cache.chosen)
                    replies = {}
                    for mode in ("kept", "none") if checked else ("kept", "none", "kept again"):
                        if mode != "kept":
                            engine.restore(prompt.tokens, kv)
                            engine.cache.chosen = list(chosen)
                        switch["off"] = mode == "none"
                        replies[mode] = tokenizer.decode(greedy(engine, logits, ANSWER_TOKENS[task]))
                    if not checked:
                        assert replies.pop("kept again") == replies["kept"], "the restored cache answers otherwise"
                        checked = True
                    fits_dense = len(prompt.tokens) <= engine.manifest.model["max_context"]
                    if fits_dense and not all(prompt.answer in reply for reply in replies.values()):
                        dense = dense or Engine.open(args.artifact, "dense")
                        dense.reset()
                        replies["dense"] = tokenizer.decode(greedy(dense, dense.prefill(prompt.tokens),
                                                                   ANSWER_TOKENS[task]))
                    found = {mode: prompt.answer in reply for mode, reply in replies.items()}
                    print(task, len(prompt.tokens), depth, found, flush=True)
                    if args.jsonl:
                        with args.jsonl.open("a") as out:
                            print(json.dumps({"task": task, "context": len(prompt.tokens), "depth": depth,
                                              "answer": prompt.answer, "replies": replies, "found": found}),
                                  file=out)
    finally:
        engine.close()
        if dense is not None:
            dense.close()


if __name__ == "__main__":
    main()
