"""The RKNN toolchain's side of edgekv's RKNN target, run by the toolchain's own Python (rknn-toolkit2 pins
numpy, onnx, onnxruntime and torch versions edgekv cannot share). It imports nothing of edgekv: only the
standard library, numpy and rknn.

Protocol: one JSON object per line on stdin, one reply per line on the pipe whose descriptor edgekv
passes as the argument; the toolchain's own logging goes to stdout/stderr, which edgekv sends to a log
file. Tensors never cross
the pipe: each bound graph's inputs and outputs are memory-mapped files both processes open.

Requests: build (an ONNX graph into a .rknn file, with the placement of its operators), open (a graph
for inference: on a board the .rknn through rknn-toolkit-lite2; here the simulator, which only runs a
model built in the same process, so the ONNX graph is built again), run, close.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

# A row of the build log's "Network Layer Information Table": id, operator, dtype, where it runs.
_LAYER_ROW = re.compile(r"\]\s+\d+\s+(\w+)\s+\w+\s+(CPU|NPU)\s")
_ENDPOINTS = ("InputOperator", "OutputOperator")  # the runtime's own copies in and out


def _last_error(log: Path) -> str:
    """The toolchain's last error line ('E ...', colour codes removed)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if line.startswith("E ")]
    return errors[-1][2:] if errors else (lines[-1] if lines else "no message")


def _placement(log: Path) -> dict[str, int]:
    """'<operator>@device' (NPU) or '<operator>@host' (CPU) -> count, from the build's layer table."""
    text = log.read_text(errors="replace")
    table = text[text.rfind("Network Layer Information Table"):]
    counts: dict[str, int] = {}
    for op, target in _LAYER_ROW.findall(table):
        if op not in _ENDPOINTS:
            key = f"{op}@{'device' if target == 'NPU' else 'host'}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _build(onnx: str, platform: str):
    """An RKNN object holding the graph built for `platform` in float16 (no quantization), and its log.
    The toolkit's native code prints the layer table to the process's stdout, so fds 1 and 2 go to the
    log during the build."""
    from rknn.api import RKNN

    fd, name = tempfile.mkstemp(prefix="rknn-build-", suffix=".log", dir=".")  # the worker's own directory
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        rknn = RKNN(verbose=True)
        rknn.config(target_platform=platform)
        ok = rknn.load_onnx(model=onnx) == 0 and rknn.build(do_quantization=False) == 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for target, copy in zip((1, 2), saved):
            os.dup2(copy, target)
            os.close(copy)
        os.close(fd)
    return rknn, Path(name), ok


def _mapped(specs: list[dict]) -> list[np.ndarray]:
    return [np.memmap(s["file"], dtype=s["dtype"], mode="r+", shape=tuple(s["shape"])) for s in specs]


def serve(requests, replies) -> None:
    graphs: dict[str, tuple] = {}  # name -> (runtime, inputs, outputs)
    for line in requests:
        request = json.loads(line)
        op = request["op"]
        reply: dict = {"ok": True}
        try:
            if op == "build":
                rknn, log, ok = _build(request["onnx"], request["platform"])
                if ok and rknn.export_rknn(request["rknn"]) == 0:
                    reply["placement"] = _placement(log)
                else:
                    reply = {"ok": False, "error": _last_error(log)}
                rknn.release()
                log.unlink()
            elif op == "open":
                try:
                    from rknnlite.api import RKNNLite  # on a board
                    runtime = RKNNLite()
                    ok = runtime.load_rknn(request["rknn"]) == 0 and runtime.init_runtime() == 0
                    log = None
                except ImportError:  # here: the simulator
                    runtime, log, ok = _build(request["onnx"], request["platform"])
                    ok = ok and runtime.init_runtime() == 0
                if not ok:
                    reply = {"ok": False, "error": _last_error(log) if log else "rknn-toolkit-lite2 failed to load"}
                else:
                    graphs[request["name"]] = (runtime, _mapped(request["inputs"]), _mapped(request["outputs"]))
                if log:
                    log.unlink()
            elif op == "run":
                runtime, inputs, outputs = graphs[request["name"]]
                results = runtime.inference(inputs=[np.asarray(a) for a in inputs], data_format="nchw")
                for out, result in zip(outputs, results):
                    out[...] = result.reshape(out.shape)
            elif op == "close":
                break
            else:
                reply = {"ok": False, "error": f"unknown request {op!r}"}
        except Exception as e:  # the reply carries the error; edgekv raises it
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    for runtime, _, _ in graphs.values():
        runtime.release()


if __name__ == "__main__":
    serve(sys.stdin, os.fdopen(int(sys.argv[1]), "w"))
