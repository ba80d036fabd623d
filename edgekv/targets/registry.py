"""The vendor targets by name: what `edgekv compile --target` compiles with, and what `--backend` runs on.

A backend other than `cpu` runs the graphs its target compiled (`edgekv compile`); the host runtime
(pages, selection, tiers) is the same for all.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import Manifest
from edgekv.runtime.backend import BackendFactory, OnnxruntimeBackend
from edgekv.targets import openvino, qnn, rknn
from edgekv.targets.common import CompileGraph

# target -> what opens its compile_graph for one artifact's compile (RKNN's keeps one toolchain process)
COMPILERS: dict[str, Callable[[], AbstractContextManager[CompileGraph]]] = {
    qnn.NAME: lambda: nullcontext(qnn.compile_graph), openvino.NAME: lambda: nullcontext(openvino.compile_graph),
    rknn.NAME: rknn.compiler}
PRECISIONS = {qnn.NAME: "float32", openvino.NAME: "float32", rknn.NAME: "float16"}  # each target's default
BACKENDS: dict[str, BackendFactory] = {"cpu": OnnxruntimeBackend.open, qnn.NAME: qnn.open_backend,
                                       openvino.NAME: openvino.OpenvinoBackend.open,
                                       rknn.BACKEND: rknn.RknnBackend.open}
TARGET_OF = {qnn.NAME: qnn.NAME, openvino.NAME: openvino.NAME, rknn.BACKEND: rknn.NAME}  # backend -> its target


def compiler(target: str) -> AbstractContextManager[CompileGraph]:
    if target not in COMPILERS:
        raise EdgekvError(f"unknown target '{target}'; choose one of: {', '.join(COMPILERS)}")
    return COMPILERS[target]()


def backend_name(name: str | None, manifest: Manifest) -> str:
    """The named backend, or by default the profile's (runtime.backend) when the artifact was compiled for
    it, else onnxruntime's CPU provider (`cpu`)."""
    if name is None:
        preferred = manifest.profile.backend
        name = preferred if TARGET_OF.get(preferred) in manifest.data.get("compiled", {}) else "cpu"
    if name not in BACKENDS:
        raise EdgekvError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    return name


def backend_for(name: str | None, manifest: Manifest) -> BackendFactory:
    return BACKENDS[backend_name(name, manifest)]
