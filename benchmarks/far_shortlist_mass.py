"""rerank's attention mass over a decode shortlist of far keys (issue 21): numpy after a rotated copy
against the compiled kernel that rotates each far key as it reads it, and the same kernel on unrotated keys.

A pool of SmolLM2's shape (3 KV heads, head_dim 64, 8-token pages) holds PAGES pages of random keys;
the first 3000 are far pages under the clamped scheme. Each timing is the median of ROUNDS calls, the
three ways interleaved.

Usage: .venv/bin/python benchmarks/far_shortlist_mass.py [--shortlists 248,1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekv.runtime.kernels.attention import attention_mass, record_page_mass
from edgekv.runtime.kernels.rotation import NO_TABLE
from edgekv.runtime.paged_cache import FarKeys, LayerPages
from edgekv.runtime.positions import FarPages
from edgekv.runtime.rope import KeyShifter, Rope
from edgekv.runtime.tiers import LayerKeys, TieredPool

KV_HEADS, HEAD_DIM, PAGE, GROUPS = 3, 64, 8, 3
PAGES, FAR_PAGES, ROUNDS = 4096, 3000, 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shortlists", default="248,1024")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        page_bytes = 2 * KV_HEADS * PAGE * HEAD_DIM * 4
        pool = TieredPool(1, KV_HEADS, HEAD_DIM, PAGE, 64 * page_bytes, 2 * PAGES * page_bytes,
                          Path(work) / "spill.bin", "float32")
        keys = rng.normal(size=(KV_HEADS, PAGES * PAGE, HEAD_DIM)).astype(np.float32)
        LayerPages(0, pool).append(keys, keys)
        rope = Rope(1.0 / 100000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM), 1.0)
        plain = LayerKeys(pool, 0)
        far = FarKeys(plain, FarPages(FAR_PAGES, FAR_PAGES * PAGE - 1, 1), KeyShifter(rope))
        rows = rng.normal(size=(KV_HEADS, GROUPS, HEAD_DIM)).astype(np.float32)
        local = far.read(np.array([[0, PAGES - 1]] * KV_HEADS)).reshape(KV_HEADS, -1, HEAD_DIM)
        local_positions = np.concatenate([np.arange(PAGE), (PAGES - 1) * PAGE + np.arange(PAGE)])
        row_positions = np.array([(PAGES - 1) * PAGE + 3])
        visible = np.broadcast_to(local_positions <= row_positions[0], (GROUPS, 2 * PAGE))
        for shortlist in (int(n) for n in args.shortlists.split(",")):
            candidates = np.stack([rng.permutation(np.arange(1, FAR_PAGES))[:shortlist] for _ in range(KV_HEADS)])
            mass = np.empty(candidates.shape, np.float32)

            def numpy_copy():
                return attention_mass(rows, far.read(candidates), local, visible)

            def compiled_rotated():
                record_page_mass(rows, *far.records(candidates), PAGE, local, local_positions, row_positions,
                                 *far.shifts(candidates), mass)

            def compiled_unrotated():
                record_page_mass(rows, *plain.records(candidates), PAGE, local, local_positions, row_positions,
                                 None, NO_TABLE, NO_TABLE, mass)

            compiled_rotated()
            np.testing.assert_allclose(mass, numpy_copy(), rtol=1e-3, atol=1e-6)
            ways = (numpy_copy, compiled_rotated, compiled_unrotated)
            times = {way.__name__: [] for way in ways}
            for _ in range(ROUNDS):
                for way in ways:
                    start = time.perf_counter()
                    way()
                    times[way.__name__].append(time.perf_counter() - start)
            medians = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
            print(f"shortlist {shortlist} pages a head: " + ", ".join(f"{n} {m:.3f} ms" for n, m in medians.items())
                  + f"; numpy / compiled rotated {medians['numpy_copy'] / medians['compiled_rotated']:.1f}x",
                  flush=True)


if __name__ == "__main__":
    main()
