"""onnxruntime sessions over an artifact's graphs, with every weight held once in memory.

The weight files are read once into numpy arrays; each tensor becomes one OrtValue that is handed to
every session that uses it (SessionOptions.add_initializer), so the prefill, decode and dense graphs
of a layer share one copy. Weight pre-packing is turned off for the same reason: it would make a
private, re-laid-out copy of every matrix in every session. Except for MatMulNBits graphs (the CPU
weight-only INT8 artifacts): that kernel runs its integer path only on weights it packed at session
creation, and without them dequantizes the whole matrix at every call (9x slower per token, measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgekv.toolkit.manifest import GraphEntry, Manifest


def load_shared_weights(manifest: Manifest) -> dict[str, ort.OrtValue]:
    """One OrtValue per weight tensor, each a view into one in-memory copy of its weight file
    (an OrtValue made from a numpy array keeps that array, and so the file's buffer, alive)."""
    files: dict[str, np.ndarray] = {}
    values = {}
    for name, entry in manifest.data["weights"].items():
        raw = files.get(entry["file"])
        if raw is None:
            raw = files[entry["file"]] = np.fromfile(manifest.directory / entry["file"], dtype=np.uint8)
        array = raw[entry["offset"]:entry["offset"] + entry["length"]].view(entry["dtype"]).reshape(entry["shape"])
        values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


def available_providers(requested: tuple[str, ...]) -> list[str]:
    """The profile's execution providers that this onnxruntime build has, in the profile's order."""
    have = set(ort.get_available_providers())
    chosen = [p for p in requested if p in have]
    return chosen or ["CPUExecutionProvider"]


@dataclass
class GraphSessions:
    """One InferenceSession per graph of the artifact, created lazily and kept."""

    manifest: Manifest
    weights: dict[str, ort.OrtValue]
    providers: list[str]
    threads: int = 0  # 0: onnxruntime's default (one per core)

    def __post_init__(self) -> None:
        self._sessions: dict[str, ort.InferenceSession] = {}

    @classmethod
    def open(cls, manifest: Manifest, threads: int = 0) -> "GraphSessions":
        return cls(manifest, load_shared_weights(manifest), available_providers(manifest.profile.execution_providers),
                   threads)

    def session(self, graph: GraphEntry) -> ort.InferenceSession:
        found = self._sessions.get(graph.name)
        if found is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            if self.manifest.data.get("quantization", {}).get("format") != "MatMulNBits":
                options.add_session_config_entry("session.disable_prepacking", "1")
            # The host works between every two graph calls; onnxruntime's worker threads would otherwise
            # spin after each call and take the cores from page selection and gathering.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            for name in graph.weights:
                options.add_initializer(name, self.weights[name])
            found = self._sessions[graph.name] = ort.InferenceSession(
                str(self.manifest.directory / graph.file), options, providers=self.providers)
        return found

    def run(self, graph: GraphEntry, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(graph).run(None, feeds)

