"""Time per graph call on each backend an artifact was compiled for, through the engine's own seam.

Usage: .venv/bin/python benchmarks/graph_calls.py [ARTIFACT] [--backends cpu,openvino,qnn-htp,rknn]
       [--runs 10] [--json PATH]
Each backend runs in a process of its own (QNN's HTP keeps one precision per process). Every graph is
bound to buffers of random inputs once, as the engine binds them, then run `--runs` times after one
warm-up run; prints the median milliseconds per call, and a decode step's worth (L+1 calls).

Then, for each target, the profile's device projection of a quest decode step (evaluation/projection.py)
with that target's per-call overhead: a published figure where there is one (Hexagon: about 160 us per
graph execute, chraac/llama.cpp#34), else the profile's. A projection, not a measurement; the host's
selection and gathering are not in it (`edgekv bench` measures them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

PUBLISHED_CALL_OVERHEAD_US = {"qnn-htp": 160.0}  # per graph execute on the device; others: the profile's
LAYER = 5  # the layer graph timed: its attention and MLP, and the next layer's q/k/v


def timed_graphs(manifest) -> dict[str, list[str]]:
    """Per budget variant, the qkv graph, one layer graph and the head: what a decode step is made of."""
    return {variant: [graphs[0].name, graphs[1 + LAYER].name, graphs[-1].name]
            for variant in ("budget-decode", "budget-prefill") for graphs in [manifest.variant(variant)]}


def time_backend(artifact: str, backend: str, runs: int) -> dict[str, float]:
    from edgekv.core.manifest import load_verified
    from edgekv.targets.registry import BACKENDS

    manifest = load_verified(artifact)
    runner = BACKENDS[backend](manifest, 0)
    rng = np.random.default_rng(0)
    medians = {}
    try:
        for name in sum(timed_graphs(manifest).values(), []):
            graph = manifest.graphs[name]
            inputs = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in graph.inputs}
            outputs = {s.name: np.zeros(s.shape, s.dtype) for s in graph.outputs}
            run = runner.bind(graph, inputs, outputs)
            run()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            medians[name] = 1e3 * float(np.median(times))
    finally:
        runner.close()  # RKNN's worker process and its shared tensor files
    return medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct-npu-small")
    parser.add_argument("--backends", default="cpu,openvino,qnn-htp,rknn")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for backend in args.backends.split(","):
        with spawn.Pool(1) as pool:
            results[backend] = pool.apply(time_backend, (args.artifact, backend, args.runs))
        print(f"{backend}: " + ", ".join(f"{g} {ms:.2f} ms" for g, ms in results[backend].items()), flush=True)
    from edgekv.core.manifest import read_manifest
    from edgekv.evaluation.projection import project_decode

    manifest = read_manifest(args.artifact)
    layers = manifest.model["layers"]  # a decode step: qkv, layers - 1 layer graphs, the head
    qkv, layer, head = timed_graphs(manifest)["budget-decode"]
    steps = {}
    for backend, ms in results.items():
        steps[backend] = ms[qkv] + (layers - 1) * ms[layer] + ms[head]
        print(f"{backend}: a decode step's graph calls {steps[backend]:.1f} ms here")
    projections = {}
    for backend in results:
        overhead = PUBLISHED_CALL_OVERHEAD_US.get(backend, manifest.profile.call_overhead_us)
        projections[backend] = {"call_overhead_us": overhead,
                                **project_decode(manifest, "quest", 0.0, 0.0, overhead).to_dict()}
        p = projections[backend]
        print(f"{backend}: projected on {manifest.profile.name} at {overhead:g} us per call: {p['step_ms']:.1f} ms a "
              f"step, {p['tok_s']:.1f} tok/s ({p['reading_speed_ratio']:.1f}x reading speed; a projection)")
    if args.json:
        args.json.write_text(json.dumps({"artifact": args.artifact, "runs": args.runs, "median_ms": results,
                                         "decode_step_ms": steps, "projected": projections}, indent=1))


if __name__ == "__main__":
    main()
