"""The graph-backend seam: everything that opens a graph, binds its buffers and runs it.

The engine owns every input and output buffer (numpy arrays allocated once); a backend turns a graph and
those buffers into a `run()` that reads the inputs and leaves the outputs in their buffers. A backend that
can read and write numpy memory in place binds once (onnxruntime's IOBinding, below); one that cannot (a
vendor simulator that copies its inputs) copies in and out inside `run`, and fits the same seam.

onnxruntime: the weight files are memory-mapped; each tensor the graphs use becomes one OrtValue over
the mapping that is handed to every session that uses it (SessionOptions.add_initializer), so the prefill,
decode and dense graphs of a layer share one copy. Weight pre-packing is turned off for the same reason:
it would make a private, re-laid-out copy of every matrix in every session. Except for MatMulNBits graphs
(the CPU weight-only artifacts): that kernel runs its integer path only on weights it packed at session
creation, and without them dequantizes the whole matrix at every call. Their sessions no longer read the
mapped weights once packed, so those pages go back to the OS as each session is made. QDQ artifacts on the CPU provider
(which has no 16-bit QDQ kernels) get their weights dequantized once per session, by constant folding.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnxruntime as ort

from edgekv.core.manifest import GraphEntry, Manifest

Buffers = dict[str, np.ndarray]  # a graph's input or output name -> the engine's buffer for it


class GraphBackend(Protocol):
    """What the engine needs of a backend."""

    def bind(self, graph: GraphEntry, inputs: Buffers, outputs: Buffers) -> Callable[[], None]:
        """A call that runs `graph` on the current contents of `inputs` and writes `outputs` in place."""
        ...

    def close(self) -> None:
        """Release the sessions (and any toolchain process); no bound call runs after it."""
        ...


BackendFactory = Callable[[Manifest, int], GraphBackend]  # (manifest, threads) -> backend


def map_shared_weights(manifest: Manifest) -> tuple[dict[str, ort.OrtValue], dict[str, mmap.mmap]]:
    """One OrtValue per weight tensor that a graph uses, each a view into its weight file, memory-mapped
    read-only (an OrtValue made from a numpy array keeps that array, and so the mapping, alive); and the
    mappings by file. The host's embedding table is read from its own mapping (embedding.py)."""
    used = {name for graph in manifest.graphs.values() for name in graph.weights}
    files: dict[str, mmap.mmap] = {}
    values = {}
    for name, entry in manifest.data["weights"].items():
        if name not in used:
            continue
        if entry["file"] not in files:
            with open(manifest.directory / entry["file"], "rb") as file:
                files[entry["file"]] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(files[entry["file"]], dtype=np.uint8, count=entry["length"], offset=entry["offset"])
        values[name] = ort.OrtValue.ortvalue_from_numpy(raw.view(entry["dtype"]).reshape(entry["shape"]))
    return values, files


def available_providers(requested: tuple[str, ...]) -> list[str]:
    """The profile's execution providers that this onnxruntime build has, in the profile's order."""
    have = set(ort.get_available_providers())
    chosen = [p for p in requested if p in have]
    return chosen or ["CPUExecutionProvider"]


@dataclass
class OnnxruntimeBackend:
    """One InferenceSession per graph (created on first bind, kept), run with IOBinding over the engine's
    buffers: OrtValues share the numpy arrays' memory, so binding once is enough."""

    manifest: Manifest
    weights: dict[str, ort.OrtValue]
    providers: list[str]
    threads: int = 0  # 0: onnxruntime's default (one per core)
    fold_qdq_weights: bool = True  # QDQ graphs on the CPU provider: weights dequantized once (below)
    # A vendor target's compiled form of each graph (edgekv/targets), opened instead of the artifact's own,
    # and what adds the target's execution provider to each session's options.
    graph_files: dict[str, Path] | None = None
    configure: Callable[[ort.SessionOptions], None] | None = None
    mapped_files: dict[str, mmap.mmap] = field(default_factory=dict)  # weight file -> its mapping
    sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    values: dict[int, ort.OrtValue] = field(default_factory=dict)  # id(buffer) -> its OrtValue, one per buffer

    @classmethod
    def open(cls, manifest: Manifest, threads: int = 0) -> "OnnxruntimeBackend":
        weights, files = map_shared_weights(manifest)
        return cls(manifest, weights, available_providers(manifest.profile.execution_providers), threads,
                   mapped_files=files)

    def session(self, graph: GraphEntry) -> ort.InferenceSession:
        """The graph's session, made on first use. It reads the backend's weights without a copy: keep the
        backend alive while the session runs."""
        found = self.sessions.get(graph.name)
        if found is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            quantization = self.manifest.data.get("quantization", {}).get("format")
            prepacked = quantization == "MatMulNBits"
            if not prepacked:
                options.add_session_config_entry("session.disable_prepacking", "1")
            if quantization == "QDQ" and self.fold_qdq_weights and self.providers == ["CPUExecutionProvider"]:
                # The CPU provider has no kernels for 16-bit QDQ: it would dequantize every weight at every
                # call. With its QDQ handling off, constant folding dequantizes each weight once, here; the
                # activations keep their quantize-dequantize pairs, so the products are the same.
                options.add_session_config_entry("session.disable_quant_qdq", "1")
            # The host works between every two graph calls; onnxruntime's worker threads would otherwise
            # spin after each call and take the cores from page selection and gathering.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if graph.seq_len > 1:
                # A prefill graph's intermediates (a chunk's rows against its KV slots) would stay reserved
                # in each session's own arena, hundreds of MiB over an artifact; allocated per call, prefill
                # runs as fast (benchmarks/RESULTS.md, "Memory of the prefill sessions").
                options.enable_cpu_mem_arena = False
            if self.configure is not None:
                self.configure(options)
            for name in graph.weights if self.graph_files is None else ():
                options.add_initializer(name, self.weights[name])
            path = self.manifest.directory / graph.file if self.graph_files is None else self.graph_files[graph.name]
            found = self.sessions[graph.name] = ort.InferenceSession(str(path), options,
                                                                     providers=self.providers or None)
            if prepacked and self.graph_files is None:
                # The session reads its packed copies from now on; a page it still reads comes back from
                # the file when it does.
                for file in {self.manifest.data["weights"][name]["file"] for name in graph.weights}:
                    self.mapped_files[file].madvise(mmap.MADV_DONTNEED)
        return found

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        # Each IOBinding keeps the OrtValues bound to it alive, and each OrtValue its numpy array.
        if id(array) not in self.values:
            self.values[id(array)] = ort.OrtValue.ortvalue_from_numpy(array)
        return self.values[id(array)]

    def bind(self, graph: GraphEntry, inputs: Buffers, outputs: Buffers) -> Callable[[], None]:
        session = self.session(graph)
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, self._value(array))
        for name, array in outputs.items():
            binding.bind_ortvalue_output(name, self._value(array))
        def run(weights: dict[str, ort.OrtValue] = self.weights) -> None:
            # The default argument keeps the weights the session reads alive with the call, even when
            # nothing else holds the backend any more.
            session.run_with_iobinding(binding)
        return run

    def close(self) -> None:
        self.sessions.clear()
        self.values.clear()
