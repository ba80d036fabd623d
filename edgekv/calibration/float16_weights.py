"""float16 weights: every weight of the graphs (and the host's embedding table) stored in float16, half
the bytes of the float32 artifact, which is how RKNN and the QNN HTP hold them on the device.

Each weight is read through a Cast to float32, so the graphs compute as the float32 ones do and every
backend runs them: onnxruntime and the vendor compilers fold the Cast of a constant, and a device that
computes in float16 (`edgekv compile --precision float16`) then holds the weight as stored. The only
change from the float32 artifact is float16's rounding of each weight. With tied embeddings the LM head
multiplies the very tensor the host looks embeddings up in, stored once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekv.core.manifest import Manifest
from edgekv.export.weights import INLINE_MAX_BYTES, WeightWriter

FLOAT16_SUFFIX = "_float16"


def float16_weights(model: onnx.ModelProto) -> None:
    """In place: every float32 initializer of a weight's size becomes float16, read through a Cast node
    that gives the graph its float32 tensor under the original name."""
    graph = model.graph
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if array.nbytes < INLINE_MAX_BYTES:
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), name + FLOAT16_SUFFIX))
        casts.append(helper.make_node("Cast", [name + FLOAT16_SUFFIX], [name], to=onnx.TensorProto.FLOAT,
                                      name=f"{name}/to_float32"))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def convert_float16_weights(source: Manifest, float_dir: Path, staging: Path, writer: WeightWriter,
                            progress: Callable[[str], None]) -> tuple[dict, dict]:
    """The float16-weight graphs of every graph of the float32 artifact in float_dir."""
    graphs = {}
    entries = list(source.graphs.values())
    for i, entry in enumerate(entries):
        model = onnx.load(float_dir / entry.file)
        float16_weights(model)
        graphs[entry.name] = {**source.data["graphs"][entry.name], "weights": writer.save(model, staging / entry.file)}
        if (i + 1) % 20 == 0 or i + 1 == len(entries):
            progress(f"converted {i + 1}/{len(entries)} graphs to float16 weights")
    return graphs, {"format": "float16 weights", "weights": "float16, each read through a Cast to float32",
                    "activations": "float32"}
