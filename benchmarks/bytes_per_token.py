"""Bytes a decode step reads, computed from an artifact's graphs, against llama.cpp on the same GGUF file.

Usage: .venv/bin/python benchmarks/bytes_per_token.py ARTIFACT [ARTIFACT ...] [--contexts 1024,4096,...]
       [--measure CONTEXT] [--steps 2] [--llc-mib 32]

edgekv, per token at context N (`quest`, the profile's budgets):
  weights   every initializer of the decode variant's graphs (shared weights once, inline ones too)
  graph KV  every graph input (the gathered K/V budgets dominate: their size does not grow with N)
  bounds    Quest's page bounds the host scores in every layer: 2 x KV heads x head_dim bfloat16 a page
llama.cpp: every tensor of the GGUF file (the tied LM head reads token_embd whole) and its float16 KV
cache of N tokens in every layer. Attention's arithmetic and activations are left out of both.

--measure CONTEXT checks the first artifact's figure against the memory traffic of real decode steps
(this VM exposes no hardware counters): the engine runs under valgrind's cache simulator (callgrind,
--llc-mib of last-level cache, this machine's L3), instrumented only for `steps` decode steps after a
prompt of CONTEXT tokens and one step that warms the simulated caches; every line the last level misses
is a line read from memory. The start-up and the prompt run uninstrumented, still several times slower
than natively: minutes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekv.core.manifest import read_manifest  # noqa: E402

MIB = 2**20
BOUND_BYTES = 2  # bfloat16 min and max per channel (runtime/page_bounds.py)


def edgekv_bytes(artifact: Path) -> tuple[int, int, dict]:
    """(weights, graph inputs) bytes of one decode step, and the model's dimensions."""
    manifest = read_manifest(artifact)
    graphs = manifest.variant("budget-decode")
    table = manifest.data["weights"]
    shared = {name for entry in graphs for name in entry.weights}
    weights = sum(int(np.prod(table[n]["shape"])) * np.dtype(table[n]["dtype"]).itemsize for n in shared)
    for entry in graphs:  # small initializers stay inside the graph files
        model = onnx.load(artifact / entry.file, load_external_data=False)
        weights += sum(len(t.raw_data) for t in model.graph.initializer if t.name not in shared)
    inputs = sum(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for entry in graphs for spec in entry.inputs)
    return weights, inputs, {**manifest.model, "page_size": manifest.profile.page_size}


def step_bytes(weights: int, inputs: int, model: dict, context: int) -> int:
    """What a decode step at `context` reads: the graphs' weights and inputs, and every full page's bounds."""
    per_page = model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * BOUND_BYTES
    return weights + inputs + context // model["page_size"] * per_page


def llama_cpp_weight_bytes() -> int:
    import gguf

    from edgekv.export.models import resolve_model

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(resolve_model("smollm2-135m-instruct").path)).tensors)


def decode_under_control(artifact: Path, context: int, steps: int, work: Path) -> None:
    """The measured process: a prompt, then the decode steps, each phase started when the file `goN` appears
    in work (the parent switches callgrind's instrumentation and dumps between them)."""
    from edgekv.runtime.engine import Engine

    def phase(n: int) -> None:
        (work / f"ready{n}").touch()
        while not (work / f"go{n}").exists():
            time.sleep(0.05)

    engine = Engine.open(artifact, "quest")
    vocab = engine.manifest.model["vocab"]  # random tokens, as `edgekv bench`
    token = int(np.argmax(engine.prefill(np.random.default_rng(0).integers(vocab // 8, vocab, context).tolist())))
    phase(1)  # instrumentation on
    token = int(np.argmax(engine.decode(token)))  # the warm-up step: fills the simulated caches
    phase(2)  # counters zeroed
    for _ in range(steps):
        token = int(np.argmax(engine.decode(token)))
    phase(3)  # counters dumped


def measured_bytes(artifact: Path, context: int, steps: int, llc_mib: int) -> tuple[float, float]:
    """(read, written) bytes per decode step that miss the simulated last-level cache: decode_under_control
    under callgrind."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--measure needs valgrind: install it (apt install valgrind)")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        child = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
                                  f"--LL={llc_mib * MIB},16,64", f"--callgrind-out-file={work}/out",
                                  sys.executable, __file__, str(artifact), "--child", str(context),
                                  "--steps", str(steps), "--work", str(work)],
                                 stderr=subprocess.DEVNULL)
        print(f"under valgrind: the engine opens and reads {context} tokens uninstrumented (tens of minutes here)",
              flush=True)
        for n, command in ((1, ["-i", "on"]), (2, ["-z"]), (3, ["-d"])):
            while not (work / f"ready{n}").exists():
                if child.poll() is not None:
                    raise SystemExit(f"the measured process exited ({child.returncode}) before phase {n}")
                time.sleep(1)
            subprocess.run(["callgrind_control", *command, str(child.pid)], check=True, capture_output=True)
            print(f"phase {n} of 3 ({' '.join(command)}) at {time.strftime('%H:%M:%S')}", flush=True)
            (work / f"go{n}").touch()
        child.wait()
        dump = next(work.glob("out.*")).read_text()  # the -d dump: the decode steps alone
        events = re.search(r"^events: (.*)$", dump, re.M).group(1).split()
        totals = dict(zip(events, map(int, re.search(r"^(?:summary|totals): (.*)$", dump, re.M).group(1).split())))
    return totals["DLmr"] * 64 / steps, totals["DLmw"] * 64 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--contexts", default="1024,4096,8128,16384,32768")
    parser.add_argument("--measure", type=int, default=None, metavar="CONTEXT")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--llc-mib", type=int, default=32)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        decode_under_control(args.artifacts[0], args.child, args.steps, args.work)
        return
    if args.measure is not None:
        args.contexts = f"{args.measure}"
    contexts = [int(c) for c in args.contexts.split(",")]
    llama_weights = llama_cpp_weight_bytes()
    print(f"{'system':<52} {'weights':>8} " + " ".join(f"{c:>13}" for c in contexts))
    model = None
    computed = {}  # per artifact, what a step at each context reads
    for artifact in args.artifacts:
        weights, inputs, model = edgekv_bytes(artifact)
        computed[artifact] = {context: step_bytes(weights, inputs, model, context) for context in contexts}
        cells = []
        for context in contexts:
            total = computed[artifact][context]
            kv = context * model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * 2
            cells.append(f"{total / MIB:6.1f} {total / (llama_weights + kv):5.2f}x")
        print(f"{artifact.name:<52} {weights / MIB:8.1f} " + " ".join(cells))
    cells = []
    for context in contexts:
        kv = context * model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * 2
        cells.append(f"{(llama_weights + kv) / MIB:13.1f}")
    print(f"{'llama.cpp (GGUF Q4_1, float16 KV)':<52} {llama_weights / MIB:8.1f} " + " ".join(cells))
    print("MiB a token; edgekv's ratio to llama.cpp's at the same context")
    if args.measure is not None:
        want = computed[args.artifacts[0]][args.measure]
        read, written = measured_bytes(args.artifacts[0], args.measure, args.steps, args.llc_mib)
        print(f"measured at {args.measure} (callgrind, {args.llc_mib} MiB last-level cache, {args.steps} steps): "
              f"{read / MIB:.1f} MiB read a step ({read / want:.2f}x the computed {want / MIB:.1f}), "
              f"{written / MIB:.1f} MiB written")


if __name__ == "__main__":
    main()
