"""What every target shares: importing its toolchain, the compiled graphs' record in the manifest, and
`edgekv compile`'s loop over an artifact's graphs.

Compiled graphs live in `<artifact>/compiled/<target>/`; the manifest records them under
`compiled.<target>` (the files of each graph, the device, and where each graph's operators run), and
their sha256 with every other file's, so a compiled file that no longer matches is refused on load.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import COMPILED_SUBDIR, GraphEntry, Manifest, read_manifest, verify_files, write_manifest


@dataclass
class CompiledGraph:
    files: list[Path]  # what the target runs, the first being the one it opens
    placement: dict[str, int]  # "<operator>@device" or "<operator>@host" -> how many
    device: str  # where it was compiled for

    @property
    def host_operators(self) -> dict[str, int]:
        return {key.split("@")[0]: n for key, n in self.placement.items() if key.endswith("@host")}


def require(module: str, install: str):
    """The toolchain's module, or a one-line error naming the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgekvError(f"the {module} toolchain is not installed; install it with `{install}`") from None


def compiled_files(manifest: Manifest, target: str) -> dict[str, list[Path]]:
    """Per graph name, the compiled files of `target` (verified with the artifact), or a clear error."""
    record = manifest.data.get("compiled", {}).get(target)
    if record is None:
        raise EdgekvError(f"{manifest.directory} has no graphs compiled for {target}; run "
                          f"`edgekv compile {manifest.directory} --target {target}`")
    return {name: [manifest.directory / f for f in entry["files"]] for name, entry in record["graphs"].items()}


@contextmanager
def rewritten_graph(manifest: Manifest, graph: GraphEntry, tag: str,
                    rewrite: Callable[["onnx.ModelProto", Path], object] | None) -> Iterator[tuple[Path, "onnx.ModelProto"]]:
    """The graph's ONNX file for a toolchain, with its model: rewritten by rewrite(model, graph_dir) into a
    file of its own beside the original (its weights stay external, at paths relative to that directory)
    that is removed afterwards; the original when rewrite is None."""
    import onnx  # here: running a compiled artifact does not need onnx

    original = manifest.directory / graph.file
    model = onnx.load(str(original), load_external_data=False)
    if rewrite is None:
        yield original, model
        return
    rewrite(model, original.parent)
    handle, name = tempfile.mkstemp(prefix=f".{original.stem}.", suffix=f".{tag}.onnx", dir=original.parent)
    os.close(handle)
    path = Path(name)
    try:
        onnx.save(model, name)
        yield path, model
    finally:
        path.unlink(missing_ok=True)


CompileGraph = Callable[[Manifest, GraphEntry, Path, str], CompiledGraph]  # (manifest, graph, out_dir, precision)
PRECISIONS = ("float32", "float16")


def compile_artifact(artifact: Path, target: str, compile_graph: CompileGraph, precision: str = "float32",
                     step: Callable[[str, int, int], None] | None = None) -> dict[str, CompiledGraph]:
    """Compile every graph of the artifact with the target's toolchain into compiled/<target>/, to run in
    `precision` (float32 or float16), and record them in the manifest. A graph the toolchain rejects stops
    the compile, naming the graph; the target's earlier compile, if any, stays as it was until every graph
    compiled (the new one is staged)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    out_dir = artifact / COMPILED_SUBDIR / target
    # The target's own files are about to be replaced: a half-finished earlier compile must not block it.
    problems = [p for p in verify_files(manifest) if not p.startswith(f"{COMPILED_SUBDIR}/{target}/")]
    if problems:
        raise EdgekvError(f"{artifact} does not match its manifest ({problems[0]}); re-export it with `edgekv export`")
    staging = out_dir.with_name(f"{target}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    graphs = list(manifest.graphs.values())
    compiled: dict[str, CompiledGraph] = {}
    try:
        for i, graph in enumerate(graphs):
            if step:
                step(graph.name, i, len(graphs))
            compiled[graph.name] = compile_graph(manifest, graph, staging, precision)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if step:
        step("done", len(graphs), len(graphs))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    for graph in compiled.values():
        graph.files = [out_dir / path.name for path in graph.files]
    data = dict(manifest.data)
    data["compiled"] = {**data.get("compiled", {}), target: {
        "device": next(iter(compiled.values())).device, "precision": precision,
        "graphs": {name: {"files": [str(f.relative_to(artifact)) for f in c.files], "placement": c.placement}
                   for name, c in compiled.items()}}}
    write_manifest(artifact, data)
    return compiled
