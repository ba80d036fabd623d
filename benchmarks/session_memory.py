"""Resident memory of an artifact's weights and of all its onnxruntime sessions (weights shared).

Usage: .venv/bin/python benchmarks/session_memory.py [ARTIFACT_DIR]
"""

import sys

from edgekv.core.manifest import load_verified
from edgekv.runtime.backend import OnnxruntimeBackend


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main(directory: str = "artifacts/smollm2-135m-instruct-npu-small") -> None:
    manifest = load_verified(directory)
    before = resident_mib()
    sessions = OnnxruntimeBackend.open(manifest)
    weights = resident_mib()
    print(f"weights loaded: +{weights - before:.0f} MiB "
          f"({sum(w['length'] for w in manifest.data['weights'].values()) / 2**20:.0f} MiB on disk)")
    for variant in manifest.data["variants"]:
        for graph in manifest.variant(variant):
            sessions.session(graph)
        print(f"+ sessions of {variant}: {resident_mib() - before:.0f} MiB in all")


if __name__ == "__main__":
    main(*sys.argv[1:])
