"""`edgekv eval`: long-context accuracy (retrieval tasks) and fidelity against dense (agreement).

Budgets below the artifact's own are evaluated with Engine.open(budget=...): selection fills that
share of every graph's KV input and the rest is masked, which is what a smaller graph computes. The
dense baseline has no budget: it runs once per context.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekv.core.errors import EdgekvError
from edgekv.evaluation.metrics import mean_kl, perplexity, top1_agreement
from edgekv.evaluation.plots import new_axes, save_figure
from edgekv.evaluation.tasks import ANSWER_TOKENS, task_prompt
from edgekv.runtime.backend import BackendFactory, OnnxruntimeBackend
from edgekv.runtime.engine import Engine, PrefillProgress
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.tokens import ArtifactTokenizer

SELF_TEXT_PROMPT = "Write a long, detailed history of the city of Lyon, chapter after chapter."
SELF_TEXT_SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=0)


@dataclass(frozen=True)
class EvalPlan:
    contexts: list[int]
    depths: list[float]
    budgets: list[int]
    policies: list[str]
    kv_dtype: str | None = None  # how pages are stored in the host and disk tiers (default: the profile's)
    backend: BackendFactory = OnnxruntimeBackend.open  # what runs the artifact's graphs (a reference: the CPU)
    positions: tuple[str, ...] = ("absolute",)  # the paged cache's position schemes (runtime/positions.py)
    local_windows: tuple[int | None, ...] = (None,)  # tokens of recent pages kept (None: the profile's)


@dataclass(frozen=True)
class EvalRun:
    """One engine of a plan: a policy with its budget, position scheme and local window."""

    policy: str
    budget: int | None
    positions: str = "absolute"
    local_window: int | None = None

    def open(self, artifact: Path, kv_dtype: str | None = None,
             backend: BackendFactory = OnnxruntimeBackend.open) -> Engine:
        return Engine.open(artifact, self.policy, budget=self.budget, kv_dtype=kv_dtype, positions=self.positions,
                           local_window=self.local_window, backend=backend)

    def fields(self, engine: Engine) -> dict:
        return {"policy": self.policy, "positions": self.positions, "budget": self.budget,
                "local_window": engine.local_window}

    def label(self) -> str:
        window = "" if self.local_window is None else f" window {self.local_window}"
        return f"{self.policy:<9} {self.positions:<8}{window} budget {self.budget or 'full':>5}"


DENSE_RUN = EvalRun("dense", None)


def plan_runs(plan: EvalPlan) -> list[EvalRun]:
    """Every budget, scheme and window for the selecting policies, one run for dense (absolute positions in
    its static cache, no selection)."""
    runs = []
    for policy in plan.policies:
        runs += [DENSE_RUN] if policy == "dense" else [
            EvalRun(policy, b, s, w) for b in plan.budgets for s in plan.positions for w in plan.local_windows]
    return runs


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_retrieval(artifact: Path, task: str, plan: EvalPlan, seed: int = 0,
                  prefill_progress: PrefillProgress | None = None) -> Iterator[dict]:
    """One row per policy, budget, context and depth, as each is measured. `prefill_progress(n)`, given a
    prompt's n tokens, is a context around its prefill that yields the engine's on_prefill (or None)."""
    for run in dict.fromkeys(plan_runs(plan)):
        engine = run.open(artifact, plan.kv_dtype, plan.backend)
        try:
            tokenizer = ArtifactTokenizer.load(engine.manifest)
            for context in plan.contexts:
                for i, depth in enumerate(plan.depths):
                    engine.reset()
                    prompt = task_prompt(task, tokenizer.encode, context, depth, seed + i)
                    progress = prefill_progress(len(prompt.tokens)) if prefill_progress else nullcontext()
                    with progress as on_prefill:
                        reply = tokenizer.decode(list(engine.generate(prompt.tokens, ANSWER_TOKENS[task],
                                                                      Sampler(SamplingConfig()), eos_ids=set(),
                                                                      on_prefill=on_prefill)))
                    row = {"task": task, **run.fields(engine), "context": len(prompt.tokens),
                           "requested_context": context, "depth": depth, "answer": prompt.answer,
                           "reply": reply, "correct": prompt.answer in reply}
                    log(f"  {task} {run.label()} context {len(prompt.tokens):>6} "
                         f"depth {depth:4.0%}: {'right' if row['correct'] else 'wrong'} {reply!r}")
                    yield row
        finally:
            engine.close()


def record_rows(measured: Iterable[dict], json_path: Path | None, header: dict) -> list[dict]:
    """The rows as they are measured. json_path is rewritten after each row, "complete" false until the
    last, so a run that is stopped or fails keeps what it measured."""
    rows: list[dict] = []

    def write(complete: bool) -> None:
        if json_path:
            json_path.write_text(json.dumps({**header, "complete": complete, "rows": rows}, indent=1))

    for row in measured:
        rows.append(row)
        write(complete=False)
    write(complete=True)
    return rows


def self_written_text(artifact: Path, tokens_needed: int) -> list[int]:
    """Text the model writes itself from a fixed seed (quest policy, sampled), for agreement without --text."""
    engine = Engine.open(artifact, "quest")
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        prompt = tokenizer.chat_prompt([{"role": "user", "content": SELF_TEXT_PROMPT}])
        text = list(prompt)
        sampler = Sampler(SELF_TEXT_SAMPLING)
        while len(text) < tokens_needed:
            # No EOS stop: when the model ends its text it is asked to go on.
            text += list(engine.generate(text[len(engine.tokens):], min(512, tokens_needed - len(text)), sampler,
                                         eos_ids=set()))
            log(f"  self-written text: {len(text)}/{tokens_needed} tokens")
        return text[:tokens_needed]
    finally:
        engine.close()


def teacher_forced_logits(engine: Engine, tokens: list[int], scored: int) -> np.ndarray:
    """Logits predicting each of the last `scored` tokens (what comes before them is prefilled)."""
    engine.reset()
    logits = [engine.prefill(tokens[:len(tokens) - scored])]
    for token in tokens[len(tokens) - scored:-1]:
        logits.append(engine.decode(token))
    return np.stack(logits)


def forced_logits(artifact: Path, run: EvalRun, tokens: list[int], scored: int, kv_dtype: str | None = None,
                  backend: BackendFactory = OnnxruntimeBackend.open) -> tuple[np.ndarray, dict]:
    """The run's teacher-forced logits of the last `scored` tokens, and its row fields."""
    engine = run.open(artifact, kv_dtype, backend)
    try:
        return teacher_forced_logits(engine, tokens, scored), run.fields(engine)
    finally:
        engine.close()


def run_agreement(artifact: Path, text: list[int], plan: EvalPlan, scored: int,
                  reference: Path | None = None) -> Iterator[dict]:
    """Top-1 agreement and mean KL over the last `scored` tokens of each context, and perplexity: one row
    per context, policy and budget, as each is measured.

    The reference is the artifact's own dense run, or with `reference` (another artifact of the same
    model, e.g. the float32 one for an INT8 artifact, or the same one for plan.kv_dtype) that artifact
    under the same policy and budget, with its profile's KV dtype."""
    for context in plan.contexts:
        if context > len(text):
            raise EdgekvError(f"the text has {len(text)} tokens, fewer than the context {context}; give a longer --text")
        tokens = text[:context]
        targets = np.array(tokens[len(tokens) - scored:])  # logits[i] predicts tokens[len - scored + i]
        dense = None
        runs = dict.fromkeys(plan_runs(plan) if reference else [DENSE_RUN] + plan_runs(plan))
        for run in runs:
            start = time.perf_counter()
            logits, fields = forced_logits(artifact, run, tokens, scored, plan.kv_dtype, plan.backend)
            seconds, reference_seconds = time.perf_counter() - start, None
            if reference is not None:
                start = time.perf_counter()
                against, _ = forced_logits(reference, run, tokens, scored)  # its profile's KV dtype, on the CPU
                reference_seconds = time.perf_counter() - start
            else:
                dense = logits if dense is None else dense
                against = dense
            row = {"task": "agreement", **fields, "context": context, "scored_tokens": scored,
                   "reference": str(reference) if reference else "dense",
                   "top1_agreement": top1_agreement(logits, against), "mean_kl": mean_kl(logits, against),
                   "perplexity": perplexity(logits, targets),
                   # wall time of each run (open, prefill, decode): the backend's against the reference's (CPU)
                   "seconds": round(seconds, 2), "reference_seconds": reference_seconds and round(reference_seconds, 2)}
            log(f"  agreement {run.label()} context {context:>6}: top-1 "
                 f"{row['top1_agreement']:.3f}, KL {row['mean_kl']:.4f}, perplexity {row['perplexity']:.2f}")
            yield row


def plot_eval(rows: list[dict], path: Path, title: str) -> None:
    metric = "top1_agreement" if rows and rows[0]["task"] == "agreement" else "correct"
    fig, ax = new_axes()
    key = ("policy", "positions", "local_window")
    for run in dict.fromkeys(tuple(r[k] for k in key) for r in rows):
        for context in dict.fromkeys(r.get("requested_context", r["context"]) for r in rows):
            mine = [r for r in rows if tuple(r[k] for k in key) == run
                    and r.get("requested_context", r["context"]) == context]
            budgets = sorted({r["budget"] for r in mine if r["budget"] is not None})
            if budgets:
                ys = [np.mean([float(r[metric]) for r in mine if r["budget"] == b]) for b in budgets]
                policy, positions, window = run
                ax.plot(budgets, ys, "o-", label=f"{policy} ({positions}, window {window}), {context} tokens")
            else:  # dense: one level across the budgets
                ax.axhline(np.mean([float(r[metric]) for r in mine]), linestyle="--", alpha=0.7,
                           label=f"dense, {context} tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode budget (tokens)")
    ax.set_ylabel("top-1 agreement with dense" if metric == "top1_agreement" else "accuracy")
    ax.set_ylim(0, 1.05)
    save_figure(fig, ax, path, title)
