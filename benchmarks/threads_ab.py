"""Decode speed with one and with two onnxruntime threads, interleaved in one process.

Usage: .venv/bin/python benchmarks/threads_ab.py [ARTIFACT] [--context 1024] [--rounds 6] [--steps 16]
       [--policy quest] [--kv-dtype int8] [--json FILE]

Two engines on the same artifact (every session with 1 thread, every session with 2) prefill the same
seeded `context` ids, then decode `steps` greedy tokens each in turn, alternating which goes first, for
`rounds` rounds. Prints each round's median step and the medians over all steps with their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekv.runtime.engine import Engine  # noqa: E402

ARTIFACT = REPO / "artifacts" / "smollm2-135m-instruct-cpu-int4-weight-only"
THREADS = (1, 2)
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", type=Path, default=ARTIFACT)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--policy", default="quest")
    parser.add_argument("--kv-dtype", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    prompt = np.random.default_rng(SEED).integers(100, 40000, args.context).tolist()
    engines = {t: Engine.open(args.artifact, args.policy, threads=t, kv_dtype=args.kv_dtype) for t in THREADS}
    tokens, steps = {}, {t: [] for t in THREADS}
    for threads, engine in engines.items():
        start = time.perf_counter()
        tokens[threads] = int(np.argmax(engine.prefill(prompt)))
        print(f"{threads} thread(s): prefill {args.context / (time.perf_counter() - start):.1f} tok/s", flush=True)
    for round_ in range(args.rounds):
        for threads in THREADS if round_ % 2 == 0 else THREADS[::-1]:
            for _ in range(args.steps):
                start = time.perf_counter()
                tokens[threads] = int(np.argmax(engines[threads].decode(tokens[threads])))
                steps[threads].append(time.perf_counter() - start)
        print(f"round {round_}: " + ", ".join(f"{t} thread(s) {np.median(steps[t][-args.steps:]) * 1e3:.1f} ms"
                                             for t in THREADS), flush=True)
    medians = {t: float(np.median(steps[t])) * 1e3 for t in THREADS}
    print(f"median step: 1 thread {medians[1]:.1f} ms, 2 threads {medians[2]:.1f} ms, "
          f"1 against 2: {medians[1] / medians[2]:.2f}x the time")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "context": args.context,
                                         "policy": args.policy, "kv_dtype": args.kv_dtype, "rounds": args.rounds,
                                         "steps": args.steps, "median_step_ms": medians,
                                         "step_ms": {t: [s * 1e3 for s in v] for t, v in steps.items()}}, indent=1))


if __name__ == "__main__":
    main()
