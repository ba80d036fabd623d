"""The artifact manifest: what an export directory holds, and the checks every loader runs first."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgekv
from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.errors import EdgekvError
from edgekv.core.hashing import cached_sha256s, file_sha256
from edgekv.core.profiles import Profile, profile_from_dict

MANIFEST_NAME = "manifest.json"
# Version of the artifact layout (manifest.json and the graph interface). Bump it whenever a
# graph's inputs/outputs or the manifest's meaning change; loaders refuse other versions.
ARTIFACT_FORMAT_VERSION = 3  # 2: embedding and RoPE's cos/sin on the host, no input above 3-D; 3: q/k rotated on the host
COMPILED_SUBDIR = "compiled"  # graphs compiled by a vendor toolchain: compiled/<target>/ (edgekv/targets)
ARTIFACTS_DIR = "artifacts"  # where exports go by default, relative to the working directory


def default_artifact_dir(model_name: str, profile_name: str, weight_dtype: str = "float32") -> Path:
    suffix = "" if weight_dtype == "float32" else f"-{weight_dtype}"
    return Path(ARTIFACTS_DIR) / f"{model_name}-{profile_name}{suffix}"


def artifact_dir(directory: Path | str | None) -> Path:
    """DIR, or the default export (the default model for npu-small); a missing default says which command
    makes it."""
    if directory is not None:
        return Path(directory)
    default = default_artifact_dir(DEFAULT_MODEL, "npu-small")
    if not default.exists():
        raise EdgekvError(f"no artifact at {default}; create it with `edgekv export --profile npu-small` "
                          "or pass an artifact directory")
    return default


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class GraphEntry:
    name: str
    file: str  # relative to the artifact directory
    kind: str  # qkv | layer | head
    layer: int  # the layer whose attention runs in it (-1 for qkv)
    seq_len: int
    budget: int  # KV slots the graph attends over (0 for qkv)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: tuple[str, ...]  # names of the shared weight tensors the graph uses

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphEntry":
        return cls(d["name"], d["file"], d["kind"], d["layer"], d["seq_len"], d["budget"],
                   tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
                   tuple(TensorSpec.from_dict(x) for x in d["outputs"]), tuple(d["weights"]))


@dataclass(frozen=True)
class Manifest:
    directory: Path
    data: dict[str, Any]

    @property
    def profile(self) -> Profile:
        return profile_from_dict(self.data["profile"], f"in {self.directory / MANIFEST_NAME}")

    @property
    def graphs(self) -> dict[str, GraphEntry]:
        return {name: GraphEntry.from_dict(d) for name, d in self.data["graphs"].items()}

    def variant(self, name: str) -> list[GraphEntry]:
        """The L+1 graphs of one step, in call order: budget-decode, budget-prefill, dense-decode, dense-prefill."""
        graphs = self.graphs
        return [graphs[g] for g in self.data["variants"][name]]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    """Hash every file of the artifact into the manifest and write it atomically."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    data["files"] = {str(p.relative_to(directory)): file_sha256(p) for p in files}
    staging = directory / (MANIFEST_NAME + ".tmp")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, directory / MANIFEST_NAME)


def read_manifest(directory: Path | str) -> Manifest:
    """Read and check a manifest's format version; no file hashing (see verify_files)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        # A mistyped artifact name is the usual cause: name the artifacts that stand beside it.
        beside = sorted(p.parent.name for p in directory.parent.glob(f"*/{MANIFEST_NAME}"))
        hint = f"the artifacts in {directory.parent} are {', '.join(beside)}; or " if beside else ""
        raise EdgekvError(f"{directory} is not an edgekv artifact (no {MANIFEST_NAME}); {hint}create one with "
                          "`edgekv export --profile npu-small`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekvError(f"{path} is corrupt ({e}); re-run `edgekv export`") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != ARTIFACT_FORMAT_VERSION:
        raise EdgekvError(f"{directory} has artifact format {version}, this edgekv {edgekv.__version__} reads "
                          f"format {ARTIFACT_FORMAT_VERSION}; re-export it with `edgekv export`")
    return Manifest(directory, data)


def verify_files(manifest: Manifest) -> list[str]:
    """Every file the manifest lists exists with its recorded sha256; returns the problems found."""
    files = {rel: manifest.directory / rel for rel in manifest.data["files"]}
    problems = [f"{rel}: missing" for rel, path in files.items() if not path.is_file()]
    digests = cached_sha256s([path for path in files.values() if path.is_file()])
    problems += [f"{rel}: sha256 differs from the manifest (file modified or corrupt)"
                 for rel, sha in manifest.data["files"].items() if files[rel] in digests and digests[files[rel]] != sha]
    return problems


def load_verified(directory: Path | str) -> Manifest:
    """What every loader calls: the manifest, its format and every file's hash, or a clear error."""
    manifest = read_manifest(directory)
    problems = verify_files(manifest)
    if problems:
        parts = Path(problems[0]).parts
        fix = (f"re-run `edgekv compile {manifest.directory} --target {parts[1]}`" if parts[0] == COMPILED_SUBDIR
               else "re-run `edgekv export`")
        raise EdgekvError(f"artifact {manifest.directory} does not match its manifest: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + f"; {fix}")
    return manifest
