"""A long context within a bounded memory (issue 21): one process, the default policy and position scheme.

The engine first runs a pass-key prompt of 1024 tokens, then (reset) one of --context tokens (default
131072) with the key at --depth, prefilled with the profile's host budget and the rest spilled to disk.
For each: prefill time, the greedy reply and whether it holds the key, then --steps timed decode steps
(median). At the end: peak RSS against the weights plus the host budget, the KV bytes per tier, and the
goals of issue 21 (peak RSS <= 1.25 x (weights + host budget), decode at the long context >= 0.7 x 1K).

Usage: .venv/bin/python benchmarks/long_context.py [--context 131072] [--depth 0.5] [--policy P]
           [--positions S] [--steps 16] [--json PATH] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from edgekv.core.constants import DEFAULT_MODEL, DEFAULT_POLICY
from edgekv.core.manifest import default_artifact_dir
from edgekv.evaluation.passkey import passkey_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.tokens import ArtifactTokenizer

MIB = 2 ** 20
REPLY_TOKENS = 8
SHORT_CONTEXT = 1024
PROGRESS_EVERY_S = 30.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(engine: Engine, tokenizer: ArtifactTokenizer, context: int, depth: float, key: int, steps: int) -> dict:
    """Prefill a pass-key prompt of `context` tokens, read the greedy reply, then time `steps` decode steps."""
    prompt = passkey_prompt(tokenizer.encode, context, depth, key)
    started = last_report = time.perf_counter()

    def report(done: int) -> None:
        nonlocal last_report
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S:
            last_report = now
            kv = engine.cache.usage().kv_bytes
            print(f"  prefill {done}/{len(prompt.tokens)} tokens, {done / (now - started):.0f} tok/s, peak RSS "
                  f"{peak_rss_mib():.0f} MiB, KV host {kv['host'] / MIB:.0f} MiB, disk {kv['disk'] / MIB:.0f} MiB",
                  file=sys.stderr, flush=True)

    logits = engine.prefill(prompt.tokens, on_chunk=report)
    prefill_s = time.perf_counter() - started
    reply = []
    for _ in range(REPLY_TOKENS):
        reply.append(int(np.argmax(logits)))
        logits = engine.decode(reply[-1])
    times = []
    token = int(np.argmax(logits))
    for _ in range(steps):
        start = time.perf_counter()
        token = int(np.argmax(engine.decode(token)))
        times.append(time.perf_counter() - start)
    text = tokenizer.decode(reply)
    usage = engine.cache.usage()
    return {"context": len(prompt.tokens), "depth": depth, "key": str(key), "reply": text,
            "found": str(key) in text, "prefill_s": prefill_s, "prefill_tok_s": len(prompt.tokens) / prefill_s,
            "decode_tok_s": 1 / float(np.median(times)), "peak_rss_mib": peak_rss_mib(),
            "kv_mib": {tier: n / MIB for tier, n in usage.kv_bytes.items()}, "bounds_mib": usage.bounds_bytes / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--positions", default=None, help="default: the profile's")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--artifact", type=Path, default=default_artifact_dir(DEFAULT_MODEL, "npu-small"))
    args = parser.parse_args()
    weights_mib = sum(f.stat().st_size for f in (args.artifact / "graphs" / "weights").iterdir()) / MIB
    engine = Engine.open(args.artifact, args.policy, positions=args.positions)
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        host_budget_mib = engine.manifest.profile.host_kv_bytes / MIB
        rows = []
        for context in (SHORT_CONTEXT, args.context):
            engine.reset()
            print(f"{args.policy} ({engine.positions}): pass key at {args.depth:.0%} of {context} tokens",
                  file=sys.stderr, flush=True)
            rows.append(measure(engine, tokenizer, context, args.depth, 10000 + context % 89999, args.steps))
            row = rows[-1]
            print(f"  {row['context']} tokens: prefill {row['prefill_s']:.0f} s ({row['prefill_tok_s']:.0f} tok/s), "
                  f"reply {row['reply']!r} ({'found' if row['found'] else 'missed'}), decode "
                  f"{row['decode_tok_s']:.2f} tok/s, peak RSS {row['peak_rss_mib']:.0f} MiB, KV MiB "
                  + "/".join(f"{v:.0f}" for v in row["kv_mib"].values())
                  + f", Quest's bounds {row['bounds_mib']:.0f} MiB", file=sys.stderr, flush=True)
    finally:
        engine.close()
    rss_bound = 1.25 * (weights_mib + host_budget_mib)
    result = {"policy": args.policy, "positions": engine.positions, "weights_mib": weights_mib,
              "host_budget_mib": host_budget_mib, "rows": rows,
              "peak_rss_over_weights_and_budget": rows[-1]["peak_rss_mib"] / (weights_mib + host_budget_mib),
              "decode_long_over_short": rows[-1]["decode_tok_s"] / rows[0]["decode_tok_s"],
              "session_dir_removed": not engine.session_dir.exists()}
    print(f"peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB = {result['peak_rss_over_weights_and_budget']:.2f}x "
          f"(weights {weights_mib:.0f} + host budget {host_budget_mib:.0f} MiB); goal <= 1.25x ({rss_bound:.0f} MiB)")
    print(f"decode {rows[-1]['decode_tok_s']:.2f} tok/s at {rows[-1]['context']} tokens = "
          f"{result['decode_long_over_short']:.2f}x the {rows[0]['context']}-token figure; goal >= 0.7x")
    print(f"pass key at {args.depth:.0%} of {rows[-1]['context']} tokens: {'found' if rows[-1]['found'] else 'missed'}")
    print(f"session directory and spill file removed: {result['session_dir_removed']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
