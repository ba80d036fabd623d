"""File identity: sha256, computed once per state of a file.

Every loader checks an artifact's files against the sha256 its manifest recorded, and the default
artifact is over 500 MiB. A file's digest is kept with its stat stamp (size, modification and change
times, inode) in a cache file, as git's index keeps them, and recomputed only when the stamp changed:
writing to a file changes its stamp, so a modified file is hashed again and refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

VERIFIED_FILES = "verified-files.json"  # in cache_dir(): path -> [stamp..., sha256]
# A file changed this recently may change again within the same timestamp tick: its digest is not kept.
SETTLED_NS = 2_000_000_000


def cache_dir() -> Path:
    """Where edgekv caches converted models and file digests: $EDGEKV_CACHE_DIR, else ~/.cache/edgekv."""
    root = os.environ.get("EDGEKV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgekv")
    return Path(root)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def cached_sha256s(paths: list[Path]) -> dict[Path, str]:
    """file_sha256 of each path (existing files), read from the digest cache where the file's stamp is the
    one recorded, else computed and recorded."""
    cache_path = cache_dir() / VERIFIED_FILES
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, changed = {}, False
    for path in paths:
        key = str(Path(path).resolve())
        stamp = _stamp(os.stat(key))
        entry = cache.get(key)
        if isinstance(entry, list) and entry[:-1] == stamp:
            digests[path] = entry[-1]
        else:
            digests[path] = file_sha256(Path(key))
            if time.time_ns() - max(stamp[1], stamp[2]) > SETTLED_NS:
                cache[key] = stamp + [digests[path]]
                changed = True
    if changed:
        _write_cache(cache_path, cache)
    return digests


def _write_cache(cache_path: Path, cache: dict) -> None:
    """Replace the cache file atomically, without the entries of files that are gone (a failure to write
    only costs a later run the hashing)."""
    live = {key: entry for key, entry in cache.items() if os.path.exists(key)}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(live))
        os.replace(staging, cache_path)
    except OSError:
        pass
