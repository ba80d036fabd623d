"""Pass-key retrieval at one context for several depths and policies, on the default artifact.

Usage: .venv/bin/python benchmarks/passkey.py [ARTIFACT_DIR] [--context 8000] [--depths 0.1,0.3,0.5,0.7,0.9]
       [--policies quest,streaming,dense] [--json FILE]

The default context leaves room inside the dense baseline's static 8192 tokens for the answer.
A key counts as retrieved when the greedy continuation (8 tokens) contains its digits.
"""

from __future__ import annotations

import argparse
import json
import time

from edgekv.evaluation.passkey import passkey_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.tokens import ArtifactTokenizer

KEYS = (68521, 30497, 81263, 57108, 24689, 93715, 41852)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-npu-small")
    parser.add_argument("--context", type=int, default=8000)
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--policies", default="quest,streaming,dense")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for policy in args.policies.split(","):
        for i, depth in enumerate(float(d) for d in args.depths.split(",")):
            engine = Engine.open(args.artifact, policy)
            try:
                tokenizer = ArtifactTokenizer.load(engine.manifest)
                prompt = passkey_prompt(tokenizer.encode, args.context, depth, KEYS[i % len(KEYS)])
                start = time.perf_counter()
                tokens = list(engine.generate(prompt.tokens, 8, Sampler(SamplingConfig()), eos_ids=set()))
                answer = tokenizer.decode(tokens)
                row = {"policy": policy, "context": len(prompt.tokens), "depth": depth, "key": prompt.key,
                       "answer": answer, "retrieved": str(prompt.key) in answer,
                       "seconds": time.perf_counter() - start}
            finally:
                engine.close()
            rows.append(row)
            print(f"{policy:<9} depth {depth:.0%} context {row['context']}: "
                  f"{'retrieved' if row['retrieved'] else 'missed   '} {answer!r} ({row['seconds']:.0f} s)", flush=True)
    for policy in args.policies.split(","):
        hits = [r["retrieved"] for r in rows if r["policy"] == policy]
        print(f"{policy}: {sum(hits)}/{len(hits)} retrieved")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
