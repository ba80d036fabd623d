"""The fixed cost of a graph call: what each of a decode step's L+1 onnxruntime calls costs beyond its operators.

Usage: .venv/bin/python benchmarks/call_overhead.py [ARTIFACT] [--context 1024] [--steps 32] [--threads 2]
       [--json FILE]

One engine (policy quest) prefills `context` seeded token ids, then decodes `steps` greedy tokens with
onnxruntime's profiler on in every session. Per graph call it takes three times: the wall time of the
bound call (Python, IOBinding and onnxruntime's executor), onnxruntime's own `model_run` span, and the
sum of the call's operator kernels. Wall minus kernels is the fixed cost of the call; the step's wall
minus its calls' is the host's work (selection, gathering, RoPE, embedding). The profiler adds a little
to every operator, so the fixed cost is an upper bound, and the kernels' time per operator type (printed
last) counts a few microseconds too many for every node.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekv.runtime.backend import OnnxruntimeBackend  # noqa: E402
from edgekv.runtime.engine import Engine  # noqa: E402

ARTIFACT = REPO / "artifacts" / "smollm2-135m-instruct-cpu-int4-weight-only"
SEED = 0


def profiled_backend(directory: Path):
    def enable(options) -> None:
        options.enable_profiling = True
        options.profile_file_prefix = str(directory / "onnxruntime")
    return lambda manifest, threads: replace(OnnxruntimeBackend.open(manifest, threads), configure=enable)


def timed(run, walls: list[float]):
    def call() -> None:
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    return call


def profile_spans(path: str, runs: int, by_op: collections.Counter) -> tuple[list[float], list[float]]:
    """The last `runs` model_run spans of a session's profile and the kernel time inside each, in seconds;
    adds the kernels' seconds in those spans to `by_op`, by operator type."""
    events = json.loads(Path(path).read_text())
    spans = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-runs:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and spans[0]["ts"] <= e["ts"]]
    inside = [sum(k["dur"] for k in kernels if s["ts"] <= k["ts"] <= s["ts"] + s["dur"]) for s in spans]
    for kernel in kernels:
        by_op[kernel["args"]["op_name"]] += kernel["dur"] / 1e6
    return [s["dur"] / 1e6 for s in spans], [k / 1e6 for k in inside]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", default=str(ARTIFACT))
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    profiles = tempfile.TemporaryDirectory(prefix="edgekv-profiles-")
    engine = Engine.open(args.artifact, "quest", threads=args.threads, backend=profiled_backend(Path(profiles.name)))
    try:
        ids = np.random.default_rng(SEED).integers(1000, 40000, args.context).tolist()
        token = int(np.argmax(engine.prefill(ids)))
        for _ in range(4):
            token = int(np.argmax(engine.decode(token)))
        step = engine.decode_step
        walls: list[list[float]] = [[] for _ in step.runs]
        step.runs[:] = [timed(run, w) for run, w in zip(step.runs, walls)]
        step_walls = []
        for _ in range(args.steps):
            start = time.perf_counter()
            token = int(np.argmax(engine.decode(token)))
            step_walls.append(time.perf_counter() - start)
        by_op: collections.Counter = collections.Counter()
        spans, kernels = zip(*(profile_spans(engine.backend.sessions[g.name].end_profiling(), args.steps, by_op)
                               for g in step.graphs))
    finally:
        engine.close()
        profiles.cleanup()

    per_step = {name: float(np.median(np.sum(values, axis=0))) * 1000 for name, values in
                (("calls_wall_ms", walls), ("model_run_ms", spans), ("kernels_ms", kernels))}
    per_step["step_ms"] = float(np.median(step_walls)) * 1000
    per_step["host_ms"] = per_step["step_ms"] - per_step["calls_wall_ms"]
    calls = len(step.graphs)
    fixed = (per_step["calls_wall_ms"] - per_step["kernels_ms"]) / calls
    outside = (per_step["calls_wall_ms"] - per_step["model_run_ms"]) / calls
    print(f"{args.artifact}, {args.context} tokens, {args.threads} threads, median of {args.steps} decode steps:")
    print(f"  step {per_step['step_ms']:.1f} ms = {calls} graph calls {per_step['calls_wall_ms']:.1f} ms "
          f"+ host {per_step['host_ms']:.1f} ms")
    print(f"  of the calls: kernels {per_step['kernels_ms']:.1f} ms, onnxruntime's executor "
          f"{per_step['model_run_ms'] - per_step['kernels_ms']:.1f} ms, binding and Python "
          f"{per_step['calls_wall_ms'] - per_step['model_run_ms']:.1f} ms")
    print(f"  fixed cost per call: {1000 * fixed:.0f} us, of which {1000 * outside:.0f} us outside onnxruntime's run")
    op_ms = {op: 1000 * seconds / args.steps for op, seconds in by_op.most_common()}
    print("  kernels by operator, mean ms a step: " + ", ".join(f"{op} {ms:.2f}" for op, ms in op_ms.items()))
    if args.json:
        args.json.write_text(json.dumps({"artifact": args.artifact, "context": args.context, "threads": args.threads,
                                         "steps": args.steps, "calls": calls, **per_step,
                                         "fixed_us_per_call": 1000 * fixed,
                                         "outside_run_us_per_call": 1000 * outside,
                                         "kernels_by_op_ms": op_ms}, indent=1))


if __name__ == "__main__":
    main()
