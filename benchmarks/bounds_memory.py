"""Quest's page bounds in host RAM at long contexts: both sets kept for every page, against the far pages'
own-position set dropped (PageBounds.drop_before), under each far position scheme.

The bounds are the cache's one metadata that grows with the context and stays in RAM (every decode step
scores every page on them). This replays what the paged cache does to them, chunk by chunk, with the
real PageBounds and FarPositions and the artifact's model shape and profile, without running the model:
the bytes of the arrays are the same as the engine's (CacheUsage.bounds_bytes).

Usage: .venv/bin/python benchmarks/bounds_memory.py [ARTIFACT_DIR] [--contexts 32768,65536,131072]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.manifest import default_artifact_dir, read_manifest
from edgekv.runtime.page_bounds import PageBounds
from edgekv.runtime.positions import FarPositions

MIB = 2 ** 20


def bounds_bytes(tokens: int, scheme: str, drop: bool, kv_heads: int, head_dim: int, trained: int, chunk: int,
                 page_size: int) -> int:
    """One layer's bounds after a prefill of `tokens` in chunks (LayerPages.append, PagedCache.begin)."""
    far_positions = FarPositions.for_model(scheme, trained, chunk)
    own, far = PageBounds(kv_heads, head_dim), PageBounds(kv_heads, head_dim)
    for start in range(0, tokens, chunk):
        boundary = far_positions.far(start, page_size)
        if drop and boundary is not None:
            own.drop_before(boundary.pages)
        for page in range(start // page_size, min(start + chunk, tokens) // page_size):
            for bounds in (own, far):
                bounds.add_page(page)
                bounds.seal(page)
    return own.full.nbytes + far.full.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, nargs="?", default=default_artifact_dir(DEFAULT_MODEL, "npu-small"))
    parser.add_argument("--contexts", default="32768,65536,131072")
    args = parser.parse_args()
    manifest = read_manifest(args.artifact)
    model, profile = manifest.model, manifest.profile
    shape = (model["kv_heads"], model["head_dim"], model["max_context"], profile.prefill_chunk, profile.page_size)
    print(f"{model['layers']} layers, {model['kv_heads']} KV heads of {model['head_dim']}, {profile.page_size}-token "
          f"pages, trained on {model['max_context']} tokens")
    for tokens in (int(c) for c in args.contexts.split(",")):
        for scheme in ("clamped", "folded", "grouped"):
            both, dropped = (model["layers"] * bounds_bytes(tokens, scheme, drop, *shape) / MIB
                             for drop in (False, True))
            print(f"{tokens:>7} tokens, {scheme:<7}: both sets {both:4.0f} MiB, far pages' own set dropped "
                  f"{dropped:4.0f} MiB ({dropped / both:.2f}x)")


if __name__ == "__main__":
    main()
