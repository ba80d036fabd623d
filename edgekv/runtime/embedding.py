"""Token embeddings looked up on the host, from the artifact's weight file, memory-mapped.

The first graph takes the embedded rows: a Gather over the vocabulary table is what NPU compilers fail on
(QNN cannot finalize it) or run on the CPU, and a step only needs S rows of the table. The table is the
float32 one (`vocab_axis` 0: [V, H]); in weight-only artifacts each row's 8-bit blocks ([V, blocks,
block] with a scale per block, MatMulNBits' layout of the tied LM head); in QDQ artifacts the LM head's
16-bit [H, V] matrix with a scale per vocabulary entry. When the embeddings are tied, the LM head and the
host read the same stored bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.core.manifest import Manifest


def mapped_weight(manifest: Manifest, name: str) -> np.ndarray:
    """A tensor of the artifact's weight files, memory-mapped read-only."""
    entry = manifest.data["weights"][name]
    return np.memmap(manifest.directory / entry["file"], dtype=entry["dtype"], mode="r", offset=entry["offset"],
                     shape=tuple(entry["shape"]))


@dataclass
class Embedding:
    table: np.ndarray  # memory-mapped [V, H] or [V, blocks, block] (vocab_axis 0), or [H, V] (vocab_axis 1)
    vocab_axis: int
    scale: np.ndarray | None  # for an integer table: [V] per vocabulary entry or [V, blocks] per block
    zero_point: int = 0

    @classmethod
    def open(cls, manifest: Manifest) -> "Embedding":
        record = manifest.data["embedding"]
        scale = mapped_weight(manifest, record["scale"]) if record["scale"] else None
        return cls(mapped_weight(manifest, record["weight"]), record["vocab_axis"], scale, record.get("zero_point", 0))

    def lookup(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out [S, H] = the embeddings of token ids [S]."""
        rows = self.table[ids] if self.vocab_axis == 0 else self.table[:, ids].T
        if self.scale is None:
            out[:] = rows
        elif rows.ndim == 3:  # blocks of each row, a scale each
            values = (rows.astype(np.float32) - self.zero_point) * self.scale[ids][:, :, None]
            out[:] = values.reshape(len(ids), -1)[:, :out.shape[1]]
        else:
            out[:] = (rows.astype(np.float32) - self.zero_point) * self.scale[ids][:, None]
