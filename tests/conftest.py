"""Shared fixtures. The default model is exported once per test run (session scope)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import save_tiny_model

EDGEKV = str(Path(sys.executable).parent / "edgekv")


def run_edgekv(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `edgekv` console script, as a user would."""
    result = subprocess.run([EDGEKV, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"edgekv {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error a refused command ends with (it must have failed)."""
    assert result.returncode != 0, result.stdout + result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ("llama", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    from edgekv.export.exporter import export_artifact

    root = tmp_path_factory.mktemp("tiny-artifacts")
    return {arch: export_artifact(str(path), "npu-small", root / arch, progress=lambda _: None).directory
            for arch, path in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory) -> Path:
    """The default model exported for npu-small through the CLI, exactly as the README's main command."""
    out = tmp_path_factory.mktemp("default") / "smollm2-npu-small"
    run_edgekv("export", "--profile", "npu-small", "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def default_model():
    from edgekv.toolkit.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
