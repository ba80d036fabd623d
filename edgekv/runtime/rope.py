"""RoPE's cos/sin for a step's positions, computed on the host and fed to the graphs.

In the graphs, position x inv_freq in float16 (how NPUs run them) loses the angle past a few hundred
positions; here the product is float64, and cos/sin are rounded to float32 once. inv_freq and the
attention scaling are the model's own, recorded at export (after its rope theta and scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rope:
    inv_freq: np.ndarray  # [D / 2] float64 (the model's float32 values)
    attention_scaling: float

    @classmethod
    def from_manifest(cls, model: dict) -> "Rope":
        rope = model["rope"]
        return cls(np.asarray(rope["inv_freq"], np.float64), float(rope["attention_scaling"]))

    def fill(self, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        """cos and sin [S, D] of positions [S], each half of D the same (rotate-half convention)."""
        angles = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        half = self.inv_freq.shape[0]
        cos[:, :half] = np.cos(angles) * self.attention_scaling
        sin[:, :half] = np.sin(angles) * self.attention_scaling
        cos[:, half:], sin[:, half:] = cos[:, :half], sin[:, :half]
