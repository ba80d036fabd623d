"""`edgekv calibrate`: the smallest static decode budgets that keep this model's answers right.

1. Attention mass. Calibration prompts run through the real runtime (quest, the artifact's budgets) and
   their last `scored` tokens are decoded teacher-forced. At each decode step and layer, the layer's query
   and all its cached keys give the dense attention; Quest's page ranking gives, for every candidate
   budget at once, the share of it that the selected pages hold (sink + current page + top-ranked pages).
2. Budget sets. For a mass level m, each layer takes the smallest candidate budget whose mass reaches m.
   The levels are bisected for the cheapest set whose top-1 agreement with dense (teacher-forced over the
   scored tokens, through the real runtime with those per-layer budgets) meets the target.
3. Held-out prompts, which calibration did not see, check the chosen set.
4. The chosen budgets become the profile's kv.layer_budgets; the artifact is exported again with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgekv.calibration.prompts import CALIBRATION_SEED, text_tokens
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry, load_verified, read_manifest
from edgekv.evaluation.evaluate import teacher_forced_logits
from edgekv.evaluation.metrics import top1_agreement
from edgekv.evaluation.tasks import task_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.selection import quest_page_scores
from edgekv.runtime.tokens import ArtifactTokenizer

# Mass levels searched for the budget sets; 1.0 gives every layer its largest candidate.
MASS_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


@dataclass
class BudgetSet:
    level: float
    layer_budgets: list[int]
    agreement: float | None = None

    @property
    def mean_budget(self) -> float:
        return float(np.mean(self.layer_budgets))


@dataclass
class Calibration:
    candidates: list[int]  # budgets (tokens) whose attention mass is measured
    mass: np.ndarray  # [layers, candidates]: share of dense attention the selection holds (nan: above the graph)
    searched: list[BudgetSet] = field(default_factory=list)
    chosen: BudgetSet | None = None
    held_out_agreement: float | None = None


def candidate_budgets(page_size: int, largest: int) -> list[int]:
    """Powers of two from 4 pages up to the largest decode graph budget (and that budget itself)."""
    budgets, b = [], 4 * page_size
    while b < largest:
        budgets.append(b)
        b *= 2
    return budgets + [largest]


def captured_mass(q: np.ndarray, keys: np.ndarray, bounds: np.ndarray, page_size: int, scaling: float,
                  candidates: list[int]) -> np.ndarray:
    """Share of one decode query's dense attention that a quest selection of each candidate budget holds,
    averaged over query heads. q [q_heads, head_dim]; keys [kv_heads, T, head_dim]; bounds as LayerPages.bounds()."""
    kv_heads, length, head_dim = keys.shape
    groups = q.shape[0] // kv_heads
    logits = np.einsum("hgd,htd->hgt", q.reshape(kv_heads, groups, head_dim), keys) * scaling
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    n_pages = -(-length // page_size)
    padded = np.zeros((kv_heads, groups, n_pages * page_size), np.float32)
    padded[..., :length] = probs
    page_mass = padded.reshape(kv_heads, groups, n_pages, page_size).sum(-1)  # [kv, G, pages]
    first_new = (length - 1) // page_size  # the page the step writes, as in Engine._forward
    always = page_mass[..., 0] + page_mass[..., first_new:].sum(-1) if first_new else page_mass.sum(-1)
    if first_new > 1:
        order = np.argsort(-quest_page_scores(q[:, None, :], bounds, slice(1, first_new)), axis=1)  # [kv, m]
        ranked = np.take_along_axis(page_mass[..., 1:first_new], order[:, None, :], axis=-1)
        cumulative = np.concatenate([np.zeros((kv_heads, groups, 1), np.float32), np.cumsum(ranked, -1)], -1)
    else:
        cumulative = np.zeros((kv_heads, groups, 1), np.float32)
    shares = []
    for budget in candidates:
        room = budget // page_size - 1 - (n_pages - first_new)
        shares.append(float(np.mean(always + cumulative[..., min(max(room, 0), cumulative.shape[-1] - 1)])))
    return np.array(shares)


def measure_mass(artifact: Path, prompts: list[list[int]], scored: int, candidates: list[int],
                 progress: Callable[[str], None]) -> np.ndarray:
    """[layers, candidates] mean captured attention mass over the scored decode steps of the prompts."""
    # Quest's scores of every page at its own position: what every position scheme uses inside the trained
    # context, and what the far schemes stop keeping for far pages (so `absolute`, which keeps them).
    engine = Engine.open(artifact, "quest", positions="absolute")
    model = engine.manifest.model
    scaling = 1.0 / math.sqrt(model["head_dim"])
    graph_budgets = [g.budget for g in engine.manifest.variant("budget-decode")[1:]]
    totals = np.zeros((model["layers"], len(candidates)))
    steps = 0

    def record(graph: GraphEntry, inputs: dict[str, np.ndarray]) -> None:
        if graph.kind == "qkv" or graph.seq_len != 1:
            return
        pages = engine.cache.layers[graph.layer]
        keys, _ = pages.read()
        totals[graph.layer] += captured_mass(inputs["q_in"][:, -1], keys, pages.bounds(), pages.page_size,
                                             scaling, candidates)

    try:
        for i, prompt in enumerate(prompts):
            engine.reset()
            engine.prefill(prompt[:len(prompt) - scored])
            engine.on_graph = record
            for token in prompt[len(prompt) - scored:]:
                engine.decode(token)
            engine.on_graph = None
            steps += scored
            progress(f"attention mass: prompt {i + 1}/{len(prompts)} ({len(prompt)} tokens, {scored} decode steps)")
    finally:
        engine.close()
    mass = totals / steps
    for layer, graph_budget in enumerate(graph_budgets):
        mass[layer, [c > graph_budget for c in candidates]] = np.nan  # the layer's graph cannot hold them
    return mass


def budgets_for_level(mass: np.ndarray, candidates: list[int], level: float) -> list[int]:
    """Each layer's smallest candidate whose mass reaches `level` (its largest available one otherwise)."""
    chosen = []
    for row in mass:
        available = [(c, m) for c, m in zip(candidates, row) if not np.isnan(m)]
        chosen.append(next((c for c, m in available if m >= level), available[-1][0]))
    return chosen


def dense_references(artifact: Path, prompts: list[list[int]], scored: int) -> list[np.ndarray]:
    engine = Engine.open(artifact, "dense")
    try:
        return [teacher_forced_logits(engine, prompt, scored) for prompt in prompts]
    finally:
        engine.close()


def agreement_with(artifact: Path, prompts: list[list[int]], scored: int, references: list[np.ndarray],
                   layer_budgets: list[int]) -> float:
    """Top-1 agreement with dense, pooled over the scored tokens of every prompt."""
    engine = Engine.open(artifact, "quest", layer_budgets=layer_budgets)
    try:
        logits = [teacher_forced_logits(engine, prompt, scored) for prompt in prompts]
    finally:
        engine.close()
    return top1_agreement(np.concatenate(logits), np.concatenate(references))


def search_budgets(artifact: Path, prompts: list[list[int]], scored: int, target: float, mass: np.ndarray,
                   candidates: list[int], progress: Callable[[str], None]) -> tuple[BudgetSet, list[BudgetSet]]:
    """The cheapest budget set (bisecting the mass levels) whose agreement with dense meets the target."""
    references = dense_references(artifact, prompts, scored)
    sets: list[BudgetSet] = []
    for level in MASS_LEVELS:
        budgets = budgets_for_level(mass, candidates, level)
        if not sets or budgets != sets[-1].layer_budgets:
            sets.append(BudgetSet(level, budgets))

    def evaluate(s: BudgetSet) -> float:
        if s.agreement is None:
            s.agreement = agreement_with(artifact, prompts, scored, references, s.layer_budgets)
            progress(f"budgets at attention mass {s.level:g} (mean {s.mean_budget:.0f} tokens): top-1 agreement "
                     f"{s.agreement:.3f} (target {target:g})")
        return s.agreement

    if evaluate(sets[-1]) < target:
        weakest = np.argsort(np.nanmax(mass, axis=1))[:5]
        layers = ", ".join(f"{layer} ({np.nanmax(mass[layer]):.3f})" for layer in weakest)
        raise EdgekvError(f"no budget within this profile meets top-1 agreement {target:g}: the best is "
                          f"{sets[-1].agreement:.3f}, with every layer at its largest budget; the layers whose "
                          f"selection holds the least attention there are {layers}; lower --target-agreement or "
                          "export with a profile of a larger decode_budget")
    low, high = 0, len(sets) - 1  # sets[high] meets the target
    while low < high:
        middle = (low + high) // 2
        if evaluate(sets[middle]) >= target:
            high = middle
        else:
            low = middle + 1
    return sets[high], [s for s in sets if s.agreement is not None]


def calibration_and_held_out_prompts(artifact: Path, context: int, text_file: Path | None
                                     ) -> tuple[list[list[int]], list[list[int]]]:
    """Calibration: a text slice and a Retrieve.KV prompt. Held out: the next slice of the same text and a
    Retrieve.Number prompt of another seed, which calibration never runs."""
    encode = ArtifactTokenizer.load(read_manifest(artifact)).encode
    text = text_tokens(artifact, 2 * context, text_file)
    calibration = [text[:context], task_prompt("retrieve-kv", encode, context, 0.5, CALIBRATION_SEED).tokens]
    held_out = [text[context:], task_prompt("retrieve-number", encode, context, 0.5, CALIBRATION_SEED + 1).tokens]
    return calibration, held_out


def calibrate_budgets(artifact: Path, target: float, context: int, scored: int, text_file: Path | None,
                      progress: Callable[[str], None]) -> Calibration:
    manifest = load_verified(artifact)
    if "quantization" in manifest.data:
        raise EdgekvError(f"{artifact} is already quantized ({manifest.data['quantization']['weight_dtype']}); "
                          "calibrate its float32 export (add --quantize int8 to get INT8 graphs)")
    if not 0 < target <= 1:
        raise EdgekvError(f"--target-agreement must lie in (0, 1], got {target}")
    if not 2 <= scored < context:
        raise EdgekvError("--scored-tokens must be at least 2 and below --context")
    if context > manifest.model["max_context"]:
        raise EdgekvError(f"--context {context} passes the model's trained context ({manifest.model['max_context']} "
                          "tokens): calibrate inside it, where every position scheme keeps every key's own position")
    profile = manifest.profile
    largest = max(g.budget for g in manifest.variant("budget-decode")[1:])
    candidates = candidate_budgets(profile.page_size, largest)
    progress(f"calibration prompts of {context} tokens (text and retrieval), held-out prompts of the same length")
    prompts, held_out = calibration_and_held_out_prompts(artifact, context, text_file)
    mass = measure_mass(artifact, prompts, scored, candidates, progress)
    result = Calibration(candidates, mass)
    result.chosen, result.searched = search_budgets(artifact, prompts, scored, target, mass, candidates, progress)
    references = dense_references(artifact, held_out, scored)
    result.held_out_agreement = agreement_with(artifact, held_out, scored, references, result.chosen.layer_budgets)
    progress(f"held-out prompts: top-1 agreement {result.held_out_agreement:.3f} with the chosen budgets")
    return result


def plot_calibration(result: Calibration, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.viridis(np.linspace(0, 1, len(result.mass)))
    for layer, (row, color) in enumerate(zip(result.mass, colors)):
        left.plot(result.candidates, row, "o-", color=color, markersize=3, linewidth=1,
                  label=f"layer {layer}" if layer % 5 == 0 else None)
    left.set_xscale("log", base=2)
    left.set_xlabel("decode budget (tokens)")
    left.set_ylabel("share of dense attention held by the selection")
    left.set_title("attention mass against budget, per layer")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    searched = sorted(result.searched, key=lambda s: s.mean_budget)
    right.plot([s.mean_budget for s in searched], [s.agreement for s in searched], "o-", label="calibration prompts")
    right.plot([result.chosen.mean_budget], [result.held_out_agreement], "s", color="C3", label="held-out prompts")
    right.axhline(target, linestyle="--", color="gray", label=f"target {target:g}")
    right.set_xlabel("mean decode budget over the layers (tokens)")
    right.set_ylabel("top-1 agreement with dense")
    right.set_title("agreement of the searched budget sets")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration_report(result: Calibration, artifact: Path, target: float, context: int, scored: int) -> dict:
    def budget_set(s: BudgetSet) -> dict:
        return {"mass_level": s.level, "layer_budgets": s.layer_budgets, "mean_budget": s.mean_budget,
                "agreement": s.agreement}

    return {"artifact": str(artifact), "target_agreement": target, "context": context, "scored_tokens": scored,
            "candidates": result.candidates,
            "mass": [[None if np.isnan(m) else round(float(m), 5) for m in row] for row in result.mass],
            "searched": [budget_set(s) for s in result.searched], "chosen": budget_set(result.chosen),
            "held_out_agreement": result.held_out_agreement}
