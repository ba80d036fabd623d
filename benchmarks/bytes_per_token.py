"""Bytes a decode step reads, computed from an artifact's graphs, against llama.cpp on the same GGUF file.

Usage: .venv/bin/python benchmarks/bytes_per_token.py ARTIFACT [ARTIFACT ...] [--contexts 1024,4096,...]

edgekv, per token at context N (`quest`, the profile's budgets):
  weights   every initializer of the decode variant's graphs (shared weights once, inline ones too)
  graph KV  every graph input (the gathered K/V budgets dominate: their size does not grow with N)
  bounds    Quest's page bounds the host scores in every layer: 2 x KV heads x head_dim bfloat16 a page
llama.cpp: every tensor of the GGUF file (the tied LM head reads token_embd whole) and its float16 KV
cache of N tokens in every layer. Attention's arithmetic and activations are left out of both.
"""

from __future__ import annotations

import argparse
import sys
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


def llama_cpp_weight_bytes() -> int:
    import gguf

    from edgekv.export.models import resolve_model

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(resolve_model("smollm2-135m-instruct").path)).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--contexts", default="1024,4096,8128,16384,32768")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    llama_weights = llama_cpp_weight_bytes()
    print(f"{'system':<52} {'weights':>8} " + " ".join(f"{c:>13}" for c in contexts))
    model = None
    for artifact in args.artifacts:
        weights, inputs, model = edgekv_bytes(artifact)
        per_page = model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * BOUND_BYTES
        cells = []
        for context in contexts:
            total = weights + inputs + context // model["page_size"] * per_page
            kv = context * model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * 2
            cells.append(f"{total / MIB:6.1f} {total / (llama_weights + kv):5.2f}x")
        print(f"{artifact.name:<52} {weights / MIB:8.1f} " + " ".join(cells))
    cells = []
    for context in contexts:
        kv = context * model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * 2
        cells.append(f"{(llama_weights + kv) / MIB:13.1f}")
    print(f"{'llama.cpp (GGUF Q4_1, float16 KV)':<52} {llama_weights / MIB:8.1f} " + " ".join(cells))
    print("MiB a token; edgekv's ratio to llama.cpp's at the same context")


if __name__ == "__main__":
    main()
