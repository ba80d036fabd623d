"""The KV-cache interface the engine drives, and the static full-context cache (`dense`).

Per step (S tokens at positions p..p+S-1) the engine calls `begin`, then per layer `append` with the
layer's new K/V (from the graph that just ran) and `prepare`, which leaves that layer's k_sel, v_sel and
mask (the buffers `inputs` handed out at bind time) ready for the layer's graph. Two caches implement it:

- paged_cache.PagedCache: unbounded pages in tiers, selected into each graph's fixed budget (quest,
  rerank, streaming);
- StaticCache: the classic static-NPU design, one full-context buffer per layer (the dense baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgekv.core.constants import MASK_VALUE
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry
from edgekv.runtime.stats import HostTimers


@dataclass(frozen=True)
class CacheUsage:
    pages: dict[str, int]  # pages per tier: device, host, disk
    kv_bytes: dict[str, int]  # bytes of cached K/V per tier
    transfer_bytes: int  # moved into the graphs' KV inputs from below the device tier, so far
    pages_spilled: int = 0
    pages_restored: int = 0
    bounds_bytes: int = 0  # Quest's page bounds in host RAM (under a far position scheme, the far set too)


LayerInputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # one layer graph's bound k_sel, v_sel and mask
KV = list[tuple[np.ndarray, np.ndarray]]  # every layer's keys and values, [kv_heads, tokens, head_dim] each


class KVCache(Protocol):
    family: str  # which graphs of the artifact it feeds: "budget" or "dense" (their variants' prefix)

    def inputs(self, graphs: list[GraphEntry], decoding: bool) -> list[LayerInputs]:
        """The k_sel, v_sel and mask buffers of each layer graph of a variant, allocated once."""
        ...

    def begin(self, decoding: bool, start: int, row_positions: np.ndarray, pad: int) -> None:
        """A step of the variant's rows at row_positions [S] (the first `pad` rows are padding) begins;
        the cache holds `start` tokens."""
        ...

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        """The step's new keys and values of one layer, [kv_heads, n, head_dim] (post-RoPE)."""
        ...

    def prepare(self, layer: int, q: np.ndarray) -> None:
        """Fill the layer's inputs for the step, given its query rows [q_heads, n, head_dim]."""
        ...

    def snapshot(self) -> KV: ...
    def restore(self, kv: KV) -> None: ...
    def reset(self) -> None: ...
    def usage(self) -> CacheUsage: ...
    def close(self) -> None: ...


def fill_mask(mask: np.ndarray, positions: np.ndarray, length: int, row_positions: np.ndarray, pad: int,
              mask_value: float) -> None:
    """Additive mask [S, B]: slot j is visible to row r iff it holds a token (position positions[j] below
    `length`) at or before r's position; padding rows see nothing (mask_value: the profile's)."""
    visible = (positions[None, :] <= row_positions[:, None]) & (positions[None, :] < length)
    mask[:] = np.where(visible, 0.0, mask_value)
    mask[:pad] = mask_value


@dataclass
class StaticCache:
    """The classic static design: each layer's K/V in one buffer of the model's full context, which the
    graphs read whole; a step writes its new K/V in place. The dense graphs of every variant share them."""

    kv_heads: int
    head_dim: int
    capacity: int  # tokens: the dense graphs' budget (the model's trained context)
    timers: HostTimers
    mask_value: float = MASK_VALUE
    family = "dense"

    def __post_init__(self) -> None:
        self.length = 0
        self.caches: list[tuple[np.ndarray, np.ndarray]] = []
        self.masks: dict[bool, np.ndarray] = {}  # per variant (decoding or not): one mask for every layer
        self.slot_positions = np.arange(self.capacity)  # slot j holds position j
        self.start = 0

    def inputs(self, graphs: list[GraphEntry], decoding: bool) -> list[LayerInputs]:
        shape = (self.kv_heads, self.capacity, self.head_dim)
        while len(self.caches) < len(graphs) - 1:
            self.caches.append((np.zeros(shape, np.float32), np.zeros(shape, np.float32)))
        self.masks[decoding] = np.zeros((graphs[0].seq_len, self.capacity), np.float32)
        return [(k, v, self.masks[decoding]) for k, v in self.caches]

    def begin(self, decoding: bool, start: int, row_positions: np.ndarray, pad: int) -> None:
        n = len(row_positions) - pad
        if start + n > self.capacity:
            raise EdgekvError(f"the dense baseline's static context is {self.capacity} tokens; "
                              "use --policy quest for longer contexts")
        started = time.perf_counter()
        self.start, self.length = start, start + n
        fill_mask(self.masks[decoding], self.slot_positions, start + n, row_positions, pad, self.mask_value)
        self.timers.gather_s += time.perf_counter() - started

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        started = time.perf_counter()
        k_cache, v_cache = self.caches[layer]
        k_cache[:, self.start:self.length], v_cache[:, self.start:self.length] = keys, values
        self.timers.gather_s += time.perf_counter() - started

    def prepare(self, layer: int, q: np.ndarray) -> None:
        """Nothing to choose: the graphs read the whole buffer."""

    def snapshot(self) -> KV:
        return [(k[:, :self.length].copy(), v[:, :self.length].copy()) for k, v in self.caches]

    def restore(self, kv: KV) -> None:
        tokens = kv[0][0].shape[1]
        if tokens > self.capacity:
            raise EdgekvError(f"the saved conversation has {tokens} tokens, more than the dense baseline's "
                              f"static {self.capacity}; load it with --policy quest")
        for (k_cache, v_cache), (keys, values) in zip(self.caches, kv):
            k_cache[:, :tokens], v_cache[:, :tokens] = keys, values
        self.length = tokens

    def reset(self) -> None:
        self.length = 0  # what lies past the length is masked until written again

    def usage(self) -> CacheUsage:
        """No pages; the static buffers are on the device, whatever the context."""
        return CacheUsage({"device": 0, "host": 0, "disk": 0},
                          {"device": sum(k.nbytes + v.nbytes for k, v in self.caches), "host": 0, "disk": 0}, 0)

    def close(self) -> None:
        """Nothing on disk."""
