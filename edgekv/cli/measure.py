"""`edgekv bench`, `edgekv eval` and `edgekv calibrate`: speed, accuracy and fitted budgets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from edgekv.cli.artifacts import print_violations
from edgekv.cli.common import (POSITIONS_HELP, backend_option, int_list, out, parse_policies,
                               parse_positions, positions_option, prefill_bar)
from edgekv.core.constants import DEFAULT_POLICY, KV_DTYPES, POLICIES
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import artifact_dir
from edgekv.core.manifest import load_verified, read_manifest
from edgekv.core.profiles import QUANTIZED_WEIGHT_DTYPES
from edgekv.evaluation.tasks import TASKS

# bench and eval compare the default policy with the others (the baselines quest, streaming and dense).
COMPARED_POLICIES = ",".join([DEFAULT_POLICY, *(p for p in POLICIES if p != DEFAULT_POLICY)])


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--contexts", default="1024,2048,4096,8192,16384", show_default=True, help="Comma-separated token counts.")
@click.option("--policies", default=COMPARED_POLICIES, show_default=True)
@click.option("--steps", type=int, default=16, show_default=True, help="Timed decode tokens per point.")
@click.option("--kv-dtype", type=click.Choice(list(KV_DTYPES)), default=None,
              help="How KV pages are stored in the host and disk tiers [default: the profile's kv_dtype].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="PNG of decode tokens/s against context, with human reading speed.")
@positions_option
@backend_option
def bench(directory, contexts, policies, steps, kv_dtype, json_path, plot_path, positions, backend) -> None:
    """Decode and prefill speed per policy and context, measured here and projected on the profile's device."""
    import json

    from edgekv.evaluation.bench import plot_bench, run_bench
    from edgekv.targets.registry import BACKENDS, backend_name

    artifact = artifact_dir(directory)
    manifest = load_verified(artifact)
    backend = backend_name(backend, manifest)
    context_list = int_list(contexts, "--contexts")
    policy_names = parse_policies(policies)
    if steps < 1:
        raise EdgekvError("--steps must be at least 1")
    positions = positions or manifest.profile.positions
    rows = run_bench(artifact, policy_names, context_list, steps, kv_dtype, BACKENDS[backend], positions)
    device = manifest.profile.name
    table = Table(title=f"edgekv bench: {manifest.model['name']} on this machine ({backend} backend), and projected "
                        f"on {device}")
    for column in ("policy", "context", "decode tok/s", "x reading", "prefill tok/s", "TTFT s", "peak RSS MiB",
                   "KV MiB dev/host/disk", "KiB moved/token", "graph/select/gather", f"PROJECTED tok/s on {device}"):
        table.add_column(column, justify="right")
    for r in rows:
        kv = "/".join(f"{r['kv_bytes'][tier] / 2**20:.0f}" for tier in ("device", "host", "disk"))
        table.add_row(r["policy"], str(r["context"]), f"{r['decode_tok_s']:.1f}", f"{r['reading_speed_ratio']:.1f}",
                      f"{r['prefill_tok_s']:.0f}", f"{r['ttft_s']:.1f}", f"{r['peak_rss_mib']:.0f}", kv,
                      f"{r['transfer_bytes_per_token'] / 1024:.0f}",
                      f"{r['graph_share']:.0%}/{r['select_share']:.0%}/{r['gather_share']:.0%}",
                      f"{r['projected']['tok_s']:.1f}")
    (out if out.is_terminal else Console(width=200)).print(table)
    if json_path:
        json_path.write_text(json.dumps({"artifact": str(artifact), "profile": device, "backend": backend, "steps": steps,
                                         "kv_dtype": kv_dtype or manifest.profile.kv_dtype, "positions": positions,
                                         "rows": rows}, indent=1))
    if plot_path:
        plot_bench(rows, plot_path, f"{manifest.model['name']}, {device} budgets (dashed: projected on {device})")


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--target-agreement", type=float, default=0.99, show_default=True,
              help="Top-1 agreement with dense that the budgets must keep.")
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Calibration text [default: text the model writes itself from a fixed seed].")
@click.option("--context", type=int, default=2048, show_default=True, help="Tokens per calibration prompt.")
@click.option("--scored-tokens", type=int, default=64, show_default=True,
              help="Decode steps per prompt whose attention and agreement are measured.")
@click.option("--quantize", type=click.Choice(QUANTIZED_WEIGHT_DTYPES), default=None,
              help="Export the calibrated graphs in INT8 (as in edgekv export).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Calibrated artifact [default: artifacts/<model>-<profile>-calibrated].")
def calibrate(directory, target_agreement, text_file, context, scored_tokens, quantize, out_dir) -> None:
    """Fit per-layer decode budgets to a fidelity target, write the calibrated profile and re-export."""
    import dataclasses
    import json

    from edgekv.calibration.budgets import calibrate_budgets, calibration_report, plot_calibration
    from edgekv.calibration.int8_export import export_for_profile
    from edgekv.core.profiles import profile_toml
    from edgekv.export.validator import validate_artifact

    artifact = artifact_dir(directory)
    manifest = load_verified(artifact)
    if text_file is not None and not text_file.is_file():
        raise EdgekvError(f"calibration text {text_file} does not exist; pass an existing --text FILE")
    profile = manifest.profile
    suffix = f"-{quantize}" if quantize else ""
    out_dir = out_dir or artifact.with_name(f"{artifact.name}-calibrated{suffix}")
    say = lambda text: out.print(text)  # noqa: E731
    result = calibrate_budgets(artifact, target_agreement, context, scored_tokens, text_file, say)

    calibrated = dataclasses.replace(profile, name=f"{profile.name}-calibrated",
                                     description=f"{profile.description}; decode budgets calibrated for "
                                                 f"{manifest.model['name']} at top-1 agreement {target_agreement:g}",
                                     layer_budgets=tuple(result.chosen.layer_budgets))
    profile_path = out_dir.with_name(out_dir.name + ".profile.toml")
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    profile_path.write_text(profile_toml(calibrated))
    report = calibration_report(result, artifact, target_agreement, context, scored_tokens)
    report["profile"], report["calibrated_artifact"] = str(profile_path), str(out_dir)
    report_path = out_dir.with_name(out_dir.name + ".calibration.json")
    report_path.write_text(json.dumps(report, indent=1))
    plot_calibration(result, target_agreement, out_dir.with_name(out_dir.name + ".calibration.png"),
                     f"{manifest.model['name']} on {profile.name}: budget calibration")

    source = manifest.model["source"] if Path(manifest.model["source"]).exists() else manifest.model["name"]
    say(f"exporting {out_dir} with the calibrated profile {profile_path}")
    # The text also calibrates the activation ranges of QDQ graphs; weight-only graphs need none.
    qdq = (quantize or calibrated.weight_dtype) == "int8"
    result_export = export_for_profile(source, str(profile_path), out_dir, progress=say, quantize=quantize,
                                    calibration_text=text_file if qdq else None)
    validation = validate_artifact(read_manifest(result_export.directory))
    chosen = result.chosen
    table = Table(title=f"calibrated decode budgets (target top-1 agreement {target_agreement:g})")
    for column in ("layers", "budget"):
        table.add_column(column)
    for budget in sorted(set(chosen.layer_budgets)):
        layers = [str(i) for i, b in enumerate(chosen.layer_budgets) if b == budget]
        table.add_row(" ".join(layers), str(budget))
    out.print(table)
    original = np.mean([g.budget for g in manifest.variant("budget-decode")[1:]])
    out.print(f"mean decode budget {chosen.mean_budget:.0f} tokens (was {original:.0f}); top-1 agreement with dense: "
              f"{chosen.agreement:.3f} on the calibration prompts, {result.held_out_agreement:.3f} on held-out prompts")
    out.print(f"wrote {profile_path}, {report_path} and its plot; artifact {out_dir}")
    if not validation.ok:
        print_violations(validation)
        sys.exit(1)


@click.command("eval")
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--task", type=click.Choice([*TASKS, "agreement", "perplexity"]), required=True)
@click.option("--contexts", default="2048,4096,8000", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Where the answer sits (retrieval).")
@click.option("--budgets", default=None, help="Decode budgets up to the artifact's [default: the artifact's own].")
@click.option("--policies", default=COMPARED_POLICIES, show_default=True)
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="agreement: the text [default: text the model writes itself from a fixed seed]; perplexity: "
                   "the text [default: Python's language reference, as the standard library ships it].")
@click.option("--window", type=int, default=4096, show_default=True,
              help="perplexity: tokens per window, each window's perplexity reported.")
@click.option("--scored-tokens", type=int, default=128, show_default=True,
              help="agreement: the last tokens of each context that are compared; perplexity: the last tokens "
                   "of each window that are scored.")
@click.option("--kv-dtype", type=click.Choice(list(KV_DTYPES)), default=None,
              help="How KV pages are stored in the host and disk tiers [default: the profile's kv_dtype].")
@click.option("--reference", "reference_dir", type=click.Path(path_type=Path), default=None,
              help="agreement: compare with this artifact (e.g. the float32 one) under the same policy and budget, "
                   "instead of with dense.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="PNG of accuracy (or agreement) against budget.")
@click.option("--positions", default=None,
              help="Position schemes, comma-separated: absolute, clamped, folded, grouped (as in generate) "
                   "[default: the profile's].")
@click.option("--local-windows", default=None,
              help="Tokens of the most recent pages every quest or rerank selection keeps, comma-separated, "
                   "multiples of the page size [default: the profile's kv.local_window].")
@backend_option
def evaluate(directory, task, contexts, depths, budgets, policies, text_file, scored_tokens, kv_dtype,
             reference_dir, json_path, plot_path, positions, local_windows, window, backend) -> None:
    """Long-context accuracy per context, depth and budget; agreement of each policy with dense; or
    perplexity per window of a long text."""
    from edgekv.evaluation.evaluate import (EvalPlan, plot_eval, record_rows, run_agreement, run_retrieval,
                                            self_written_text)
    from edgekv.evaluation.perplexity import plot_perplexity, run_perplexity
    from edgekv.evaluation.tasks import reference_text
    from edgekv.targets.registry import BACKENDS, backend_name

    artifact = artifact_dir(directory)
    manifest = load_verified(artifact)
    backend = backend_name(backend, manifest)
    policy_names = parse_policies(policies)
    try:
        depth_list = [float(d) for d in depths.split(",")]
    except ValueError:
        raise EdgekvError("--depths takes comma-separated fractions, e.g. 0,0.5,1") from None
    if any(not 0 <= d <= 1 for d in depth_list):
        raise EdgekvError("--depths must lie between 0 and 1")
    plan = EvalPlan(int_list(contexts, "--contexts"), depth_list,
                    int_list(budgets, "--budgets") if budgets else [manifest.profile.decode_budget], policy_names,
                    kv_dtype, BACKENDS[backend], parse_positions(positions, manifest.profile.positions),
                    tuple(int_list(local_windows, "--local-windows", 0)) if local_windows else (None,))
    header = {"artifact": str(artifact), "task": task, "kv_dtype": kv_dtype or manifest.profile.kv_dtype,
              "backend": backend}
    if "dense" in policy_names and max(plan.contexts) > manifest.model["max_context"]:
        raise EdgekvError(f"the dense baseline stops at {manifest.model['max_context']} tokens; lower --contexts "
                          "or leave dense out of --policies")
    if task == "perplexity":
        text = eval_text(text_file, manifest, max(plan.contexts),
                         lambda encode: encode(reference_text()), "Python's language reference")
        if not 2 <= scored_tokens < window:
            raise EdgekvError("--scored-tokens must be at least 2 and below --window")
        rows = record_rows(run_perplexity(artifact, text, plan, window, scored_tokens), json_path,
                           {**header, "window": window, "scored_tokens": scored_tokens})
        table = Table(title=f"perplexity of the last {scored_tokens} tokens of each window of {window}")
        for column in ("policy", "positions", "window", "budget", "context", "perplexity per window"):
            table.add_column(column, justify="right")
        key = ("policy", "positions", "local_window", "budget", "context")
        for group in dict.fromkeys(tuple(r[k] for k in key) for r in rows):
            policy, scheme, local, budget, context = group
            table.add_row(policy, scheme, str(local), str(budget or "full"), str(context),
                          " ".join(f"{r['perplexity']:.2f}" for r in rows if tuple(r[k] for k in key) == group))
    elif task == "agreement":
        if not 2 <= scored_tokens < min(plan.contexts):
            raise EdgekvError("--scored-tokens must be at least 2 and below the smallest context")
        text = eval_text(text_file, manifest, max(plan.contexts),
                         lambda _: self_written_text(artifact, max(plan.contexts)), "the self-written text")
        if reference_dir is not None:
            reference = load_verified(reference_dir)
            if reference.model["source_sha256"] != manifest.model["source_sha256"]:
                raise EdgekvError(f"--reference {reference_dir} holds another model than {artifact}; compare two "
                                  "exports of the same model")
        rows = record_rows(run_agreement(artifact, text, plan, scored_tokens, reference_dir), json_path, header)
        against = f"{reference_dir} (same policy and budget)" if reference_dir else "dense"
        table = Table(title=f"agreement with {against} over the last {scored_tokens} tokens of each context")
        for column in ("policy", "positions", "window", "budget", "context", "top-1 agreement", "mean KL",
                       "perplexity"):
            table.add_column(column, justify="right")
        for r in rows:
            table.add_row(r["policy"], r["positions"], str(r["local_window"]), str(r["budget"] or "full"),
                          str(r["context"]), f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.4f}",
                          f"{r['perplexity']:.2f}")
    else:
        rows = record_rows(run_retrieval(artifact, task, plan, prefill_progress=prefill_bar), json_path, header)
        table = Table(title=f"{task}: share of right answers over {len(depth_list)} depths")
        for column in ("policy", "positions", "window", "budget", "context", "accuracy", "right at depths"):
            table.add_column(column, justify="right")
        key = ("policy", "positions", "local_window", "budget", "requested_context")
        for group in dict.fromkeys(tuple(r[k] for k in key) for r in rows):
            mine = [r for r in rows if tuple(r[k] for k in key) == group]
            policy, scheme, local, budget, context = group
            table.add_row(policy, scheme, str(local), str(budget or "full"), str(context),
                          f"{np.mean([r['correct'] for r in mine]):.2f}",
                          " ".join(f"{r['depth']:g}" for r in mine if r["correct"]) or "-")
    (out if out.is_terminal else Console(width=200)).print(table)
    if plot_path:
        plot = plot_perplexity if task == "perplexity" else plot_eval
        plot(rows, plot_path, f"{task}: {manifest.model['name']}, {manifest.profile.name}")


def eval_text(text_file: Path | None, manifest, tokens_needed: int, default: Callable[[Callable], list[int]],
              default_name: str) -> list[int]:
    """The tokens of --text, or default(encode) without it; a clear error when there are too few."""
    from edgekv.runtime.tokens import ArtifactTokenizer

    encode = ArtifactTokenizer.load(manifest).encode
    if text_file is not None and not text_file.is_file():
        raise EdgekvError(f"text file {text_file} does not exist")
    text = encode(text_file.read_text()) if text_file is not None else default(encode)
    if len(text) < tokens_needed:
        raise EdgekvError(f"{text_file or default_name} has {len(text)} tokens, fewer than the largest context "
                          f"{tokens_needed}; give a longer --text or smaller --contexts")
    return text
