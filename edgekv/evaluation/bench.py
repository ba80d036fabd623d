"""`edgekv bench`: decode and prefill speed of each policy as the context grows, measured and projected.

Each policy runs in its own child process (so its peak memory is its own). Its engine is prefilled with
seeded random tokens up to each context in turn (speed does not depend on the text; an untimed prompt
past the prefill budget before the first), then decodes WARMUP_TOKENS untimed and `steps` timed tokens;
the median step gives decode tokens/s. Every row also carries the profile-device projection of the same step
(evaluation/projection.py).
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekv.evaluation.plots import new_axes, save_figure
from edgekv.evaluation.projection import project_decode
from edgekv.runtime.backend import BackendFactory, OnnxruntimeBackend
from edgekv.runtime.engine import Engine
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S

WARMUP_TOKENS = 4
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384)
DENSE_HEADROOM = WARMUP_TOKENS + 64  # the dense baseline's largest point leaves room for the decoded tokens


@dataclass
class BenchRow:
    policy: str
    context: int
    prefill_tok_s: float
    ttft_s: float  # the prefill of this point's new tokens up to the first sampled token
    decode_step_ms: float  # median
    decode_tok_s: float
    reading_speed_ratio: float
    peak_rss_mib: float
    kv_bytes: dict[str, int]  # per tier
    transfer_bytes_per_token: float
    graph_share: float
    select_share: float
    gather_share: float
    projected: dict  # Projection.to_dict(): the profile's device, not a measurement


def usable_context(context: int, policy: str, max_context: int) -> int | None:
    """The context a policy is measured at (dense stops short of its static size), or None to skip."""
    if policy != "dense":
        return context
    if context + DENSE_HEADROOM <= max_context:
        return context
    return max_context - DENSE_HEADROOM if context <= max_context else None


def measure_policy(artifact: str, policy: str, contexts: list[int], steps: int, kv_dtype: str | None = None,
                   backend: BackendFactory = OnnxruntimeBackend.open, positions: str | None = None) -> list[dict]:
    engine = Engine.open(artifact, policy, kv_dtype=kv_dtype, positions=positions, backend=backend)
    rng = np.random.default_rng(0)
    rows = []
    try:
        vocab = engine.manifest.model["vocab"]
        # One untimed prompt first: the first graph calls and compiled kernels' loads (their compilation, in
        # a fresh clone) would otherwise count in the first point's prefill rate. About twice the prefill
        # budget, so that page selection runs (and compiles) in prefill and decode; inside dense's context.
        warmup = min(2 * engine.manifest.profile.prefill_budget, engine.manifest.model["max_context"])
        engine.prefill(rng.integers(vocab // 8, vocab, warmup - DENSE_HEADROOM).tolist())
        engine.reset()
        for requested in contexts:
            context = usable_context(requested, policy, engine.manifest.model["max_context"])
            if context is None or context < len(engine.tokens):
                print(f"  {policy:<9} {requested:>6}: skipped (the dense baseline's static context is "
                      f"{engine.manifest.model['max_context']})", file=sys.stderr, flush=True)
                continue
            fill = context - len(engine.tokens)
            start = time.perf_counter()
            logits = engine.prefill(rng.integers(vocab // 8, vocab, fill).tolist())  # clear of special tokens
            ttft = time.perf_counter() - start
            token = int(np.argmax(logits))
            for _ in range(WARMUP_TOKENS):
                token = int(np.argmax(engine.decode(token)))
            engine.timers.reset()
            transfer_before = engine.cache.usage().transfer_bytes
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                token = int(np.argmax(engine.decode(token)))
                times.append(time.perf_counter() - start)
            step = float(np.median(times))
            total = sum(times)
            usage = engine.cache.usage()
            transfer = (usage.transfer_bytes - transfer_before) / steps
            host_s = (engine.timers.select_s + engine.timers.gather_s) / steps
            row = BenchRow(
                policy, context, fill / ttft, ttft, 1e3 * step, 1 / step, 1 / step / READING_SPEED_TOKENS_PER_S,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                usage.kv_bytes, transfer,
                engine.timers.graph_s / total, engine.timers.select_s / total, engine.timers.gather_s / total,
                project_decode(engine.manifest, policy, transfer, host_s).to_dict())
            rows.append(asdict(row))
            print(f"  {policy:<9} {context:>6} tokens: decode {row.decode_tok_s:6.2f} tok/s "
                  f"({row.reading_speed_ratio:4.1f}x reading), prefill {row.prefill_tok_s:5.0f} tok/s, "
                  f"projected on {engine.manifest.profile.name}: {row.projected['tok_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    finally:
        engine.close()
    return rows


def run_bench(artifact: Path, policies: list[str], contexts: list[int], steps: int, kv_dtype: str | None = None,
              backend: BackendFactory = OnnxruntimeBackend.open, positions: str | None = None) -> list[dict]:
    """Every policy in a fresh child process, one after the other."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for policy in policies:
        print(f"{policy}: contexts {', '.join(map(str, contexts))}", file=sys.stderr, flush=True)
        with spawn.Pool(1) as pool:
            rows += pool.apply(measure_policy, (str(artifact), policy, contexts, steps, kv_dtype, backend, positions))
    return rows


def plot_bench(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = new_axes()
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        line, = ax.plot([r["context"] for r in mine], [r["decode_tok_s"] for r in mine], "o-",
                        label=f"{policy} (measured)")
        ax.plot([r["context"] for r in mine], [r["projected"]["tok_s"] for r in mine], "s--",
                color=line.get_color(), alpha=0.6, label=f"{policy} (projected on device)")
    ax.axhline(READING_SPEED_TOKENS_PER_S, color="gray", linestyle=":",
               label=f"human reading speed ({READING_SPEED_TOKENS_PER_S} tok/s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    save_figure(fig, ax, path, title, legend_size=8)
