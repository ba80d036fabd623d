"""RoPE's cos/sin for a step's positions, computed on the host, which rotates each graph's new q and k.

In the graphs, position x inv_freq in float16 (how NPUs run them) loses the angle past a few hundred
positions; here the product is float64, and cos/sin are rounded to float32 once. inv_freq and the
attention scaling are the model's own, recorded at export (after its rope theta and scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgekv.runtime.kernels.rotation import rotate_keys, shift_table


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

    def rotate(self, x: np.ndarray, shifts: np.ndarray | int) -> np.ndarray:
        """x [..., D] rotated by RoPE's rotation of `shifts` positions (an int, or an array of x's leading
        shape): rotations compose by adding positions, so a key rotated at n and shifted by m - n is the key
        rotated at m. The rotation alone, without the attention scaling; float64 angles, float32 result."""
        angles = np.multiply.outer(np.asarray(shifts, np.float64), self.inv_freq)
        cos, sin = np.cos(angles), np.sin(angles)
        half = self.inv_freq.shape[0]
        first, second = x[..., :half], x[..., half:]
        rotated = np.empty(x.shape, np.float32)
        rotated[..., :half] = first * cos - second * sin
        rotated[..., half:] = second * cos + first * sin
        return rotated


@dataclass
class KeyShifter:
    """Rotates cached keys by whole numbers of positions (kernels/rotation.py), from a table of cos/sin per
    shift that grows with the largest shift asked for: the far position schemes shift far keys by up
    to the context's length, page after page, every step."""

    rope: Rope
    cos: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    sin: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def rotate(self, keys: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """keys [m, page_size, D] each rotated by shifts [m, page_size] positions (as Rope.rotate)."""
        if keys.size == 0:
            return keys.copy()
        cos, sin = self.table(shifts)
        return rotate_keys(np.ascontiguousarray(keys, np.float32), np.ascontiguousarray(shifts, np.int64), cos, sin)

    def table(self, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cos/sin table (rotation.shift_table), grown to cover every one of `shifts` (non-empty)."""
        need = int(np.abs(shifts).max()) + 1
        if need > len(self.cos):
            self.cos, self.sin = shift_table(self.rope.inv_freq, max(need, 2 * len(self.cos)))
        return self.cos, self.sin
