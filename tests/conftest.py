"""Shared fixtures. The default model is exported once per test run: the suite runs in two pytest-xdist
workers (pyproject's addopts), and an export both need is made by the first to ask, under a file lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from tiny_models import save_tiny_model

EDGEKV = str(Path(sys.executable).parent / "edgekv")


def run_edgekv(*args: str, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed `edgekv` console script, as a user would (`env`: variables set on top of ours)."""
    result = subprocess.run([EDGEKV, *args], capture_output=True, text=True,
                            env=None if env is None else os.environ | env)
    if check and result.returncode != 0:
        raise AssertionError(f"edgekv {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def gather_pages(pool, layer: int, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pages [kv_heads, k] (per KV head) of a TieredPool fetched and copied out as the graphs read them: keys
    and values [kv_heads, k * page_size, head_dim]."""
    heads, k = pages.shape
    pool.fetch(layer, pages)
    k_out = np.zeros((heads, k, pool.page_size, pool.head_dim), np.float32)
    v_out = np.zeros_like(k_out)
    pool.copy(layer, pages.ravel(), np.repeat(np.arange(heads), k), k_out, v_out, np.tile(np.arange(k), heads))
    return k_out.reshape(heads, -1, pool.head_dim), v_out.reshape(heads, -1, pool.head_dim)


def greedy_logits(artifact: Path, prompt: list[int], steps: int = 6, backend: str = "cpu") -> np.ndarray:
    """The logits of a `quest` prefill of `prompt` and of `steps` greedy decode steps after it."""
    from edgekv.runtime.engine import Engine
    from edgekv.targets.registry import BACKENDS

    engine = Engine.open(artifact, "quest", backend=BACKENDS[backend])
    try:
        logits = [engine.prefill(prompt)]
        for _ in range(steps):
            logits.append(engine.decode(int(np.argmax(logits[-1]))))
        return np.stack(logits)
    finally:
        engine.close()


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


def export_once(tmp_path_factory, name: str, *export_args: str) -> Path:
    """`edgekv export ... --out DIR` run once per test run, whichever worker asks first; the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's directory, which every worker's basetemp sits in
    out = root / "exports" / name
    out.parent.mkdir(exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not (out / "manifest.json").exists():
            run_edgekv("export", *export_args, "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory) -> Path:
    """The default model exported for npu-small through the CLI, exactly as the README's main command."""
    return export_once(tmp_path_factory, "smollm2-npu-small", "--profile", "npu-small")


@pytest.fixture(scope="session")
def default_model():
    from edgekv.core.constants import DEFAULT_MODEL
    from edgekv.export.models import load_model

    return load_model(DEFAULT_MODEL)
