"""Prefill and decode speed of edgekv against its peers: same machine, same prompts, one process tree.

Usage: .venv/bin/python benchmarks/peers.py [--contexts 1024,4096,8128,16384]
       [--systems transformers,optimum,llama.cpp,quest,rerank,dense] [--steps 16] [--rounds 1]
       [--artifact DIR[,DIR...]] [--kv-dtypes float32,int8] [--json FILE] [--plot FILE.png]

Needs the `peers` extra for two of the systems: `.venv/bin/pip install -e '.[peers]'`.

Systems (SmolLM2-135M-Instruct, CPU, greedy, THREADS threads each):
  transformers  PyTorch eager, float32, its dynamic KV cache (the model edgekv.export.models loads)
  optimum       optimum-onnx ORTModelForCausalLM, float32, exported once from the same float32 directory
                and cached in cache_dir()/peers/optimum-<sha>; dynamic KV cache (tensors in, tensors out)
  llama.cpp     llama-cpp-python on the same GGUF file, so with its Q4_1 weights (the others are float32)
  quest, rerank, dense
                edgekv's Engine over ARTIFACT with that policy; dense's static context is 8192, so it skips 16K.
                With several artifacts, each policy runs on each, named "policy WEIGHT_DTYPE"; with several
                --kv-dtypes, on each KV page format too, named "... kv-DTYPE".

Every system gets the same seeded token ids. At each context it starts from an empty cache, prefills the
first `context` ids (timed: prefill tok/s), decodes WARMUP greedy tokens, then `steps` timed greedy
tokens: the median step gives decode tok/s. The peers prefill in PREFILL_CHUNK-token batches (llama.cpp's
default batch; it also bounds the attention scores' memory at 16K), edgekv in its profile's chunk. Each
system runs each context in a child process of its own, one after the other, so no thread pool or memory
of one competes with the next, and each row's peak RSS is that context's alone (llama.cpp's n_ctx fits
that context). The systems of a context run back to back, in alternating order over `--rounds` rounds:
this machine's speed drifts between runs by more than the differences measured, so the table gives each
system's median over the rounds and its ratio to the first system, the median of the per-round ratios.
The 8K point is 8128 tokens so the dense baseline's decoded tokens fit its 8192 slots.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from itertools import product
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np

MODEL = "smollm2-135m-instruct"
ARTIFACT = "artifacts/smollm2-135m-instruct-npu-small"
CONTEXTS = "1024,4096,8128,16384"
SYSTEMS = "transformers,optimum,llama.cpp,quest,rerank,dense"
STEPS = 16
WARMUP = 4  # untimed decode steps after each prefill
WARMUP_PROMPT = 64  # untimed prefill + WARMUP decodes once per system, before any timing
EDGEKV_POLICIES = ("quest", "rerank", "dense")
THREADS = 2  # every system: torch, onnxruntime and llama.cpp threads (this machine has 2 cores)
PREFILL_CHUNK = 512  # tokens per prefill call for the peers (llama.cpp's default n_batch)
SEED = 0
TOKEN_IDS = (100, 40000)  # seeded ids are drawn from [100, 40000)
LABELS = {
    "transformers": "transformers (PyTorch eager, fp32)",
    "optimum": "optimum-onnx ORT (fp32)",
    "llama.cpp": "llama.cpp (GGUF Q4_1)",
    "quest": "edgekv quest",
    "rerank": "edgekv rerank",
    "dense": "edgekv dense (static 8192)",
}


class Transformers:
    """transformers' own forward with its DynamicCache, logits of the last token only (as generate does)."""

    max_context: int | None = None

    def __init__(self) -> None:
        import torch
        import transformers

        from edgekv.export.models import load_model

        torch.set_num_threads(THREADS)
        self.torch, self.model = torch, load_model(MODEL).model
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}, " \
                       f"attention {self.model.config._attn_implementation}"

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def _step(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    def prefill(self, tokens: list[int]) -> int:
        return [self._step(tokens[i:i + PREFILL_CHUNK]) for i in range(0, len(tokens), PREFILL_CHUNK)][-1]

    def decode(self, token: int) -> int:
        return self._step([token])


def optimum_export(source_sha: str, hf_dir: Path) -> Path:
    """Export the float32 HF directory with optimum once; cached under edgekv's cache directory."""
    from optimum.onnxruntime import ORTModelForCausalLM

    from edgekv.core.hashing import cache_dir

    target = cache_dir() / "peers" / f"optimum-{source_sha[:24]}"
    if not (target / "model.onnx").is_file():
        print(f"optimum: exporting {hf_dir} to ONNX once (cached in {target})", flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".exporting-", dir=target.parent))
        try:
            ORTModelForCausalLM.from_pretrained(hf_dir, export=True, use_cache=True).save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


class Optimum:
    """ORTModelForCausalLM's forward: the past K/V go in and come back as new, longer tensors each step."""

    max_context: int | None = None

    def __init__(self) -> None:
        from importlib.metadata import version

        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        from edgekv.core.hashing import cache_dir
        from edgekv.export.models import load_model, resolve_model, source_sha256

        source = resolve_model(MODEL)
        sha = source_sha256(source)
        # load_model converts a GGUF to float32 once, into cache_dir()/converted/<sha[:24]> (models.py).
        hf_dir = cache_dir() / "converted" / sha[:24] if source.is_gguf else source.path
        if not (hf_dir / "config.json").is_file():
            load_model(MODEL)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(optimum_export(sha, hf_dir), use_cache=True,
                                                         session_options=options)
        self.version = f"optimum-onnx {version('optimum-onnx')}, onnxruntime {ort.__version__}"

    def reset(self) -> None:
        self.past, self.length = None, 0

    def _step(self, ids: list[int]) -> int:
        self.length += len(ids)
        mask = self.torch.ones(1, self.length, dtype=self.torch.long)
        out = self.model(input_ids=self.torch.tensor([ids]), attention_mask=mask, past_key_values=self.past,
                         use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, tokens: list[int]) -> int:
        return [self._step(tokens[i:i + PREFILL_CHUNK]) for i in range(0, len(tokens), PREFILL_CHUNK)][-1]

    def decode(self, token: int) -> int:
        return self._step([token])


class LlamaCpp:
    """llama-cpp-python's Llama.eval over the same GGUF file (its own weights: Q4_1), default rope."""

    max_context: int | None = None

    def __init__(self, n_ctx: int) -> None:
        import llama_cpp

        from edgekv.export.models import resolve_model

        self.llm = llama_cpp.Llama(model_path=str(resolve_model(MODEL).path), n_ctx=n_ctx, n_batch=PREFILL_CHUNK,
                                   n_ubatch=PREFILL_CHUNK, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
        self.llama_cpp = llama_cpp
        self.version = f"llama-cpp-python {llama_cpp.__version__}, n_ctx {self.llm.n_ctx()}"

    def reset(self) -> None:
        self.llm.reset()  # eval() drops the cached K/V past n_tokens

    def _step(self, ids: list[int]) -> int:
        self.llm.eval(ids)  # keeps no logits unless logits_all: read the last token's from the context
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def prefill(self, tokens: list[int]) -> int:
        return self._step(tokens)  # eval() feeds n_batch tokens per call

    def decode(self, token: int) -> int:
        return self._step([token])


class Edgekv:
    """edgekv's Engine; a fresh engine per context (its sessions are created and bound in Engine.open)."""

    def __init__(self, artifact: str, policy: str, kv_dtype: str | None) -> None:
        from edgekv import __version__

        self.artifact, self.policy, self.kv_dtype, self.engine = artifact, policy, kv_dtype, None
        self.reset()
        self.max_context = self.engine.manifest.model["max_context"] if policy == "dense" else None
        self.version = f"edgekv {__version__}, policy {policy}, {artifact}"
        weights = self.engine.manifest.data.get("quantization", {}).get("weight_dtype", "fp32")
        pages = kv_dtype or self.engine.manifest.profile.kv_dtype
        self.label = f"{LABELS[policy]}, {weights} weights, {pages} KV pages"

    def reset(self) -> None:
        from edgekv.runtime.engine import Engine

        if self.engine is not None and not self.engine.tokens:
            return
        if self.engine is not None:
            self.engine.close()
            self.engine = None  # release its weights and sessions before the next engine loads its own
        self.engine = Engine.open(self.artifact, self.policy, threads=THREADS, kv_dtype=self.kv_dtype)
        # Run every bound graph once on the zeroed buffers, so onnxruntime's first-run allocations are not
        # timed as prefill; it writes no cache state (tokens, pages and dense K/V stay empty).
        for step in (self.engine.prefill_step, self.engine.decode_step):
            for run in step.runs:
                run()

    def prefill(self, tokens: list[int]) -> int:
        return int(np.argmax(self.engine.prefill(tokens)))

    def decode(self, token: int) -> int:
        return int(np.argmax(self.engine.decode(token)))


def weight_dtype(artifact: str) -> str:
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    return manifest.get("quantization", {}).get("weight_dtype", "float32")


def open_system(name: str, artifact: str, kv_dtype: str | None, n_ctx: int):
    if name == "transformers":
        return Transformers()
    if name == "optimum":
        return Optimum()
    if name == "llama.cpp":
        return LlamaCpp(n_ctx)
    return Edgekv(artifact, name.split()[0], kv_dtype)


def measure(name: str, artifact: str, kv_dtype: str | None, context: int, steps: int) -> tuple[dict, list[dict]]:
    """Runs in a child process: open one system, then prefill and decode at one context."""
    from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S

    ids = np.random.default_rng(SEED).integers(*TOKEN_IDS, context).tolist()
    start = time.perf_counter()
    system = open_system(name, artifact, kv_dtype, context + WARMUP + steps)
    info = {"system": name, "label": system.label if isinstance(system, Edgekv) else LABELS[name],
            "version": system.version, "open_s": time.perf_counter() - start}
    system.reset()
    token = system.prefill(ids[:WARMUP_PROMPT])
    for _ in range(WARMUP):
        token = system.decode(token)
    rows = []
    if system.max_context is not None and context + WARMUP + steps > system.max_context:
        print(f"{name:<12} {context:>6} tokens: skipped (static context {system.max_context})", flush=True)
    else:
        system.reset()
        start = time.perf_counter()
        token = system.prefill(ids)
        prefill_s = time.perf_counter() - start
        for _ in range(WARMUP):
            token = system.decode(token)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            token = system.decode(token)
            times.append(time.perf_counter() - start)
        step_s = float(np.median(times))
        row = {"system": name, "context": context, "prefill_tok_s": context / prefill_s,
               "decode_step_ms": 1000 * step_s, "decode_tok_s": 1 / step_s,
               "reading_speed_ratio": 1 / step_s / READING_SPEED_TOKENS_PER_S,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        rows.append(row)
        print(f"{name:<12} {context:>6} tokens: prefill {row['prefill_tok_s']:7.0f} tok/s, decode "
              f"{row['decode_tok_s']:6.2f} tok/s ({row['decode_step_ms']:6.1f} ms, "
              f"{row['reading_speed_ratio']:4.1f}x reading), peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return info, rows


def run_isolated(name: str, artifact: str, kv_dtype: str | None, context: int, steps: int
                 ) -> tuple[dict, list[dict]]:
    """measure() in a fresh child process; a system that cannot import or run is reported and skipped."""
    try:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(measure, name, artifact, kv_dtype, context, steps).result()
    except BrokenProcessPool:
        reason = "its process died (crash or out of memory)"
    except Exception as error:  # ImportError for a missing peer, EdgekvError for a missing artifact, ...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    print(f"{name:<12} skipped: {reason}", flush=True)
    return {"system": name, "label": LABELS.get(name, name), "skipped": reason}, []


def summarize(rows: list[dict]) -> list[dict]:
    """Per system and context, the median over rounds of each figure, and the decode speed's ratio to the
    first system's at that context (the median of the rounds' ratios)."""
    first = {}
    for row in rows:
        first.setdefault(row["context"], row["system"])
    summary = []
    for system, context in dict.fromkeys((row["system"], row["context"]) for row in rows):
        runs = [row for row in rows if (row["system"], row["context"]) == (system, context)]
        medians = {key: float(np.median([row[key] for row in runs])) for key in runs[0]
                   if key not in ("system", "context", "round")}
        against = {row["round"]: row["decode_tok_s"] for row in rows
                   if (row["system"], row["context"]) == (first[context], context)}
        ratios = [row["decode_tok_s"] / against[row["round"]] for row in runs if row["round"] in against]
        summary.append({"system": system, "context": context, "rounds": len(runs), **medians,
                        "decode_ratio": float(np.median(ratios)) if ratios else None,
                        "ratio_to": first[context]})
    return summary


def print_table(infos: list[dict], summary: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M-Instruct, {THREADS} threads, median decode step, medians over rounds")
    for column in ("system", "context", "rounds", "prefill tok/s", "decode tok/s", "ms/token", "x reading",
                   "decode vs first", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for row in summary:
        ratio = "" if row["decode_ratio"] is None else f"{row['decode_ratio']:.2f}x {row['ratio_to']}"
        table.add_row(row["system"], str(row["context"]), str(row["rounds"]), f"{row['prefill_tok_s']:.0f}",
                      f"{row['decode_tok_s']:.2f}", f"{row['decode_step_ms']:.1f}", f"{row['reading_speed_ratio']:.1f}",
                      ratio, f"{row['peak_rss_mib']:.0f}")
    Console(width=150).print(table)
    for info in {info["system"]: info for info in infos}.values():
        if "skipped" in info:
            print(f"{info['system']}: skipped: {info['skipped']}")
        else:
            print(f"{info['system']}: {info['label']}; {info['version']}")


def plot(infos: list[dict], rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S

    labels = {info["system"]: info["label"] for info in infos}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["system"] for row in rows):
        points = [(row["context"], row["decode_tok_s"]) for row in rows if row["system"] == name]
        ax.plot(*zip(*points), marker="o", label=labels[name])
    ax.axhline(READING_SPEED_TOKENS_PER_S, color="grey", linestyle="--",
               label=f"human reading speed ({READING_SPEED_TOKENS_PER_S} tok/s)")
    ax.set_xscale("log", base=2)
    contexts = sorted({row["context"] for row in rows})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (median step)")
    ax.set_title(f"SmolLM2-135M-Instruct decode speed on CPU, {THREADS} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=CONTEXTS)
    parser.add_argument("--systems", default=SYSTEMS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every system at each context, in "
                        "alternating order")
    parser.add_argument("--artifact", default=ARTIFACT, help="edgekv artifacts, comma-separated")
    parser.add_argument("--kv-dtypes", default="", help="edgekv's KV pages, comma-separated (float32, int8) "
                        "[default: each artifact's profile's]")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    contexts = sorted(int(c) for c in args.contexts.split(","))
    unknown = set(args.systems.split(",")) - set(LABELS)
    if unknown:
        parser.error(f"unknown system(s) {', '.join(sorted(unknown))}; choose from {SYSTEMS}")
    artifacts = args.artifact.split(",")
    kv_dtypes = args.kv_dtypes.split(",") if args.kv_dtypes else [None]
    systems = []  # (name in the table, artifact, KV pages)
    for name in args.systems.split(","):
        edgekv = name in EDGEKV_POLICIES
        for artifact, kv_dtype in product(*((artifacts, kv_dtypes) if edgekv else (artifacts[:1], [None]))):
            system = name
            if edgekv and len(artifacts) > 1:
                system += f" {weight_dtype(artifact)}"
            if edgekv and len(kv_dtypes) > 1:
                system += f" kv-{kv_dtype}"
            systems.append((system, artifact, kv_dtype))
    infos, rows = [], []
    for context in contexts:
        for round_ in range(args.rounds):
            for system, artifact, kv_dtype in systems if round_ % 2 == 0 else systems[::-1]:
                info, measured = run_isolated(system, artifact, kv_dtype, context, args.steps)
                infos.append(info)
                rows.extend({**row, "round": round_} for row in measured)
    summary = summarize(rows)
    if rows:
        print_table(infos, summary)
    settings = {"model": MODEL, "contexts": contexts, "steps": args.steps, "rounds": args.rounds, "warmup": WARMUP,
                "threads": THREADS, "prefill_chunk": PREFILL_CHUNK, "seed": SEED, "token_ids": TOKEN_IDS}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "systems": infos, "rows": rows, "summary": summary}, f, indent=1)
    if args.plot and rows:
        plot(infos, summary, args.plot)


if __name__ == "__main__":
    main()
