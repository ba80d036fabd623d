"""Rockchip RK3588 (RKNN) through rknn-toolkit2: .rknn models compiled ahead of time, and a backend that
runs them (rknn-toolkit2's simulator here, rknn-toolkit-lite2 on a board).

rknn-toolkit2 pins numpy 1.26, onnx 1.18, onnxruntime 1.26 and torch<=2.4, so it lives in its own
environment (`edgekv install-rknn`) and edgekv drives it through a worker process (rknn_worker.py) that
speaks JSON lines and shares tensors through memory-mapped files. RKNN runs non-quantized graphs in
float16 only. Each .rknn holds its own copy of its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import venv
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry, Manifest
from edgekv.targets.common import CompiledGraph, CompileGraph, compiled_files, rewritten_graph

NAME = "rknn-rk3588"
BACKEND = "rknn"
PLATFORM = "rk3588"
INSTALL = "edgekv install-rknn"
PYTHON_VARIABLE = "EDGEKV_RKNN_PYTHON"  # a Python that has rknn-toolkit2, instead of the default environment
# rknn-toolkit2 2.5.0 and the versions it was measured with; torch is edgekv's own CPU build instead of
# its pin (torch<=2.4 would pull CUDA wheels), installed without dependencies like the toolkit itself.
TOOLKIT = "rknn-toolkit2==2.5.0"
REQUIREMENTS = ("numpy==1.26.4", "protobuf==4.25.4", "onnx==1.18.0", "onnxruntime==1.26.0",
                "opencv-python-headless==4.11.0.86", "scipy", "ruamel.yaml", "fast-histogram", "tqdm", "psutil",
                "setuptools<70", "typing-extensions", "sympy", "filelock", "jinja2", "networkx", "fsspec")
NO_DEPS = ("torch==2.13.0", TOOLKIT)


def default_environment() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edgekv" / "rknn-toolkit2"


def toolkit_python() -> Path:
    """The Python of RKNN's environment, or a one-line error naming the command that makes it."""
    python = Path(os.environ.get(PYTHON_VARIABLE) or default_environment() / "bin" / "python")
    if not python.exists():
        raise EdgekvError(f"the rknn-toolkit2 toolchain is not installed (no {python}); install it with `{INSTALL}`")
    return python


def installed(python: Path) -> bool:
    """Whether `python` has this rknn-toolkit2 version."""
    version = TOOLKIT.split("==")[1]
    check = [str(python), "-c", "from importlib.metadata import version; print(version('rknn-toolkit2'))"]
    return python.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == version


def install_environment(path: Path, say: Callable[[str], None]) -> Path:
    """Make RKNN's own environment at `path` (a venv) from the package registry, unless it is there
    already; returns its Python."""
    python = path / "bin" / "python"
    if installed(python):
        say(f"{TOOLKIT} is already installed")
        return python
    venv.create(path, with_pip=True, clear=True)
    steps = [("the toolkit's dependencies", list(REQUIREMENTS), []),
             ("torch and rknn-toolkit2", list(NO_DEPS), ["--no-deps"])]
    for what, packages, flags in steps:
        say(f"installing {what} ...")
        result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *flags, *packages],
                                capture_output=True, text=True)
        if result.returncode:
            lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or [""]
            raise EdgekvError(f"installing {what} into {path} failed: {lines[0]}")
    check = subprocess.run([str(python), "-c", "from rknn.api import RKNN"], capture_output=True, text=True)
    if check.returncode:
        raise EdgekvError(f"rknn-toolkit2 does not import in {path}: {check.stderr.strip().splitlines()[-1]}")
    return python


@dataclass
class Worker:
    """The toolchain's process: a request out, a reply back; its own logging in a log file."""

    process: subprocess.Popen
    replies: object  # the read end of the reply pipe
    log: Path  # in the worker's own working directory, removed on close

    @classmethod
    def start(cls) -> "Worker":
        python = toolkit_python()
        read_fd, write_fd = os.pipe()
        # Its own working directory: the toolkit writes check*.onnx files into the current one at every build.
        directory = Path(tempfile.mkdtemp(prefix="edgekv-rknn-"))
        log = directory / "worker.log"
        with open(log, "wb") as log_file:
            # -I: the script's folder must not be on the path (this module's name would hide the toolkit's).
            script = Path(__file__).with_name("rknn_worker.py")
            process = subprocess.Popen([str(python), "-I", str(script), str(write_fd)], stdin=subprocess.PIPE,
                                       stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                       pass_fds=(write_fd,), cwd=directory)
        os.close(write_fd)
        return cls(process, os.fdopen(read_fd), log)

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.replies.readline()
        if not line:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise EdgekvError(f"the rknn-toolkit2 worker stopped: {tail[0]} (log: {self.log})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "close"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.replies.close()
        shutil.rmtree(self.log.parent, ignore_errors=True)


def rknn_graph(manifest: Manifest, graph: GraphEntry) -> ContextManager[tuple[Path, "onnx.ModelProto"]]:
    """The graph as RKNN builds it: the output projection per head, so no Reshape runs on its CPU."""
    from edgekv.targets.per_head_output import rewrite_output_projections

    model = manifest.model
    return rewritten_graph(manifest, graph, "per-head-output", lambda proto, base: rewrite_output_projections(
        proto, base, model["q_heads"], model["head_dim"]))


@contextmanager
def compiler() -> Iterator[CompileGraph]:
    """A compile_graph that builds every graph in one toolchain process."""
    worker = Worker.start()
    try:
        def compile_graph(manifest: Manifest, graph: GraphEntry, out_dir: Path, precision: str) -> CompiledGraph:
            if precision != "float16":
                raise EdgekvError(f"RKNN runs non-quantized graphs in float16 only; run `edgekv compile "
                                  f"{manifest.directory} --target {NAME} --precision float16`")
            out = out_dir / f"{graph.name}.rknn"
            with rknn_graph(manifest, graph) as (onnx_path, _):
                reply = worker.request(op="build", onnx=str(onnx_path.resolve()), rknn=str(out.resolve()),
                                       platform=PLATFORM)
            if not reply["ok"]:
                raise EdgekvError(f"RKNN could not compile {graph.file}: {reply['error']}")
            return CompiledGraph([out], reply["placement"], f"{PLATFORM.upper()} NPU")
        yield compile_graph
    finally:
        worker.close()


def _shared(directory: Path, graph: str, specs) -> tuple[list[dict], list[np.ndarray]]:
    """A memory-mapped file per tensor spec (in graph order) and the host's view of each."""
    described, views = [], []
    for spec in specs:
        path = directory / f"{graph}.{spec.name}"
        views.append(np.memmap(path, dtype=spec.dtype, mode="w+", shape=tuple(spec.shape)))
        described.append({"file": str(path), "dtype": spec.dtype, "shape": list(spec.shape)})
    return described, views


@dataclass
class RknnBackend:
    """Each graph on the RKNN runtime in the worker; a call copies the engine's inputs into the shared
    files, runs, and copies the outputs back (the simulator copies its inputs anyway)."""

    manifest: Manifest
    worker: Worker
    files: dict[str, list[Path]]
    directory: Path  # the shared tensor files (in memory where /dev/shm exists)

    @classmethod
    def open(cls, manifest: Manifest, threads: int = 0) -> "RknnBackend":
        files = compiled_files(manifest, NAME)  # a clear error before the worker starts when nothing was compiled
        worker = Worker.start()  # first: a missing toolchain then leaves no directory behind
        shm = Path("/dev/shm")
        directory = Path(tempfile.mkdtemp(prefix="edgekv-rknn-", dir=shm if shm.is_dir() else None))
        return cls(manifest, worker, files, directory)

    def bind(self, graph: GraphEntry, inputs: dict[str, np.ndarray],
             outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        in_specs, in_views = _shared(self.directory, graph.name, graph.inputs)
        out_specs, out_views = _shared(self.directory, graph.name, graph.outputs)
        with rknn_graph(self.manifest, graph) as (onnx_path, _):  # the simulator builds it from ONNX
            reply = self.worker.request(op="open", name=graph.name, onnx=str(onnx_path.resolve()),
                                        rknn=str(self.files[graph.name][0]), platform=PLATFORM,
                                        inputs=in_specs, outputs=out_specs)
        if not reply["ok"]:
            raise EdgekvError(f"RKNN could not load {graph.name}: {reply['error']}")
        pairs_in = [(view, inputs[spec.name]) for view, spec in zip(in_views, graph.inputs)]
        pairs_out = [(outputs[spec.name], view) for view, spec in zip(out_views, graph.outputs)]
        worker, name = self.worker, graph.name

        def run() -> None:
            for dst, src in pairs_in:
                dst[...] = src
            reply = worker.request(op="run", name=name)
            if not reply["ok"]:
                raise EdgekvError(f"RKNN failed to run {name}: {reply['error']}")
            for dst, src in pairs_out:
                dst[...] = src
        return run

    def close(self) -> None:
        self.worker.close()
        shutil.rmtree(self.directory, ignore_errors=True)
