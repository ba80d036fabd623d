"""The host runtime: chunked prefill and token-by-token decode through an artifact's static graphs.

Per step (S tokens at positions p..p+S-1), per layer l:
    graph  -> q, k_new, v_new of layer l          (embed graph, or the boundary graph of layer l-1)
    host   PageStore[l].append(k_new, v_new)      (pages and their key min/max)
    host   select_pages(policy, q, page metadata) (which pages enter the budget; rerank also reads the keys
                                                   of Quest's shortlist)
    host   decode: ResidentBudget[l].update       (copies only the pages that entered the selection)
           prefill: TieredPool.gather             (the chunk's pages, gathered into a shared buffer)
    graph  attention + MLP of layer l (+ q/k/v of layer l+1, or the LM head)

Every graph input and output is a numpy buffer allocated once and bound once (onnxruntime IOBinding
over OrtValues that share the buffers' memory): a step only writes into them and runs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort

from edgekv.export.modules import MASK_VALUE
from edgekv.runtime.budget import ResidentBudget, gathered_positions, slot_positions
from edgekv.runtime.graphs import GraphSessions
from edgekv.runtime.page_format import KV_DTYPES
from edgekv.runtime.pages import PageStore
from edgekv.runtime.sampling import Sampler
from edgekv.runtime.selection import POLICIES, Selection, select_pages
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S, GenerationStats
from edgekv.runtime.tiers import LayerKeys, TieredPool
from edgekv.toolkit.errors import EdgekvError
from edgekv.toolkit.manifest import GraphEntry, Manifest, load_verified

KV_SPILL_FILE = "kv-spill.bin"


@dataclass
class BoundStep:
    """The L+1 graphs of one variant with their preallocated, bound buffers."""

    graphs: list[GraphEntry]
    sessions: list[ort.InferenceSession]
    bindings: list[ort.IOBinding]
    buffers: dict[str, np.ndarray]  # input_ids, position_ids, hidden0/1, q0/1, k_new, v_new, logits
    layer_kv: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per layer: the bound k_sel, v_sel, mask
    inputs: list[dict[str, np.ndarray]]  # per graph: its input name -> the bound buffer

    @property
    def seq_len(self) -> int:
        return self.graphs[0].seq_len


def _spec(graph: GraphEntry, name: str):
    return next(t for t in graph.inputs + graph.outputs if t.name == name)


def bind_step(sessions: GraphSessions, graphs: list[GraphEntry],
              layer_buffers: list[tuple[np.ndarray, np.ndarray]] | None = None) -> BoundStep:
    """Allocate and bind every buffer of one variant's graphs.

    `layer_buffers` gives each layer its own k_sel/v_sel: the decode step's resident budgets, or the
    dense baseline's static full-context caches (written in place, as the classic static-NPU design
    does). Without it (prefill) one k_sel/v_sel pair per distinct budget is reused layer after layer.
    """
    def zeros(graph: GraphEntry, name: str) -> np.ndarray:
        spec = _spec(graph, name)
        return np.zeros(spec.shape, dtype=spec.dtype)

    embed, head = graphs[0], graphs[-1]
    buffers = {"input_ids": zeros(embed, "input_ids"), "position_ids": zeros(embed, "position_ids"),
               "hidden0": zeros(embed, "hidden_out"), "hidden1": zeros(embed, "hidden_out"),
               "q0": zeros(embed, "q_out"), "q1": zeros(embed, "q_out"),
               "k_new": zeros(embed, "k_out"), "v_new": zeros(embed, "v_out"), "logits": zeros(head, "logits")}
    masks: dict[int, np.ndarray] = {}
    gather: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    layer_kv = []
    for graph in graphs[1:]:
        if graph.budget not in masks:
            masks[graph.budget] = zeros(graph, "mask")
        if layer_buffers is not None:
            k_sel, v_sel = layer_buffers[graph.layer]
        else:
            if graph.budget not in gather:
                gather[graph.budget] = (zeros(graph, "k_sel"), zeros(graph, "v_sel"))
            k_sel, v_sel = gather[graph.budget]
        layer_kv.append((k_sel, v_sel, masks[graph.budget]))
    # OrtValues share the numpy buffers' memory, so binding once is enough: later steps write the arrays.
    # (Each IOBinding keeps the OrtValues bound to it alive, and each OrtValue its numpy array.)
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in buffers.items()}
    kv_values: dict[int, ort.OrtValue] = {}
    for arrays in layer_kv:
        for array in arrays:
            if id(array) not in kv_values:
                kv_values[id(array)] = ort.OrtValue.ortvalue_from_numpy(array)
    session_list, bindings, graph_inputs = [], [], []
    for index, graph in enumerate(graphs):
        session = sessions.session(graph)
        binding = session.io_binding()
        bound: dict[str, np.ndarray] = {}
        if graph.kind == "embed":
            inputs = {"input_ids": "input_ids", "position_ids": "position_ids"}
        else:
            layer = index - 1
            for name, array in zip(("k_sel", "v_sel", "mask"), layer_kv[layer]):
                binding.bind_ortvalue_input(name, kv_values[id(array)])
                bound[name] = array
            inputs = {"hidden_in": f"hidden{layer % 2}", "q_in": f"q{layer % 2}"}
            if graph.kind == "layer":
                inputs["position_ids"] = "position_ids"
        for input_name, buffer_name in inputs.items():
            binding.bind_ortvalue_input(input_name, values[buffer_name])
            bound[input_name] = buffers[buffer_name]
        graph_inputs.append(bound)
        if graph.kind == "head":
            binding.bind_ortvalue_output("logits", values["logits"])
        else:
            out = index % 2  # embed writes buffers 0, layer l's graph writes (l + 1) % 2
            for output_name, buffer_name in (("hidden_out", f"hidden{out}"), ("q_out", f"q{out}"),
                                             ("k_out", "k_new"), ("v_out", "v_new")):
                binding.bind_ortvalue_output(output_name, values[buffer_name])
        session_list.append(session)
        bindings.append(binding)
    return BoundStep(graphs, session_list, bindings, buffers, layer_kv, graph_inputs)


@dataclass
class Timers:
    graph_s: float = 0.0
    select_s: float = 0.0
    gather_s: float = 0.0  # appending new K/V to the pages, gathering the budget and building the mask


@dataclass
class Engine:
    """One conversation's state over an artifact: the paged KV cache and the bound graphs."""

    manifest: Manifest
    policy: str
    sessions: GraphSessions
    prefill_step: BoundStep
    decode_step: BoundStep
    pool: TieredPool
    stores: list[PageStore]
    session_dir: Path
    resident: list[ResidentBudget]  # the decode step's per-layer budgets (empty for dense)
    budget_scale: float = 1.0  # the share of each graph's KV budget that selection may fill
    decode_pages: list[int] = field(default_factory=list)  # per layer: pages a decode selection may fill
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are in the cache
    timers: Timers = field(default_factory=Timers)
    warned_context: bool = False
    # Called with each graph and its bound inputs just before it runs (INT8 calibration records them).
    on_graph: Callable[[GraphEntry, dict[str, np.ndarray]], None] | None = None
    # Called with each layer's selection (and its layer, rows of q, page store) to replace it by another of
    # the same size (benchmarks/selection_oracle.py ranks the pages by their true attention through it).
    reselect: Callable[[int, np.ndarray, PageStore, Selection], Selection] | None = None

    @classmethod
    def open(cls, artifact: Path | str, policy: str = "quest", spill_dir: Path | str | None = None,
             threads: int = 0, host_kv_bytes: int | None = None, device_kv_bytes: int | None = None,
             budget: int | None = None, layer_budgets: list[int] | None = None,
             kv_dtype: str | None = None) -> "Engine":
        """`budget`: a decode budget (tokens) up to the graphs' own, for evaluating smaller budgets: every
        layer's budget scales with it (the dense layers keep their factor, prefill its ratio) and the
        graph's unused KV slots are masked, which computes exactly what a smaller graph would.
        `layer_budgets`: instead, one decode budget per layer, each up to its graph's (calibration).
        `kv_dtype`: how pages are stored in the host and disk tiers, instead of the profile's."""
        if policy not in POLICIES:
            raise EdgekvError(f"unknown policy '{policy}'; choose one of: {', '.join(POLICIES)}")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise EdgekvError(f"unknown KV dtype '{kv_dtype}'; choose one of: {', '.join(KV_DTYPES)}")
        manifest = load_verified(artifact)
        profile, model = manifest.profile, manifest.model
        # The smallest budget whose scaled prefill budget still holds a chunk's pages and the sink.
        smallest = -(-(profile.prefill_chunk + 2 * profile.page_size) * profile.decode_budget // profile.prefill_budget)
        if budget is not None and not smallest <= budget <= profile.decode_budget:
            raise EdgekvError(f"budget {budget} is outside this artifact's range {smallest}..{profile.decode_budget}; "
                              "export with a profile of a larger decode_budget for larger budgets")
        session_dir = make_session_dir(spill_dir)
        sessions = GraphSessions.open(manifest, threads)
        family = "dense" if policy == "dense" else "budget"
        pool = TieredPool(model["layers"], model["kv_heads"], model["head_dim"], profile.page_size,
                          device_kv_bytes or profile.device_kv_bytes, host_kv_bytes or profile.host_kv_bytes,
                          session_dir / KV_SPILL_FILE, kv_dtype or profile.kv_dtype)
        prefill_graphs, decode_graphs = manifest.variant(f"{family}-prefill"), manifest.variant(f"{family}-decode")
        if policy == "dense":
            shape = (1, model["kv_heads"], model["max_context"], model["head_dim"])
            caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(model["layers"])]
            prefill_step, decode_step = bind_step(sessions, prefill_graphs, caches), bind_step(sessions, decode_graphs, caches)
            resident = []
        else:
            kv = [(np.zeros(_spec(g, "k_sel").shape, np.float32), np.zeros(_spec(g, "v_sel").shape, np.float32))
                  for g in decode_graphs[1:]]
            prefill_step, decode_step = bind_step(sessions, prefill_graphs), bind_step(sessions, decode_graphs, kv)
            resident = [ResidentBudget.over(k[0], v[0], profile.page_size) for k, v in kv]
        scale = (budget or profile.decode_budget) / profile.decode_budget
        graph_budgets = [g.budget for g in decode_graphs[1:]]
        if layer_budgets is None:
            layer_budgets = [int(b * scale) for b in graph_budgets]
        elif len(layer_budgets) != len(graph_budgets) or any(
                not 2 * profile.page_size <= b <= g for b, g in zip(layer_budgets, graph_budgets)):
            raise EdgekvError(f"layer budgets must be {len(graph_budgets)} values, each from 2 pages up to its decode "
                              f"graph's budget ({graph_budgets})")
        return cls(manifest, policy, sessions, prefill_step, decode_step, pool,
                   [PageStore(layer, pool) for layer in range(model["layers"])], session_dir, resident,
                   budget_scale=scale, decode_pages=[b // profile.page_size for b in layer_budgets])

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def reset(self) -> None:
        """Empty the KV cache (a new conversation); the graphs and their bound buffers stay."""
        self.pool.close()
        self.pool = self.pool.fresh()
        self.stores = [PageStore(layer, self.pool) for layer in range(len(self.stores))]
        for budget in self.resident:
            budget.clear()
        self.tokens = []
        self.warned_context = False

    def kv_snapshot(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every layer's cached keys and values, [kv_heads, tokens, head_dim] each (copies)."""
        if self.policy == "dense":  # the baseline keeps its cache in the static buffers, not in pages
            n = len(self.tokens)
            return [(k[0, :, :n].copy(), v[0, :, :n].copy()) for k, v, _ in self.decode_step.layer_kv]
        return [store.read() for store in self.stores]

    def restore(self, tokens: list[int], kv: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Replace the cache with saved tokens and their keys and values (no graph runs: bit-exact)."""
        if len(kv) != len(self.stores) or any(k.shape[1] != len(tokens) for k, _ in kv):
            raise EdgekvError("the saved KV cache does not match this artifact's layers or its token count")
        if self.policy == "dense" and len(tokens) > self.manifest.model["max_context"]:
            raise EdgekvError(f"the saved conversation has {len(tokens)} tokens, more than the dense baseline's "
                              f"static {self.manifest.model['max_context']}; load it with --policy quest")
        self.reset()
        if self.policy == "dense":
            for (k_cache, v_cache, _), (keys, values) in zip(self.decode_step.layer_kv, kv):
                k_cache[0, :, :len(tokens)], v_cache[0, :, :len(tokens)] = keys, values
        else:
            for store, (keys, values) in zip(self.stores, kv):
                store.append(keys, values)
        self.tokens = list(tokens)

    def _run(self, step: BoundStep, index: int) -> None:
        if self.on_graph is not None:
            self.on_graph(step.graphs[index], step.inputs[index])
        start = time.perf_counter()
        step.sessions[index].run_with_iobinding(step.bindings[index])
        self.timers.graph_s += time.perf_counter() - start

    def _forward(self, step: BoundStep, tokens: list[int]) -> np.ndarray:
        """Run len(tokens) <= S tokens through one step's graphs; returns the last token's logits."""
        seq, n, start = step.seq_len, len(tokens), len(self.tokens)
        pad = seq - n  # left padding: the last real token sits on the last row, the one the head returns
        if self.policy == "dense" and start + n > step.graphs[-1].budget:
            raise EdgekvError(f"the dense baseline's static context is {step.graphs[-1].budget} tokens; "
                              f"use --policy quest for longer contexts")
        if start + n > self.manifest.model["max_context"] and not self.warned_context:
            warnings.warn(f"context passes the model's trained context of {self.manifest.model['max_context']} "
                          "tokens; quality may degrade", stacklevel=2)
            self.warned_context = True
        b = step.buffers
        b["input_ids"][0, :pad] = 0
        b["input_ids"][0, pad:] = tokens
        b["position_ids"][0, :pad] = 0
        b["position_ids"][0, pad:] = np.arange(start, start + n)
        row_positions = b["position_ids"][0]
        first_new = start // self.page_size
        self._run(step, 0)
        if self.policy == "dense":
            self._forward_dense(step, n, start, pad)
            self.tokens.extend(tokens)
            return b["logits"][0, -1].copy()  # the buffer is overwritten by the next step
        decoding = step is self.decode_step
        # The mask buffer of a budget, as this step last filled it (for how many selectable pages): one
        # fill serves every layer of that budget and page limit.
        masked: dict[int, int] = {}
        for layer, store in enumerate(self.stores):
            graph = step.graphs[layer + 1]
            k_sel, v_sel, mask = step.layer_kv[layer]
            t0 = time.perf_counter()
            store.append(b["k_new"][0, :, pad:], b["v_new"][0, :, pad:])
            t1 = time.perf_counter()
            limit = (self.decode_pages[layer] if decoding
                     else int(graph.budget * self.budget_scale) // self.page_size)
            q = b[f"q{layer % 2}"][0, :, pad:]
            keys = LayerKeys(self.pool, layer) if self.policy == "rerank" else None
            selection = select_pages(self.policy, q, store.bounds(), store.n_pages, first_new, limit, keys,
                                     row_positions[pad:])
            if self.reselect is not None:
                selection = self.reselect(layer, q, store, selection)
            t2 = time.perf_counter()
            if decoding:
                self.resident[layer].update(self.pool, layer, selection)
            else:
                pages = selection.pages()
                self.pool.gather(layer, pages, k_sel[0], v_sel[0])
            if masked.get(graph.budget) != limit:
                positions = (slot_positions(selection, graph.budget, self.page_size) if decoding
                             else gathered_positions(pages[0], self.page_size))
                fill_mask(mask[0, 0], positions, store.length, row_positions, pad)
                masked[graph.budget] = limit
            t3 = time.perf_counter()
            self.timers.select_s += t2 - t1
            self.timers.gather_s += (t1 - t0) + (t3 - t2)
            self._run(step, layer + 1)
        self.tokens.extend(tokens)
        return b["logits"][0, -1].copy()  # the buffer is overwritten by the next step

    def _forward_dense(self, step: BoundStep, n: int, start: int, pad: int) -> None:
        """The classic static design: new K/V written in place into each layer's full-context buffer."""
        b = step.buffers
        t0 = time.perf_counter()
        mask = step.layer_kv[0][2]  # one mask buffer serves every layer of the step
        fill_mask(mask[0, 0], np.arange(start + n), start + n, b["position_ids"][0], pad)
        self.timers.gather_s += time.perf_counter() - t0
        for layer in range(len(self.stores)):
            t0 = time.perf_counter()
            k_cache, v_cache, _ = step.layer_kv[layer]
            k_cache[0, :, start:start + n] = b["k_new"][0, :, pad:]
            v_cache[0, :, start:start + n] = b["v_new"][0, :, pad:]
            self.timers.gather_s += time.perf_counter() - t0
            self._run(step, layer + 1)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens and return the last one's logits.

        All but the last token go in fixed chunks (the first chunk holds the remainder). The last token,
        whose logits are sampled, goes through the decode graph: its pages are then selected for its own
        query, as in Quest's decode, instead of sharing one selection with the chunk's other rows (on the
        8K pass-key task, the shared selection missed keys that the token's own selection finds).
        """
        if not tokens:
            raise EdgekvError("empty prompt: give at least one token of text")
        chunk, body = self.prefill_step.seq_len, tokens[:-1]
        if body:
            first = len(body) % chunk or chunk
            self._forward(self.prefill_step, body[:first])
            for start in range(first, len(body), chunk):
                self._forward(self.prefill_step, body[start:start + chunk])
        return self.decode(tokens[-1])

    def decode(self, token: int) -> np.ndarray:
        return self._forward(self.decode_step, [token])

    def generate(self, prompt: list[int], max_new_tokens: int, sampler: Sampler, eos_ids: set[int],
                 stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
        """Prefill the prompt, then yield sampled tokens until EOS, a stop condition or the limit.

        The last yielded token is not yet in the cache (it is fed by the next step or turn).
        """
        logits = self.prefill(prompt)
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
            on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationStats]:
        """generate() with timing: returns the tokens and their GenerationStats."""
        self.timers = Timers()
        transfer_before = self.pool.transfer_bytes
        start = time.perf_counter()
        first_at = None
        tokens: list[int] = []
        for token in self.generate(prompt, max_new_tokens, sampler, eos_ids, stop):
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
        stats = GenerationStats(
            prompt_tokens=len(prompt), generated_tokens=len(tokens), ttft_s=ttft,
            prefill_tok_s=len(prompt) / ttft, decode_tok_s=decode_rate,
            words_per_s=words / decode_s if decode_s > 0 else 0.0,
            reading_speed_ratio=decode_rate / READING_SPEED_TOKENS_PER_S, pages=self.pool.counts(),
            transfer_bytes=self.pool.transfer_bytes - transfer_before, graph_s=self.timers.graph_s,
            select_s=self.timers.select_s, gather_s=self.timers.gather_s)
        return tokens, stats

    def close(self) -> None:
        """Remove the session directory and its spill file."""
        self.pool.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)


def fill_mask(mask: np.ndarray, positions: np.ndarray, length: int, row_positions: np.ndarray, pad: int) -> None:
    """Additive mask [S, B]: slot j is visible to row r iff it holds a token at or before r's position.
    `positions` gives the first slots' token positions; slots past them are empty."""
    filled = len(positions)
    visible = (positions[None, :] <= row_positions[:, None]) & (positions[None, :] < length)
    mask[:, :filled] = np.where(visible, 0.0, MASK_VALUE)
    mask[:, filled:] = MASK_VALUE
    mask[:pad] = MASK_VALUE


def make_session_dir(spill_dir: Path | str | None) -> Path:
    """A fresh directory for the session's spill file, under spill_dir (default: the system temp dir)."""
    parent = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir())
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="edgekv-session-", dir=parent))
    except OSError as e:
        raise EdgekvError(f"cannot write the spill directory {parent} ({e.strerror}); pass a writable "
                          "--spill-dir") from None
