"""Artifact files are hashed once per state: an unchanged file's digest comes from the cache, a written one
is hashed again and refused before anything runs it."""

import json
import os
import shutil
import time

import pytest

from edgekv.core import hashing
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import load_verified
from edgekv.runtime.engine import Engine


def test_a_cached_digest_never_hides_a_modified_file(tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKV_CACHE_DIR", str(tmp_path / "cache"))
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifacts["llama"], artifact)
    time.sleep(hashing.SETTLED_NS / 1e9 + 0.1)  # files this fresh are hashed but not cached
    load_verified(artifact)
    cached = json.loads((tmp_path / "cache" / hashing.VERIFIED_FILES).read_text())
    victim = artifact / "graphs" / "layer01.s1.b512.onnx"
    assert str(victim.resolve()) in cached and len(cached) == len(load_verified(artifact).data["files"])

    hashed = []
    monkeypatch.setattr(hashing, "file_sha256", lambda path: hashed.append(path) or "")
    load_verified(artifact)  # every digest from the cache
    assert hashed == []
    monkeypatch.undo()
    monkeypatch.setenv("EDGEKV_CACHE_DIR", str(tmp_path / "cache"))

    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old modification time
    with pytest.raises(EdgekvError, match="graphs/layer01.s1.b512.onnx: sha256 differs"):
        Engine.open(artifact, "quest")
