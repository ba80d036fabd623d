"""QDQ artifacts on onnxruntime's CPU provider: weights dequantized once per session (constant folding, the
default) against at every call, in one process, decode steps interleaved.

Usage: .venv/bin/python benchmarks/qdq_cpu.py [INT8_ARTIFACT_DIR] [--steps 12]
Prints each engine's prefill time, the median decode step of each, and how far their logits lie apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from edgekv.runtime.backend import OnnxruntimeBackend
from edgekv.runtime.engine import Engine


def backend(fold: bool):
    return lambda manifest, threads: dataclasses.replace(OnnxruntimeBackend.open(manifest, threads),
                                                         fold_qdq_weights=fold)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-npu-small-int8")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    engines = {fold: Engine.open(args.artifact, "quest", backend=backend(fold)) for fold in (False, True)}
    name = {False: "dequantized at every call", True: "folded once per session"}
    try:
        vocab = engines[True].manifest.model["vocab"]
        prompt = np.random.default_rng(0).integers(vocab // 8, vocab, args.context - 1).tolist()
        logits, times = {}, {False: [], True: []}
        for fold, engine in engines.items():
            start = time.perf_counter()
            logits[fold] = [engine.prefill(prompt)]
            print(f"{name[fold]}: prefill of {len(prompt)} tokens {time.perf_counter() - start:.1f} s", flush=True)
        token = int(np.argmax(logits[False][0]))
        for _ in range(args.steps):
            for fold, engine in engines.items():
                start = time.perf_counter()
                logits[fold].append(engine.decode(token))
                times[fold].append(time.perf_counter() - start)
            token = int(np.argmax(logits[False][-1]))
        for fold in engines:
            print(f"{name[fold]}: median decode step {1e3 * np.median(times[fold][2:]):.1f} ms")
        per_call, folded = np.stack(logits[False]), np.stack(logits[True])
        print(f"logits: max difference {np.abs(per_call - folded).max():.3g}, same argmax at "
              f"{(per_call.argmax(-1) == folded.argmax(-1)).sum()}/{len(folded)} steps")
    finally:
        for engine in engines.values():
            engine.close()


if __name__ == "__main__":
    main()
