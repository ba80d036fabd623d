"""Decode tokens/s of each policy as the context grows, and where the step time goes.

Usage: .venv/bin/python benchmarks/decode_speed.py [ARTIFACT_DIR] [--contexts 1024,4096,8128,16384]
       [--policies quest,dense] [--steps 16] [--json FILE]

For each policy one engine is prefilled step by step up to each context (seeded random tokens: speed does
not depend on the text), then decodes `steps` timed tokens after 4 warm-up tokens. Reports the median
decode step, tokens/s, its multiple of human reading speed, and the split of step time between graph
calls, page selection and gathering. The dense baseline's static context is the model's (8192), so
its largest point is 8128 tokens, leaving room for the decoded tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgekv.runtime.engine import Engine, Timers
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S

WARMUP = 4


def measure(artifact: str, policy: str, contexts: list[int], steps: int) -> list[dict]:
    engine = Engine.open(artifact, policy)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for context in contexts:
            if policy == "dense" and context + WARMUP + steps > engine.manifest.model["max_context"]:
                continue
            fill = context - len(engine.tokens)
            start = time.perf_counter()
            engine.prefill(rng.integers(100, 40000, fill).tolist())
            prefill_s = time.perf_counter() - start
            for _ in range(WARMUP):
                engine.decode(500)
            engine.timers = Timers()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                engine.decode(500)
                times.append(time.perf_counter() - start)
            step_s = float(np.median(times))
            total = sum(times)
            row = {"policy": policy, "context": context, "prefill_tok_s": fill / prefill_s,
                   "decode_step_ms": 1000 * step_s, "decode_tok_s": 1 / step_s,
                   "reading_speed_ratio": 1 / step_s / READING_SPEED_TOKENS_PER_S,
                   "graph_share": engine.timers.graph_s / total, "select_share": engine.timers.select_s / total,
                   "gather_share": engine.timers.gather_s / total}
            rows.append(row)
            print(f"{policy:<9} {context:>6} tokens: decode {row['decode_tok_s']:6.2f} tok/s "
                  f"({row['decode_step_ms']:6.1f} ms, {row['reading_speed_ratio']:4.1f}x reading), "
                  f"graph {row['graph_share']:.0%} select {row['select_share']:.1%} gather {row['gather_share']:.1%}; "
                  f"prefill {row['prefill_tok_s']:.0f} tok/s", flush=True)
    finally:
        engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-npu-small")
    parser.add_argument("--contexts", default="1024,4096,8128,16384")
    parser.add_argument("--policies", default="quest,dense")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = [row for policy in args.policies.split(",") for row in measure(args.artifact, policy, contexts, args.steps)]
    quest = {r["context"]: r for r in rows if r["policy"] == "quest"}
    dense = {r["context"]: r for r in rows if r["policy"] == "dense"}
    if quest:
        base = quest[min(quest)]["decode_tok_s"]
        for context, row in sorted(quest.items()):
            vs_dense = f", {row['decode_tok_s'] / dense[context]['decode_tok_s']:.2f}x dense" if context in dense else ""
            print(f"quest at {context}: {row['decode_tok_s'] / base:.2f} of its {min(quest)}-token speed{vs_dense}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
