"""The reference for `edgekv eval --task perplexity` past the trained context (issue 21): each window past it
scored again under `absolute` positions with only the tokens before its end that fit the trained context.
A scheme's window divided by this one tells what the far context does to it, apart from how hard the
window's own text is.

Usage: .venv/bin/python benchmarks/perplexity_capped.py ARTIFACT [--policy rerank] [--context 32768]
           [--window 4096] [--scored-tokens 512] [--json PATH]
(the text, windows and scored tokens of `edgekv eval --task perplexity` with the same options).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgekv.evaluation.perplexity import window_nll
from edgekv.evaluation.tasks import reference_text
from edgekv.runtime.engine import Engine
from edgekv.runtime.tokens import ArtifactTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--policy", default="rerank")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--scored-tokens", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine = Engine.open(args.artifact, args.policy, positions="absolute")
    try:
        text = ArtifactTokenizer.load(engine.manifest).encode(reference_text())
        # Inside the trained context, a prefill chunk short of it: where clamped still equals absolute.
        cap = engine.manifest.model["max_context"] - engine.manifest.profile.prefill_chunk
        rows = []
        for end in range(args.window, args.context + 1, args.window):
            if end <= cap:
                continue  # the window's whole context is inside the trained one: eval's own figure
            tokens = text[end - cap:end]
            (nll,) = window_nll(engine, tokens, len(tokens), args.scored_tokens)
            rows.append({"first_token": end - args.scored_tokens, "end": end, "context": cap, "policy": args.policy,
                         "perplexity": float(np.exp(nll.mean()))})
            print(f"window ending at {end - 1}: perplexity {rows[-1]['perplexity']:.2f} with the {cap} tokens "
                  "before it", flush=True)
    finally:
        engine.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
