"""Markdown tables for RESULTS.md from the JSON files that `edgekv bench`, `edgekv eval` and peers.py wrote.

Usage: .venv/bin/python benchmarks/results_tables.py [RESULTS_DIR]   (default: benchmarks/results)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S


def bench_table(data: dict) -> str:
    lines = ["| policy | context | decode tok/s | x reading | prefill tok/s | TTFT s | peak RSS MiB | KiB moved/token "
             "| graph / select / gather | PROJECTED tok/s on the profile's device |", "|" + "---|" * 10]
    for r in data["rows"]:
        lines.append(f"| {r['policy']} | {r['context']} | {r['decode_tok_s']:.1f} | {r['reading_speed_ratio']:.1f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['ttft_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['transfer_bytes_per_token'] / 1024:.0f} | {r['graph_share']:.0%} / {r['select_share']:.1%} / "
                     f"{r['gather_share']:.1%} | {r['projected']['tok_s']:.1f} (projection) |")
    quest = {r["context"]: r for r in data["rows"] if r["policy"] == "quest"}
    dense = {r["context"]: r for r in data["rows"] if r["policy"] == "dense"}
    if quest:
        base = quest[min(quest)]
        lines.append("")
        for context, r in sorted(quest.items()):
            near = min(dense, key=lambda c: abs(c - context)) if dense else None
            vs = (f", {r['decode_tok_s'] / dense[near]['decode_tok_s']:.2f}x dense at {near} "
                  f"(projected {r['projected']['tok_s'] / dense[near]['projected']['tok_s']:.2f}x)"
                  if near and abs(near - context) < 512 else "")
            lines.append(f"- quest at {context}: {r['decode_tok_s'] / base['decode_tok_s']:.2f} of its "
                         f"{min(quest)}-token speed{vs}")
    return "\n".join(lines)


def retrieval_table(data: dict) -> str:
    """edgekv eval's rows, or selection_oracle.py's (a `selection` instead of a policy, at npu-small's budget)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in data["rows"]:
        policy = r.get("policy") or r["selection"]
        budget = r.get("budget", None if policy == "dense" else "npu-small") or "full"
        groups[(policy, budget, r.get("requested_context", r["context"]))].append(r)
    contexts = sorted({context for _, _, context in groups})
    lines = ["| policy | budget | " + " | ".join(f"{c} tokens" for c in contexts) + " |",
             "|" + "---|" * (2 + len(contexts))]
    for policy, budget in dict.fromkeys((p, b) for p, b, _ in groups):
        cells = []
        for c in contexts:
            rows = groups.get((policy, budget, c), [])
            cells.append(f"{sum(r['correct'] for r in rows)}/{len(rows)}" if rows else "")
        lines.append(f"| {policy} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table(data: dict) -> str:
    lines = ["| policy | budget | context | reference | top-1 agreement | mean KL (nats) | perplexity |",
             "|" + "---|" * 7]
    for r in data["rows"]:
        lines.append(f"| {r['policy']} | {r['budget'] or 'full'} | {r['context']} | {r.get('reference', 'dense')} | "
                     f"{r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | {r['perplexity']:.2f} |")
    return "\n".join(lines)


def calibration_table(data: dict) -> str:
    lines = ["| budget set (attention mass level) | mean decode budget | top-1 agreement with dense |",
             "|---|---|---|"]
    for s in sorted(data["searched"], key=lambda s: s["mean_budget"]):
        lines.append(f"| {s['mass_level']:g} | {s['mean_budget']:.0f} | {s['agreement']:.3f} |")
    chosen = data["chosen"]
    lines += ["", f"- chosen (target {data['target_agreement']:g}): {chosen['layer_budgets']}, mean "
              f"{chosen['mean_budget']:.0f} tokens; agreement {chosen['agreement']:.3f} on the calibration prompts, "
              f"{data['held_out_agreement']:.3f} on held-out prompts ({data['context']} tokens, "
              f"{data['scored_tokens']} scored per prompt)"]
    return "\n".join(lines)


def peers_table(data) -> str:
    rows = data["rows"] if isinstance(data, dict) else data
    contexts = sorted({r["context"] for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {(r["system"], r["context"]): r for r in rows}
    lines = ["| system | " + " | ".join(f"{c} decode / prefill tok/s" for c in contexts) + " |",
             "|" + "---|" * (1 + len(contexts))]
    for s in systems:
        cells = [f"{by[(s, c)]['decode_tok_s']:.1f} / {by[(s, c)]['prefill_tok_s']:.0f}" if (s, c) in by else "-"
                 for c in contexts]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    for policy in [s for s in systems if s.split()[0] in ("quest", "rerank")]:
        for c in contexts:
            ours = by.get((policy, c))
            if ours:
                ratios = ", ".join(f"{ours['decode_tok_s'] / by[(s, c)]['decode_tok_s']:.2f}x {s}"
                                   for s in systems if s != policy and (s, c) in by)
                lines.append(f"- {c} tokens: {policy} {ours['decode_tok_s'] / READING_SPEED_TOKENS_PER_S:.1f}x "
                             f"reading speed; {ratios}")
    return "\n".join(lines)


def render(data) -> str:
    if isinstance(data, list) or "system" in (data.get("rows") or [{}])[0]:
        return peers_table(data)
    if "chosen" in data:
        return calibration_table(data)
    if data.get("task") == "agreement":
        return agreement_table(data)
    if "task" in data:
        return retrieval_table(data)
    return bench_table(data)


def main(directory: str = "benchmarks/results") -> None:
    for path in sorted(Path(directory).glob("*.json")):
        print(f"### {path.name}\n\n{render(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
