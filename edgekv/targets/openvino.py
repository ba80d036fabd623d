"""Intel (OpenVINO): each graph converted to OpenVINO IR, and a backend that runs the IR.

`ov.save_model` compresses weights to float16 by default; the IR is saved with compress_to_fp16=False,
so a float32 graph stays float32 (a profile's float16 graphs are float16 already). The device is the
NPU plugin where the machine has one and the CPU plugin otherwise. The plugin is told the compile's
precision (float32 by default: on CPUs with bfloat16 units the CPU plugin's default would be bfloat16).

OpenVINO's import and `convert_model` send usage telemetry (`openvino_telemetry`, installed with it) to
the network from a process forked off a worker thread; edgekv makes no network calls, and that fork of
a threaded process hung the test suite on the loader's lock. It is blocked before OpenVINO is imported:
without it OpenVINO uses its own no-op stub.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry, Manifest
from edgekv.targets.common import CompiledGraph, compiled_files, require

INSTALL = "pip install 'edgekv[openvino]'"
NAME = "openvino"


def _openvino():
    sys.modules.setdefault("openvino_telemetry", None)  # None: its import fails (and OpenVINO's stub is used)
    return require("openvino", INSTALL)


def device(core) -> str:
    return "NPU" if "NPU" in core.available_devices else "CPU"


def compile_graph(manifest: Manifest, graph: GraphEntry, out_dir: Path, precision: str) -> CompiledGraph:
    """IR (.xml and .bin) of one graph; every operator's placement as the device's plugin reports it."""
    ov = _openvino()
    core = ov.Core()
    try:
        model = ov.convert_model(str(manifest.directory / graph.file))
    except Exception as e:  # OpenVINO raises its own exception types, one line of which says what failed
        raise EdgekvError(f"OpenVINO could not convert {graph.file}: {str(e).strip().splitlines()[0]}") from None
    xml = out_dir / f"{graph.name}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    target = device(core)
    supported = core.query_model(model, target)
    operators = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Result", "Constant")]
    placement: dict[str, int] = {}
    for op in operators:
        where = "device" if op.get_friendly_name() in supported else "host"
        key = f"{op.get_type_name()}@{where}"
        placement[key] = placement.get(key, 0) + 1
    return CompiledGraph([xml, xml.with_suffix(".bin")], placement, target)


@dataclass
class OpenvinoBackend:
    """Each graph's compiled IR on the device's plugin, with infer requests over the engine's buffers
    (OpenVINO tensors that share the numpy memory: bound once, no copies)."""

    manifest: Manifest
    core: object  # openvino.Core
    device: str
    files: dict[str, list[Path]]  # graph name -> its compiled files, checked against the manifest
    threads: int = 0

    @classmethod
    def open(cls, manifest: Manifest, threads: int = 0) -> "OpenvinoBackend":
        ov = _openvino()
        core = ov.Core()
        # A clear error before anything runs when nothing was compiled or a file changed.
        return cls(manifest, core, device(core), compiled_files(manifest, NAME), threads)

    def bind(self, graph: GraphEntry, inputs: dict[str, np.ndarray],
             outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        ov = _openvino()
        xml = self.files[graph.name][0]
        precision = self.manifest.data["compiled"][NAME]["precision"]
        config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "float32" else "f16"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        request = self.core.compile_model(self.core.read_model(str(xml)), self.device, config).create_infer_request()
        for name, array in (inputs | outputs).items():
            request.set_tensor(name, ov.Tensor(array, shared_memory=True))
        return request.infer  # the bound method keeps the request alive

    def close(self) -> None:
        """Nothing to release here: each infer request lives as long as the engine's bound call."""
