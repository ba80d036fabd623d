"""Shared external weight files: every weight tensor is written once, whatever number of graphs use it.

The exported graphs keep their weights as external data pointing into per-layer files
(`weights/layer_07.bin`, `weights/embed.bin`, ...). Initializers are renamed to the model's own
parameter names (`model.layers.7.mlp.up_proj.weight.T` for a transposed copy the tracer folded), so the
same tensor has the same name and the same bytes on disk in the prefill, decode and dense graphs, and
the runtime can load it once and hand the one buffer to every session.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# Initializers smaller than this stay inside the graph (shape constants, rotary frequencies).
INLINE_MAX_BYTES = 4096
# Offsets are page-aligned so the files can be memory-mapped tensor by tensor.
ALIGNMENT = 4096
WEIGHTS_SUBDIR = "weights"


@dataclass(frozen=True)
class WeightEntry:
    name: str
    file: str  # relative to the graphs directory
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    sha256: str


def weight_file_for(name: str) -> str:
    match = re.search(r"layers\.(\d+)\.", name)
    if match:
        return f"{WEIGHTS_SUBDIR}/layer_{int(match.group(1)):02d}.bin"
    if "embed_tokens" in name:
        return f"{WEIGHTS_SUBDIR}/embed.bin"
    return f"{WEIGHTS_SUBDIR}/head.bin"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parameter_digests(model) -> dict[str, str]:
    """sha256 of every parameter's bytes, and of its transpose for matrices -> canonical name.

    The tracer folds `x @ W.T` into a new initializer holding W.T under a generated name; its bytes
    identify which parameter it is. Tied parameters appear once (named_parameters drops duplicates).
    """
    digests: dict[str, str] = {}
    for name, param in model.named_parameters():
        array = param.detach().numpy()
        digests.setdefault(_digest(np.ascontiguousarray(array).tobytes()), name)
        if array.ndim == 2:
            digests.setdefault(_digest(np.ascontiguousarray(array.T).tobytes()), f"{name}.T")
    return digests


class WeightWriter:
    """Moves large initializers of traced graphs into the shared weight files, once per tensor."""

    def __init__(self, graphs_dir: Path, digests: dict[str, str] | None, wrapper_prefix: str = "lm."):
        """digests: parameter digests -> canonical names (parameter_digests); None keeps the graphs' own
        names, which the INT8 graphs derive from the canonical float names."""
        self.graphs_dir = graphs_dir
        self.digests = digests
        self.wrapper_prefix = wrapper_prefix
        self.entries: dict[str, WeightEntry] = {}
        self._files: dict[str, object] = {}

    def _canonical_name(self, name: str, digest: str) -> str:
        if self.digests is None:
            return name
        known = self.digests.get(digest)
        if known is not None:
            return known
        # A large constant that is no parameter (none in the supported architectures today).
        return f"const.{name.removeprefix(self.wrapper_prefix)}"

    def _append(self, name: str, tensor: onnx.TensorProto, data: bytes, digest: str) -> WeightEntry:
        file = weight_file_for(name)
        handle = self._files.get(file)
        if handle is None:
            path = self.graphs_dir / file
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._files[file] = open(path, "wb")
        offset = -handle.tell() % ALIGNMENT + handle.tell()
        handle.seek(offset)
        handle.write(data)
        array_type = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        entry = WeightEntry(name, file, offset, len(data), np.dtype(array_type).name, tuple(tensor.dims), digest)
        self.entries[name] = entry
        return entry

    def add(self, name: str, array: np.ndarray) -> None:
        """A tensor the host reads (no graph holds it), written once like the graphs' weights: when a graph
        already wrote the same bytes under this name it is not written again."""
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self._entry(name, tensor, tensor.raw_data, _digest(tensor.raw_data))

    def _entry(self, name: str, tensor: onnx.TensorProto, data: bytes, digest: str) -> WeightEntry:
        """The stored entry of these bytes (of this sha256) under this name, written on first use."""
        entry = self.entries.get(name) or self._append(name, tensor, data, digest)
        if entry.sha256 != digest:  # one name must mean one tensor in every graph that uses it
            raise ValueError(f"two different tensors are both named {name}")
        return entry

    def externalize(self, graph_model: onnx.ModelProto) -> None:
        """Rename large initializers to canonical names and point them at the shared files."""
        renames: dict[str, str] = {}
        for tensor in graph_model.graph.initializer:
            data = numpy_helper.to_array(tensor).tobytes()
            if len(data) < INLINE_MAX_BYTES:
                continue
            digest = _digest(data)
            name = self._canonical_name(tensor.name, digest)
            entry = self._entry(name, tensor, data, digest)
            renames[tensor.name] = name
            tensor.name = name
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", entry.file), ("offset", str(entry.offset)),
                               ("length", str(entry.length))):
                item = tensor.external_data.add()
                item.key, item.value = key, value
        for node in graph_model.graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]

    def save(self, graph_model: onnx.ModelProto, path: Path) -> list[str]:
        """Write a graph with its large weights external (each stored once, by name); the names of the
        external weights it uses."""
        self.externalize(graph_model)
        onnx.save(graph_model, path)
        return [t.name for t in graph_model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]

    def manifest_table(self) -> dict[str, dict]:
        """The manifest's `weights` table: where each tensor lies, relative to the artifact directory."""
        return {e.name: {"file": f"{self.graphs_dir.name}/{e.file}", "offset": e.offset, "length": e.length,
                         "dtype": e.dtype, "shape": list(e.shape)} for e in self.entries.values()}

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
