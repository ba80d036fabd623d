"""A variant's L+1 graphs bound once to numpy buffers (the host's and the cache's), so a step only writes
into them and runs each graph (engine.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgekv.core.manifest import GraphEntry
from edgekv.runtime.backend import GraphBackend
from edgekv.runtime.kv_cache import LayerInputs


@dataclass
class BoundStep:
    """The L+1 graphs of one variant, each bound to its buffers."""

    graphs: list[GraphEntry]
    runs: list[Callable[[], None]]  # per graph: run it on its bound buffers
    # ids, positions, cos and sin (the host's), hidden0/1, q0/1, k_new, v_new, logits
    buffers: dict[str, np.ndarray]
    layer_kv: list[LayerInputs]  # per layer graph: its k_sel, v_sel and mask (the cache's)
    inputs: list[dict[str, np.ndarray]]  # per graph: its input name -> the bound buffer

    @property
    def seq_len(self) -> int:
        return self.graphs[0].seq_len


def _spec(graph: GraphEntry, name: str):
    return next(t for t in graph.inputs + graph.outputs if t.name == name)


def bind_step(backend: GraphBackend, graphs: list[GraphEntry], layer_kv: list[LayerInputs]) -> BoundStep:
    """Allocate the step's buffers and bind every graph of a variant to them (and to the cache's KV inputs).
    The host writes the embedded rows into hidden0; graph i writes hidden and q into buffers i % 2, which
    graph i + 1 reads."""
    def zeros(graph: GraphEntry, name: str) -> np.ndarray:
        spec = _spec(graph, name)
        return np.zeros(spec.shape, dtype=spec.dtype)

    qkv, head = graphs[0], graphs[-1]
    seq, head_dim = qkv.seq_len, _spec(qkv, "q_out").shape[-1]
    buffers = {"ids": np.zeros(seq, np.int64), "positions": np.zeros(seq, np.int64),
               "cos": np.zeros((seq, head_dim), np.float32), "sin": np.zeros((seq, head_dim), np.float32),
               "hidden0": zeros(qkv, "hidden_in"), "hidden1": zeros(qkv, "hidden_in"),
               "q0": zeros(qkv, "q_out"), "q1": zeros(qkv, "q_out"),
               "k_new": zeros(qkv, "k_out"), "v_new": zeros(qkv, "v_out"), "logits": zeros(head, "logits")}
    runs, graph_inputs = [], []
    for index, graph in enumerate(graphs):
        out = index % 2
        new_qkv = {"q_out": buffers[f"q{out}"], "k_out": buffers["k_new"], "v_out": buffers["v_new"]}
        if graph.kind == "qkv":
            inputs, outputs = {"hidden_in": buffers["hidden0"]}, new_qkv
        else:
            layer = index - 1
            inputs = {"hidden_in": buffers[f"hidden{layer % 2}"], "q_in": buffers[f"q{layer % 2}"],
                      **dict(zip(("k_sel", "v_sel", "mask"), layer_kv[layer]))}
            if graph.kind == "layer":
                outputs = {"hidden_out": buffers[f"hidden{out}"], **new_qkv}
            else:
                outputs = {"logits": buffers["logits"]}
        runs.append(backend.bind(graph, inputs, outputs))
        graph_inputs.append(inputs)
    return BoundStep(graphs, runs, buffers, layer_kv, graph_inputs)
