"""The simplest host loop over an artifact's graphs: every token's K/V is selected (no paging).

It checks the exported graphs (with the host's embedding lookup and RoPE rotation) against transformers
apart from the real runtime's paging: with all pages selected, the graphs must compute exactly the
model's dense attention.
"""

from __future__ import annotations

import numpy as np

from edgekv.core.constants import MASK_VALUE
from edgekv.runtime.backend import OnnxruntimeBackend
from edgekv.runtime.embedding import Embedding
from edgekv.runtime.kernels.rotation import rotate_half_reference
from edgekv.runtime.rope import Rope


def run_step(backend: OnnxruntimeBackend, graphs, caches: list[list[np.ndarray]], tokens: list[int], start: int):
    """Feed `tokens` at positions start.. through one step's graphs; returns the last row's logits.

    The chunk is left-padded to the graph's fixed length so the last real token sits on the last row,
    the only row whose logits the head graph returns. Padding rows' K/V are discarded.
    """
    seq = graphs[0].seq_len
    n = len(tokens)
    pad = seq - n
    ids = np.zeros(seq, dtype=np.int64)
    ids[pad:] = tokens
    positions = np.zeros(seq, dtype=np.int64)
    positions[pad:] = np.arange(start, start + n)
    hidden = np.zeros((seq, backend.manifest.model["hidden"]), np.float32)
    Embedding.open(backend.manifest).lookup(ids, hidden)
    cos, sin = (np.zeros((seq, backend.manifest.model["head_dim"]), np.float32) for _ in range(2))
    Rope.from_manifest(backend.manifest.model).fill(positions, cos, sin)
    q, k, v = backend.session(graphs[0]).run(None, {"hidden_in": hidden})
    for layer, graph in enumerate(graphs[1:]):
        q, k = rotate_half_reference(q, cos, sin), rotate_half_reference(k, cos, sin)
        caches[layer].append((k[:, pad:], v[:, pad:]))
        keys = np.concatenate([c[0] for c in caches[layer]], axis=1)
        values = np.concatenate([c[1] for c in caches[layer]], axis=1)
        length, budget = keys.shape[1], graph.budget
        assert length <= budget, f"context {length} exceeds the graph budget {budget}"
        k_sel = np.zeros((keys.shape[0], budget, keys.shape[2]), dtype=np.float32)
        v_sel = np.zeros_like(k_sel)
        k_sel[:, :length], v_sel[:, :length] = keys, values
        slot = np.arange(budget)
        visible = (slot[None, :] <= positions[:, None]) & (slot[None, :] < length)
        visible[:pad] = False
        mask = np.where(visible, 0.0, MASK_VALUE).astype(np.float32)
        feeds = {"hidden_in": hidden, "q_in": q, "k_sel": k_sel, "v_sel": v_sel, "mask": mask}
        if graph.kind == "layer":
            hidden, q, k, v = backend.session(graph).run(None, feeds)
        else:
            (logits,) = backend.session(graph).run(None, feeds)
    return logits[0, -1]


def greedy_all_pages(backend: OnnxruntimeBackend, policy: str, prompt: list[int], new_tokens: int):
    """Greedy tokens and the prompt's last-token logits through the `policy` (budget or dense) graphs."""
    manifest = backend.manifest
    prefill, decode = manifest.variant(f"{policy}-prefill"), manifest.variant(f"{policy}-decode")
    caches: list[list] = [[] for _ in range(len(prefill) - 1)]
    chunk = prefill[0].seq_len
    for start in range(0, len(prompt), chunk):
        logits = run_step(backend, prefill, caches, prompt[start:start + chunk], start)
    first_logits = logits
    tokens = [int(np.argmax(logits))]
    while len(tokens) < new_tokens:
        logits = run_step(backend, decode, caches, tokens[-1:], len(prompt) + len(tokens) - 1)
        tokens.append(int(np.argmax(logits)))
    return tokens, first_logits
