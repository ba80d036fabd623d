"""Saved conversations: the token history, every layer's KV cache, and what says which artifact they fit.

One .npz file (numpy's zip of arrays: each member carries a CRC-32, so a damaged file fails to load
rather than loading wrong values): `meta` (JSON), `tokens`, and `k<layer>` / `v<layer>`. Saving writes
a temporary file beside the target and renames it over the target, so a crash mid-save leaves the old
file intact. Loading reads and checks everything before the caller touches its conversation.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import edgekv
from edgekv.core.errors import EdgekvError
from edgekv.core.hashing import file_sha256
from edgekv.core.manifest import ARTIFACT_FORMAT_VERSION, MANIFEST_NAME, Manifest
from edgekv.runtime.conversation import Conversation
from edgekv.runtime.sampling import Sampler, SamplingConfig

SESSION_FORMAT = "edgekv-session"
SESSION_FORMAT_VERSION = 1


def artifact_identity(manifest: Manifest) -> dict:
    """What a saved KV cache depends on: the model, the profile and the exact artifact."""
    return {"model": manifest.model["name"], "model_sha256": manifest.model["source_sha256"],
            "profile": manifest.profile.name, "artifact_format": ARTIFACT_FORMAT_VERSION,
            "manifest_sha256": file_sha256(manifest.directory / MANIFEST_NAME)}


@dataclass
class SavedSession:
    meta: dict
    tokens: list[int]
    kv: list[tuple[np.ndarray, np.ndarray]]


def save_session(path: Path, conversation: Conversation) -> int:
    """Write the conversation to `path` atomically; returns the file size in bytes."""
    engine = conversation.engine
    meta = {"format": SESSION_FORMAT, "version": SESSION_FORMAT_VERSION, "edgekv": edgekv.__version__,
            "artifact": artifact_identity(engine.manifest), "system": conversation.system,
            "messages": conversation.messages, "turns": conversation.turns,
            "generated_tokens": conversation.generated_tokens, "sampling": asdict(conversation.sampling),
            "rng_state": conversation.sampler.rng.bit_generator.state}
    arrays = {"meta": np.array(json.dumps(meta)), "tokens": np.array(engine.tokens, dtype=np.int64)}
    for layer, (keys, values) in enumerate(engine.kv_snapshot()):
        arrays[f"k{layer}"], arrays[f"v{layer}"] = keys, values
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(staging, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except OSError as e:
        raise EdgekvError(f"cannot save the session to {path} ({e.strerror}); choose a writable path") from None
    finally:
        staging.unlink(missing_ok=True)
    return path.stat().st_size


def load_session(path: Path, manifest: Manifest) -> SavedSession:
    """Read and check a saved session against the artifact in use; raises EdgekvError on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise EdgekvError(f"no session file at {path}")
    layers = manifest.model["layers"]
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != SESSION_FORMAT:
                raise ValueError("not an edgekv session")
            tokens = data["tokens"].tolist()
            kv = [(data[f"k{layer}"], data[f"v{layer}"]) if f"k{layer}" in data else None for layer in range(layers)]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise EdgekvError(f"session file {path} does not load ({e}); it is damaged or not an edgekv session") from None
    if meta["version"] != SESSION_FORMAT_VERSION:
        raise EdgekvError(f"session file {path} has format {meta['version']}; this edgekv reads "
                          f"{SESSION_FORMAT_VERSION}")
    saved, ours = meta["artifact"], artifact_identity(manifest)
    if saved != ours:
        differ = [key for key in ours if saved.get(key) != ours[key]]
        raise EdgekvError(f"session file {path} was saved with another artifact ({', '.join(differ)} differ: saved "
                          f"{saved['model']} for {saved['profile']}); load it with the artifact it was saved with")
    kv_heads, head_dim = manifest.model["kv_heads"], manifest.model["head_dim"]
    if any(pair is None or pair[0].shape != (kv_heads, len(tokens), head_dim) or pair[1].shape != pair[0].shape
           for pair in kv):
        raise EdgekvError(f"session file {path} is damaged: its KV cache does not match its {len(tokens)} tokens")
    return SavedSession(meta, tokens, kv)


def apply_session(saved: SavedSession, conversation: Conversation) -> None:
    """Make `conversation` continue exactly where the saved one stopped (cache, history, sampler state)."""
    conversation.engine.restore(saved.tokens, saved.kv)
    meta = saved.meta
    conversation.system = meta["system"]
    conversation.messages = meta["messages"]
    conversation.turns, conversation.generated_tokens = meta["turns"], meta["generated_tokens"]
    conversation.sampling = SamplingConfig(**meta["sampling"])
    conversation.sampler = Sampler(conversation.sampling)
    conversation.sampler.rng.bit_generator.state = meta["rng_state"]
