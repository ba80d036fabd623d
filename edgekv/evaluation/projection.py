"""Projecting a measured decode step onto the profile's device.

What a decode token costs on the NPU, from the actual graphs and the actual pages moved:
- memory: every weight byte once (the layer graphs and the LM head, which reads the embedding matrix)
  plus every KV byte the graphs attend over (each layer's k_sel/v_sel: the budget, or 8192 for dense),
  at the profile's memory bandwidth;
- compute: two operations per weight element plus the attention products, at the profile's INT8 TOPS
  (the step takes the larger of memory and compute time);
- host link: the bytes the runtime moved into the gather buffers from below the device pool (measured);
- calls: the profile's per-call overhead times the graph calls of one token;
- host: the measured selection and gathering time (the host CPU does that work on the device too).

It is a projection, not a measurement, and every output that shows it says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgekv.core.manifest import Manifest
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S


@dataclass
class Projection:
    memory_ms: float
    compute_ms: float
    transfer_ms: float
    calls_ms: float
    host_ms: float
    step_ms: float
    tok_s: float
    reading_speed_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes(manifest: Manifest) -> int:
    return sum(entry["length"] for entry in manifest.data["weights"].values())


def weight_elements(manifest: Manifest) -> int:
    return sum(math.prod(entry["shape"]) for entry in manifest.data["weights"].values())


def project_decode(manifest: Manifest, policy: str, transfer_bytes_per_token: float,
                   host_s_per_token: float, call_overhead_us: float | None = None) -> Projection:
    """`call_overhead_us`: a target's own per-call figure instead of the profile's."""
    profile, model = manifest.profile, manifest.model
    graphs = manifest.variant("dense-decode" if policy == "dense" else "budget-decode")
    kv_tokens = sum(g.budget for g in graphs if g.kind != "qkv")  # over the layers
    kv_bytes = kv_tokens * 2 * model["kv_heads"] * model["head_dim"] * 4
    weights = weight_bytes(manifest)
    ops = 2 * weight_elements(manifest) + kv_tokens * 4 * model["q_heads"] * model["head_dim"]
    memory_ms = (weights + kv_bytes) / (profile.memory_bandwidth_gbps * 1e9) * 1e3
    compute_ms = ops / (profile.int8_tops * 1e12) * 1e3
    transfer_ms = transfer_bytes_per_token / (profile.host_link_gbps * 1e9) * 1e3
    calls_ms = len(graphs) * (profile.call_overhead_us if call_overhead_us is None else call_overhead_us) / 1e3
    host_ms = host_s_per_token * 1e3
    step_ms = max(memory_ms, compute_ms) + transfer_ms + calls_ms + host_ms
    tok_s = 1e3 / step_ms
    return Projection(memory_ms, compute_ms, transfer_ms, calls_ms, host_ms, step_ms, tok_s,
                      tok_s / READING_SPEED_TOKENS_PER_S)
