"""INT8 pages are quantized once, when full: each layer's page being written stays float32 here until
then (re-quantizing it at every token would compound the rounding)."""

from __future__ import annotations

import numpy as np

CLOSED = -1


class OpenPages:
    def __init__(self, layers: int, kv_heads: int, page_size: int, head_dim: int):
        self.page = np.full(layers, CLOSED, dtype=np.int64)  # per layer: its open page, or CLOSED
        self.k = np.zeros((layers, kv_heads, page_size, head_dim), np.float32)
        self.v = np.zeros_like(self.k)

    def open(self, layer: int, page: int) -> None:
        self.page[layer] = page
        self.k[layer] = 0.0
        self.v[layer] = 0.0

    def close(self, layer: int) -> None:
        self.page[layer] = CLOSED

    def is_open(self, layer: int, pages: np.ndarray) -> np.ndarray:
        return pages == self.page[layer]
