"""The host runtime: chunked prefill and token-by-token decode through an artifact's static graphs.

A model of L layers runs as L+1 graph calls per step (S tokens at positions p..p+S-1):

    host   the tokens' embeddings (embedding.py) and RoPE's cos/sin at p..p+S-1 (rope.py)
    graph  qkv (or layer l-1's graph) -> q, k_new, v_new of layer l
    host   rotate q and k_new by RoPE; cache.append(l, k_new, v_new); cache.prepare(l, q)
                                                                   (kv_cache.py: fill l's k_sel, v_sel, mask)
    graph  attention + MLP of layer l, and q/k/v of layer l+1 (or the LM head)

The cache is the paged one (quest, rerank, streaming) or the static full-context one (dense), behind one
interface; the graphs run through a backend (backend.py). Every graph input and output is a numpy buffer
allocated once and bound once (bound_step.py): a step only writes into them and runs.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np
from threadpoolctl import ThreadpoolController

from edgekv.core.constants import DEFAULT_POLICY, KV_DTYPES, POLICIES, POSITION_SCHEMES
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry, Manifest, load_verified
from edgekv.runtime.backend import BackendFactory, GraphBackend, OnnxruntimeBackend
from edgekv.runtime.bound_step import BoundStep, bind_step
from edgekv.runtime.embedding import Embedding
from edgekv.runtime.host_arena import KV_SPILL_FILE, make_session_dir
from edgekv.runtime.kernels.rotation import rotate_half_in_place
from edgekv.runtime.kv_cache import KVCache, StaticCache
from edgekv.runtime.paged_cache import PagedCache
from edgekv.runtime.positions import FarPositions
from edgekv.runtime.rope import Rope
from edgekv.runtime.sampling import Sampler
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S, GenerationStats, HostTimers
from edgekv.runtime.tiers import TieredPool

# Given n prompt tokens to prefill, a context around the prefill that yields its on_prefill callback (or None):
# how a caller shows a long prefill's progress (the CLI's progress bar).
PrefillProgress = Callable[[int], ContextManager[Callable[[int], None] | None]]


@dataclass
class Engine:
    """One conversation's state over an artifact: its KV cache and the bound graphs."""

    manifest: Manifest
    policy: str
    embedding: Embedding
    rope: Rope
    backend: GraphBackend
    cache: KVCache
    prefill_step: BoundStep
    decode_step: BoundStep
    session_dir: Path
    timers: HostTimers
    positions: str = "absolute"  # the position scheme (positions.py); the static cache's are absolute
    local_window: int = 0  # tokens of recent pages every selection keeps; none in the static cache
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are in the cache
    warned_context: bool = False
    # Called with each graph and its bound inputs just before it runs (INT8 calibration records them).
    on_graph: Callable[[GraphEntry, dict[str, np.ndarray]], None] | None = None
    # The host's BLAS (a prefill chunk's page scores) runs on one thread: OpenBLAS's idle threads spin after
    # each product and slow the graph call that follows (benchmarks/RESULTS.md, "One BLAS thread").
    blas: ThreadpoolController = field(default_factory=ThreadpoolController)

    @classmethod
    def open(cls, artifact: Path | str, policy: str = DEFAULT_POLICY, spill_dir: Path | str | None = None,
             threads: int = 0, host_kv_bytes: int | None = None, device_kv_bytes: int | None = None,
             budget: int | None = None, layer_budgets: list[int] | None = None,
             kv_dtype: str | None = None, positions: str | None = None, local_window: int | None = None,
             backend: BackendFactory = OnnxruntimeBackend.open) -> "Engine":
        """`budget`: a decode budget (tokens) up to the graphs' own, for evaluating smaller budgets: every
        layer's budget scales with it (the dense layers keep their factor, prefill its ratio) and the
        graph's unused KV slots are masked, which computes exactly what a smaller graph would.
        `layer_budgets`: instead, one decode budget per layer, each up to its graph's (calibration).
        `kv_dtype`: how pages are stored in the host and disk tiers, instead of the profile's.
        `positions`: the position scheme of the paged cache (positions.py), instead of the profile's.
        `local_window`: tokens of recent pages every selection keeps, instead of the profile's.
        `backend`: makes the backend that runs the graphs (onnxruntime by default)."""
        for value, known, what in ((policy, POLICIES, "policy"), (kv_dtype, KV_DTYPES, "KV dtype"),
                                   (positions, POSITION_SCHEMES, "position scheme")):
            if value is not None and value not in known:
                raise EdgekvError(f"unknown {what} '{value}'; choose one of: {', '.join(known)}")
        manifest = load_verified(artifact)
        profile, model = manifest.profile, manifest.model
        positions = positions or profile.positions
        local_window = profile.local_window if local_window is None else local_window
        if local_window < 0 or local_window % profile.page_size:
            raise EdgekvError(f"local window {local_window} must be a multiple of {profile.page_size} (the page size), >= 0")
        # The smallest budget whose scaled prefill budget still holds a chunk's pages and the sink.
        smallest = -(-(profile.prefill_chunk + 2 * profile.page_size) * profile.decode_budget // profile.prefill_budget)
        if budget is not None and not smallest <= budget <= profile.decode_budget:
            raise EdgekvError(f"budget {budget} is outside this artifact's range {smallest}..{profile.decode_budget}; "
                              "export with a profile of a larger decode_budget for larger budgets")
        graph_budgets = [g.budget for g in manifest.variant("budget-decode")[1:]]
        scale = (budget or profile.decode_budget) / profile.decode_budget
        if layer_budgets is None:
            layer_budgets = [int(b * scale) for b in graph_budgets]
        elif len(layer_budgets) != len(graph_budgets) or any(
                not 2 * profile.page_size <= b <= g for b, g in zip(layer_budgets, graph_budgets)):
            raise EdgekvError(f"layer budgets must be {len(graph_budgets)} values, each from 2 pages up to its decode "
                              f"graph's budget ({graph_budgets})")
        session_dir = make_session_dir(spill_dir)
        try:
            timers = HostTimers()
            rope = Rope.from_manifest(model)
            if policy == "dense":
                cache: KVCache = StaticCache(model["kv_heads"], model["head_dim"], model["max_context"], timers,
                                             profile.mask_value)
            else:
                pool = TieredPool(model["layers"], model["kv_heads"], model["head_dim"], profile.page_size,
                                  device_kv_bytes or profile.device_kv_bytes, host_kv_bytes or profile.host_kv_bytes,
                                  session_dir / KV_SPILL_FILE, kv_dtype or profile.kv_dtype)
                far_positions = (None if positions == "absolute" else
                                 FarPositions.for_model(positions, model["max_context"], profile.prefill_chunk))
                cache = PagedCache(policy, pool, [b // profile.page_size for b in layer_budgets], scale, timers,
                                   mask_value=profile.mask_value, far_positions=far_positions, rope=rope,
                                   local_pages=local_window // profile.page_size)
            runner = backend(manifest, threads)
            steps = []
            for kind in ("prefill", "decode"):
                graphs = manifest.variant(f"{cache.family}-{kind}")
                steps.append(bind_step(runner, graphs, cache.inputs(graphs, decoding=kind == "decode")))
            return cls(manifest, policy, Embedding.open(manifest), rope, runner, cache, *steps, session_dir, timers,
                       positions="absolute" if policy == "dense" else positions,
                       local_window=0 if policy == "dense" else local_window)
        except BaseException:  # a failed or interrupted open (its sessions take seconds) leaves no directory
            shutil.rmtree(session_dir, ignore_errors=True)
            raise

    def reset(self) -> None:
        """Empty the KV cache (a new conversation); the graphs and their bound buffers stay."""
        self.cache.reset()
        self.tokens = []
        self.warned_context = False

    def kv_snapshot(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every layer's cached keys and values, [kv_heads, tokens, head_dim] each (copies)."""
        return self.cache.snapshot()

    def restore(self, tokens: list[int], kv: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Replace the cache with saved tokens and their keys and values (no graph runs: bit-exact)."""
        if len(kv) != self.manifest.model["layers"] or any(k.shape[1] != len(tokens) for k, _ in kv):
            raise EdgekvError("the saved KV cache does not match this artifact's layers or its token count")
        self.reset()
        self.cache.restore(kv)
        self.tokens = list(tokens)

    def _run(self, step: BoundStep, index: int) -> None:
        if self.on_graph is not None:
            self.on_graph(step.graphs[index], step.inputs[index])
        start = time.perf_counter()
        step.runs[index]()
        self.timers.graph_s += time.perf_counter() - start

    def _forward(self, step: BoundStep, tokens: list[int]) -> np.ndarray:
        """Run len(tokens) <= S tokens through one step's graphs; returns the last token's logits."""
        seq, n, start = step.seq_len, len(tokens), len(self.tokens)
        pad = seq - n  # left padding: the last real token sits on the last row, the one the head returns
        b = step.buffers
        b["positions"][:pad] = 0
        b["positions"][pad:] = np.arange(start, start + n)
        self.cache.begin(step is self.decode_step, start, b["positions"], pad)
        if start + n > self.manifest.model["max_context"] and not self.warned_context:
            warnings.warn(f"context passes the model's trained context of {self.manifest.model['max_context']} "
                          "tokens; quality may degrade", stacklevel=3)
            self.warned_context = True
        b["ids"][:pad] = 0
        b["ids"][pad:] = tokens
        self.embedding.lookup(b["ids"], b["hidden0"])
        self.rope.fill(b["positions"], b["cos"], b["sin"])
        with self.blas.limit(limits=1, user_api="blas"):
            for layer in range(len(step.layer_kv)):
                # Graph `layer` (qkv, then each layer's) wrote layer `layer`'s q and k before RoPE.
                self._run(step, layer)
                rotate_half_in_place(b[f"q{layer % 2}"], b["k_new"], b["cos"], b["sin"])
                self.cache.append(layer, b["k_new"][:, pad:], b["v_new"][:, pad:])
                self.cache.prepare(layer, b[f"q{layer % 2}"][:, pad:])
            self._run(step, len(step.layer_kv))  # the head
        self.tokens.extend(tokens)
        return b["logits"][0, -1].copy()  # the buffer is overwritten by the next step

    def prefill(self, tokens: list[int], on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
        """Feed tokens and return the last one's logits; `on_chunk` is called with the number of the
        prompt's tokens fed so far after each chunk (progress of a long prompt).

        All but the last token go in fixed chunks (the first chunk holds the remainder). The last token,
        whose logits are sampled, goes through the decode graph: its pages are then selected for its own
        query, as in Quest's decode, instead of sharing one selection with the chunk's other rows (on the
        8K pass-key task, the shared selection missed keys that the token's own selection finds).
        """
        if not tokens:
            raise EdgekvError("empty prompt: give at least one token of text")
        chunk, body = self.prefill_step.seq_len, tokens[:-1]
        first = len(body) % chunk or chunk
        for start, end in zip([0, *range(first, len(body), chunk)], range(first, len(body) + 1, chunk)):
            self._forward(self.prefill_step, body[start:end])
            if on_chunk is not None:
                on_chunk(end)
        logits = self.decode(tokens[-1])
        if on_chunk is not None:
            on_chunk(len(tokens))
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._forward(self.decode_step, [token])

    def generate(self, prompt: list[int], max_new_tokens: int, sampler: Sampler, eos_ids: set[int],
                 stop: Callable[[list[int]], bool] | None = None,
                 on_prefill: Callable[[int], None] | None = None) -> Iterator[int]:
        """Prefill the prompt (`on_prefill`: prefill's on_chunk), then yield sampled tokens until EOS, a stop
        condition or the limit.

        The last yielded token is not yet in the cache (it is fed by the next step or turn).
        """
        logits = self.prefill(prompt, on_prefill)
        generated: list[int] = []
        while len(generated) < max_new_tokens:
            token = sampler(logits, self.tokens)
            generated.append(token)
            yield token
            if token in eos_ids or (stop and stop(generated)) or len(generated) == max_new_tokens:
                return
            logits = self.decode(token)

    def run(self, prompt: list[int], max_new_tokens: int, sampler: Sampler, eos_ids: set[int],
            decode_text: Callable[[list[int]], str], stop: Callable[[list[int]], bool] | None = None,
            on_token: Callable[[int], None] | None = None,
            on_prefill: Callable[[int], None] | None = None) -> tuple[list[int], GenerationStats]:
        """generate() with timing: returns the tokens and their GenerationStats."""
        self.timers.reset()
        transfer_before = self.cache.usage().transfer_bytes
        start = time.perf_counter()
        first_at = None
        tokens: list[int] = []
        for token in self.generate(prompt, max_new_tokens, sampler, eos_ids, stop, on_prefill):
            if first_at is None:
                first_at = time.perf_counter()
            tokens.append(token)
            if on_token:
                on_token(token)
        end = time.perf_counter()
        ttft = first_at - start
        decode_s = end - first_at
        decode_rate = (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0
        words = len(decode_text(tokens).split())
        usage = self.cache.usage()
        stats = GenerationStats(
            prompt_tokens=len(prompt), generated_tokens=len(tokens), ttft_s=ttft,
            prefill_tok_s=len(prompt) / ttft, decode_tok_s=decode_rate,
            words_per_s=words / decode_s if decode_s > 0 else 0.0,
            reading_speed_ratio=decode_rate / READING_SPEED_TOKENS_PER_S, pages=usage.pages,
            transfer_bytes=usage.transfer_bytes - transfer_before, graph_s=self.timers.graph_s,
            select_s=self.timers.select_s, gather_s=self.timers.gather_s)
        return tokens, stats

    def close(self) -> None:
        """Remove the session directory and its spill file; release the backend."""
        self.cache.close()
        self.backend.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)

