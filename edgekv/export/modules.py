"""The per-layer graph modules that are traced to ONNX.

A decoder of L layers becomes L+1 graphs per step (see docs/architecture.md, "Data flow"):

    qkv:         hidden                                       -> q, k, v                (layer 0's)
    layer[l]:    hidden, q, k_sel, v_sel, mask                -> hidden, q, k, v        (attn+MLP of l, q/k/v of l+1)
    head:        hidden, q, k_sel, v_sel, mask                -> logits of the last row (attn+MLP of L-1)

The host sits around the graphs: it looks up the token embeddings (the first graph's hidden), rotates
each graph's new q and k by RoPE at the step's positions (cos/sin in float64, runtime/rope.py), appends
each layer's new k/v to its pages and gathers the selected pages into the fixed-size k_sel/v_sel with an
additive mask. So no graph holds a Gather over the vocabulary, position arithmetic or a rotation, or an
int64 input: NPU compilers run those on the CPU or, in float16, get RoPE wrong at long positions, and on a
CPU the rotation's fourteen small operators cost more in onnxruntime's executor than on the host
(benchmarks/RESULTS.md). Every shape is fixed at trace time, and no input has more than three dimensions
(RKNN inserts an op before 4-D inputs of few channels).

Shapes: hidden [S, H]; q [Hq, S, D]; k, v [Hkv, S, D]; k_sel, v_sel [Hkv, B, D]; mask [S, B]. The modules
call the Hugging Face model's own submodules (norms, projections, MLP), so eps, biases and activation are
the model's own; the rotary frequencies are recorded in the manifest.
"""

from __future__ import annotations

import torch
from torch import nn


def _dims(model) -> tuple[int, int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads, cfg.num_key_value_heads, head_dim


def project_qkv(model, layer_index: int, hidden: torch.Tensor):
    """Pre-attention norm and q/k/v projections of one layer.

    hidden [S, H] -> q [Hq, S, D], k and v [Hkv, S, D]; q and k before RoPE (the host rotates them).
    """
    n_q, n_kv, head_dim = _dims(model)
    layer = model.model.layers[layer_index]
    seq = hidden.shape[0]
    x = layer.input_layernorm(hidden)
    attn = layer.self_attn

    def by_head(y: torch.Tensor, heads: int) -> torch.Tensor:  # [S, heads * D] -> [heads, S, D]
        # One row needs no transpose: a decode graph then holds a Reshape alone
        return y.reshape(heads, 1, head_dim) if seq == 1 else y.reshape(seq, heads, head_dim).transpose(0, 1)

    return by_head(attn.q_proj(x), n_q), by_head(attn.k_proj(x), n_kv), by_head(attn.v_proj(x), n_kv)


def attend_and_mlp(model, layer_index: int, hidden: torch.Tensor, q: torch.Tensor, k_sel: torch.Tensor,
                   v_sel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of the S queries (post-RoPE) over the gathered KV budget, output projection and MLP.

    Grouped-query attention without copying K/V per query head: the G query heads of a group are
    stacked along the row axis and multiply their group's K directly ([Hkv, G*S, B]), which keeps the
    largest tensor G times smaller than repeating K and V would.
    """
    n_q, n_kv, head_dim = _dims(model)
    layer = model.model.layers[layer_index]
    seq, budget, groups = hidden.shape[0], k_sel.shape[1], n_q // n_kv
    attn = layer.self_attn
    qg = q.reshape(n_kv, groups * seq, head_dim) * attn.scaling
    scores = torch.matmul(qg, k_sel.transpose(1, 2))
    # The same nodes for every S: the INT8 quantizer gives a variant's projections the ranges calibrated on
    # another's by tensor name, and the RKNN target rewrites o_proj's Transpose-Reshape input
    scores = scores.reshape(n_kv, groups, seq, budget) + mask.reshape(1, 1, seq, budget)
    probs = torch.softmax(scores, dim=-1).reshape(n_kv, groups * seq, budget)
    out = torch.matmul(probs, v_sel)
    out = out.reshape(n_q, seq, head_dim).transpose(0, 1).reshape(seq, n_q * head_dim)
    hidden = hidden + attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class FirstQKV(nn.Module):
    """The embedded rows hidden [S, H] (looked up on the host) -> layer 0's q, k, v."""

    def __init__(self, model):
        super().__init__()
        self.lm = model

    def forward(self, hidden_in):
        return project_qkv(self.lm, 0, hidden_in)


class LayerBoundary(nn.Module):
    """Attention and MLP of layer l fused with the q/k/v projection of layer l+1."""

    def __init__(self, model, layer_index: int):
        super().__init__()
        self.lm = model
        self.layer_index = layer_index

    def forward(self, hidden_in, q_in, k_sel, v_sel, mask):
        hidden = attend_and_mlp(self.lm, self.layer_index, hidden_in, q_in, k_sel, v_sel, mask)
        q, k, v = project_qkv(self.lm, self.layer_index + 1, hidden)
        return hidden, q, k, v


class LastLayerHead(nn.Module):
    """Attention and MLP of the last layer, final norm and LM head on the last row -> logits [1, 1, V].

    By default the LM head multiplies the weight as stored ([V, H] @ h^T) so that with tied embeddings the
    graph uses the very tensor the host looks embeddings up in, and the artifact stores it once.
    `weight_on_right` computes h @ W^T instead, the form every other projection has: quantizers give a
    constant right-hand operand per-output-channel INT8 weights (the INT8 artifact then stores the tied
    matrix twice, once per layout, at a quarter of its float size each).
    """

    def __init__(self, model, weight_on_right: bool = False):
        super().__init__()
        self.lm = model
        self.weight_on_right = weight_on_right

    def forward(self, hidden_in, q_in, k_sel, v_sel, mask):
        last = len(self.lm.model.layers) - 1
        hidden = attend_and_mlp(self.lm, last, hidden_in, q_in, k_sel, v_sel, mask)
        final = self.lm.model.norm(hidden[-1:])
        if self.weight_on_right:
            logits = torch.matmul(final, self.lm.lm_head.weight.transpose(0, 1))
        else:
            logits = torch.matmul(self.lm.lm_head.weight, final.transpose(0, 1))
        return logits.reshape(1, 1, -1)
