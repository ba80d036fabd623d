"""The `edgekv` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgekv.runtime.page_format import KV_DTYPES
from edgekv.runtime.selection import POLICIES
from edgekv.toolkit.errors import EdgekvError
from edgekv.toolkit.models import DEFAULT_MODEL, check_model
from edgekv.toolkit.profiles import QUANTIZED_WEIGHT_DTYPES, load_profile, shipped_profile_names

POLICY_HELP = ("quest: Quest page selection (fastest); rerank: Quest's shortlist re-ranked by attention "
               "(slower; finds facts deep in a long context that quest can miss); streaming: the sink and the "
               "most recent pages; dense: the full-context baseline graphs.")

console = Console(stderr=True)
out = Console(soft_wrap=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@click.group()
@click.version_option(package_name="edgekv")
def cli() -> None:
    """edgekv: unbounded-context LLMs on static-shape NPUs."""


@cli.group(invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """List the shipped device profiles (or `profiles show NAME|PATH`)."""
    if ctx.invoked_subcommand is None:
        for name in shipped_profile_names():
            p = load_profile(name)
            out.print(f"{name:<11} budget {p.decode_budget:>4} tok  chunk {p.prefill_chunk:>3}  "
                      f"{p.int8_tops:g} TOPS  {p.memory_bandwidth_gbps:g} GB/s  {p.description}")


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Print one resolved profile, table by table."""
    profile = load_profile(name)
    for table, values in profile.to_tables().items():
        if isinstance(values, dict):
            out.print(f"[bold]\\[{table}][/bold]")
            for key, value in values.items():
                out.print(f"  {key} = {value}")
        else:
            out.print(f"{table} = {values}")


@cli.command()
@click.option("--profile", "profile_spec", default="npu-small", show_default=True,
              help="Shipped profile name or path to a profile TOML file.")
@click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
              help="Built-in model name, Hugging Face model directory, or .gguf file.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Artifact directory [default: artifacts/<model>-<profile>].")
@click.option("--quantize", type=click.Choice(QUANTIZED_WEIGHT_DTYPES), default=None,
              help="int8: QDQ graphs calibrated on real activations (NPU profiles); int8-weight-only: onnxruntime's "
                   "CPU MatMulNBits kernels (CPU profiles) [default: the profile's weight_dtype].")
@click.option("--calibration-text", type=click.Path(path_type=Path), default=None,
              help="Text file for INT8 QDQ calibration (--quantize int8) [default: text the model writes itself].")
def export(profile_spec: str, model_spec: str, out_dir: Path | None, quantize: str | None,
           calibration_text: Path | None) -> None:
    """Export a model into fixed-shape ONNX graphs for a device profile, then validate it."""
    from edgekv.export.exporter import export_artifact
    from edgekv.export.validator import validate_artifact
    from edgekv.toolkit.manifest import read_manifest

    # Fail on a bad profile or model before any progress display or weight loading.
    load_profile(profile_spec)
    check_model(model_spec)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("tracing graphs", total=None)

        def step(name: str, i: int, n: int) -> None:
            bar.update(task, description=f"tracing {name}", completed=i, total=n)

        result = export_artifact(model_spec, profile_spec, out_dir, progress=lambda s: bar.console.print(s),
                                 step=step, quantize=quantize, calibration_text=calibration_text)
    manifest = read_manifest(result.directory)
    report = validate_artifact(manifest)
    _print_summary(manifest, report)
    out.print(f"exported {result.directory} in {result.seconds:.1f} s: {result.graph_count} graphs, "
              f"weights {_mib(result.weight_bytes)}, artifact {_mib(result.artifact_bytes)}")
    if not report.ok:
        _print_violations(report)
        sys.exit(1)


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--profile", "profile_spec", default=None,
              help="Validate against this profile instead of the one the artifact was exported for.")
def validate(directory: Path, profile_spec: str | None) -> None:
    """Check an artifact: manifest, sha256 of every file, static shapes, operators, tensor sizes."""
    from edgekv.export.validator import validate_artifact
    from edgekv.toolkit.manifest import read_manifest

    manifest = read_manifest(directory)
    report = validate_artifact(manifest, load_profile(profile_spec) if profile_spec else None)
    _print_summary(manifest, report)
    if not report.ok:
        _print_violations(report)
        sys.exit(1)
    out.print("[green]valid[/green]")


def _sampling_options(command):
    """Sampling options shared by generate and chat; unset ones fall back to the model's defaults."""
    for option in reversed([
        click.option("--temperature", type=float, default=None, help="0 = greedy (default unless the model says)."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
    ]):
        command = option(command)
    return command


def _artifact_dir(directory: Path | None) -> Path:
    """DIR, or the default export; a missing default says which command makes it."""
    if directory is not None:
        return directory
    from edgekv.export.exporter import default_out_dir
    from edgekv.toolkit.models import DEFAULT_MODEL

    default = default_out_dir(DEFAULT_MODEL, load_profile("npu-small"))
    if not default.exists():
        raise EdgekvError(f"no artifact at {default}; create it with `edgekv export --profile npu-small` "
                          "or pass an artifact directory")
    return default


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", default=None, help="The prompt text.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--policy", type=click.Choice(list(POLICIES)), default="quest", show_default=True, help=POLICY_HELP)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--stop", "stops", multiple=True, help="Stop when the reply contains this text (repeatable).")
@click.option("--spill-dir", type=click.Path(path_type=Path), default=None,
              help="Where the session directory for spilled KV pages goes [default: system temp].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, stats.")
@_sampling_options
def generate(directory, prompt, prompt_file, raw, policy, max_new_tokens, stops, spill_dir, as_json, temperature,
             top_k, top_p, repetition_penalty, seed) -> None:
    """Generate a reply through the static graphs with the paged KV cache."""
    import json

    from edgekv.runtime.engine import Engine
    from edgekv.runtime.sampling import Sampler, SamplingConfig
    from edgekv.runtime.tokens import ArtifactTokenizer

    if (prompt is None) == (prompt_file is None):
        raise EdgekvError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise EdgekvError(f"prompt file {prompt_file} does not exist")
        prompt = prompt_file.read_text()
    if not prompt.strip():
        raise EdgekvError("empty prompt: give some text with --prompt or --prompt-file")
    engine = Engine.open(_artifact_dir(directory), policy, spill_dir)
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        ids = tokenizer.encode(prompt) if raw else tokenizer.chat_prompt([{"role": "user", "content": prompt}])
        sampler = Sampler(SamplingConfig.from_generation_defaults(
            engine.manifest.data["generation"], temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed))
        stream = None if as_json else tokenizer.streamer(lambda text: print(text, end="", flush=True))
        tokens, stats = engine.run(ids, max_new_tokens, sampler, tokenizer.eos_ids, tokenizer.decode,
                                   stop=tokenizer.stop_check(stops), on_token=stream)
        text = tokenizer.decode(tokens)
        if as_json:
            print(json.dumps({"text": text, "token_ids": tokens, "stats": stats.to_dict()}))
        else:
            print()
            console.print(f"[dim]{stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s decode "
                          f"({stats.reading_speed_ratio:.1f}x reading speed), {stats.words_per_s:.1f} words/s, "
                          f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tok_s:.0f} tok/s, "
                          f"pages device/host/disk {stats.pages['device']}/{stats.pages['host']}/"
                          f"{stats.pages['disk']}[/dim]")
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]")
        sys.exit(130)
    finally:
        engine.close()


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--system", default=None, help="System prompt [default: the chat template's own].")
@click.option("--policy", type=click.Choice(list(POLICIES)), default="quest", show_default=True, help=POLICY_HELP)
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Longest reply.")
@click.option("--spill-dir", type=click.Path(path_type=Path), default=None,
              help="Where the session directory for spilled KV pages goes [default: system temp].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per turn: reply and stats.")
@_sampling_options
def chat(directory, system, policy, max_new_tokens, spill_dir, as_json, temperature, top_k, top_p,
         repetition_penalty, seed) -> None:
    """Talk to an exported model; the conversation keeps its KV cache from turn to turn, without limit.

    On a terminal: an interactive chat (/help lists the commands). Otherwise each input line is one
    user turn and replies go to standard output.
    """
    from edgekv.runtime.conversation import Conversation
    from edgekv.runtime.engine import Engine
    from edgekv.runtime.sampling import SamplingConfig
    from edgekv.runtime.tokens import ArtifactTokenizer
    from edgekv.toolkit.chat import ChatLoop

    engine = Engine.open(_artifact_dir(directory), policy, spill_dir)
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        sampling = SamplingConfig.from_generation_defaults(
            engine.manifest.data["generation"], temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed)
        interactive = sys.stdin.isatty()
        if interactive:
            import readline  # noqa: F401  (line editing and history for input())
        loop = ChatLoop(Conversation(engine, tokenizer, sampling, system), max_new_tokens, interactive, as_json)
        loop.run(input if interactive else _read_stdin_line)
    finally:
        engine.close()


def _read_stdin_line(_prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--contexts", default="1024,2048,4096,8192,16384", show_default=True, help="Comma-separated token counts.")
@click.option("--policies", default="quest,streaming,dense", show_default=True)
@click.option("--steps", type=int, default=16, show_default=True, help="Timed decode tokens per point.")
@click.option("--kv-dtype", type=click.Choice(list(KV_DTYPES)), default=None,
              help="How KV pages are stored in the host and disk tiers [default: the profile's kv_dtype].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="PNG of decode tokens/s against context, with human reading speed.")
def bench(directory, contexts, policies, steps, kv_dtype, json_path, plot_path) -> None:
    """Decode and prefill speed per policy and context, measured here and projected on the profile's device."""
    import json

    from edgekv.evaluation.bench import plot_bench, run_bench
    from edgekv.toolkit.manifest import load_verified

    artifact = _artifact_dir(directory)
    manifest = load_verified(artifact)
    context_list = _int_list(contexts, "--contexts")
    policy_list = policies.split(",")
    unknown = [p for p in policy_list if p not in POLICIES]
    if unknown:
        raise EdgekvError(f"unknown policy '{unknown[0]}' in --policies; choose from: {', '.join(POLICIES)}")
    if steps < 1:
        raise EdgekvError("--steps must be at least 1")
    rows = run_bench(artifact, policy_list, context_list, steps, kv_dtype)
    device = manifest.profile.name
    table = Table(title=f"edgekv bench: {manifest.model['name']} on this machine, and projected on {device}")
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
        json_path.write_text(json.dumps({"artifact": str(artifact), "profile": device, "steps": steps,
                                         "kv_dtype": kv_dtype or manifest.profile.kv_dtype, "rows": rows}, indent=1))
    if plot_path:
        plot_bench(rows, plot_path, f"{manifest.model['name']}, {device} budgets (dashed: projected on {device})")


@cli.command()
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
    from edgekv.export.exporter import export_artifact
    from edgekv.export.validator import validate_artifact
    from edgekv.toolkit.manifest import load_verified, read_manifest
    from edgekv.toolkit.profiles import profile_toml

    artifact = _artifact_dir(directory)
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
    result_export = export_artifact(source, str(profile_path), out_dir, progress=say, quantize=quantize,
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
        _print_violations(validation)
        sys.exit(1)


@cli.command("eval")
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--task", type=click.Choice(["passkey", "retrieve-number", "retrieve-kv", "agreement"]), required=True)
@click.option("--contexts", default="2048,4096,8000", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Where the answer sits (retrieval).")
@click.option("--budgets", default=None, help="Decode budgets up to the artifact's [default: the artifact's own].")
@click.option("--policies", default="quest,streaming,dense", show_default=True)
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="agreement: the text [default: text the model writes itself from a fixed seed].")
@click.option("--scored-tokens", type=int, default=128, show_default=True,
              help="agreement: the last tokens of each context that are compared.")
@click.option("--kv-dtype", type=click.Choice(list(KV_DTYPES)), default=None,
              help="How KV pages are stored in the host and disk tiers [default: the profile's kv_dtype].")
@click.option("--reference", "reference_dir", type=click.Path(path_type=Path), default=None,
              help="agreement: compare with this artifact (e.g. the float32 one) under the same policy and budget, "
                   "instead of with dense.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="PNG of accuracy (or agreement) against budget.")
def evaluate(directory, task, contexts, depths, budgets, policies, text_file, scored_tokens, kv_dtype,
             reference_dir, json_path, plot_path) -> None:
    """Long-context accuracy per context, depth and budget; or agreement of each policy with dense."""
    from edgekv.evaluation.evaluate import (EvalPlan, plot_eval, record_rows, run_agreement, run_retrieval,
                                            self_written_text)
    from edgekv.runtime.tokens import ArtifactTokenizer
    from edgekv.toolkit.manifest import load_verified

    artifact = _artifact_dir(directory)
    manifest = load_verified(artifact)
    policy_list = policies.split(",")
    unknown = [p for p in policy_list if p not in POLICIES]
    if unknown:
        raise EdgekvError(f"unknown policy '{unknown[0]}' in --policies; choose from: {', '.join(POLICIES)}")
    try:
        depth_list = [float(d) for d in depths.split(",")]
    except ValueError:
        raise EdgekvError("--depths takes comma-separated fractions, e.g. 0,0.5,1") from None
    if any(not 0 <= d <= 1 for d in depth_list):
        raise EdgekvError("--depths must lie between 0 and 1")
    plan = EvalPlan(_int_list(contexts, "--contexts"), depth_list,
                    _int_list(budgets, "--budgets") if budgets else [manifest.profile.decode_budget], policy_list,
                    kv_dtype)
    header = {"artifact": str(artifact), "task": task, "kv_dtype": kv_dtype or manifest.profile.kv_dtype}
    if "dense" in policy_list and max(plan.contexts) > manifest.model["max_context"]:
        raise EdgekvError(f"the dense baseline stops at {manifest.model['max_context']} tokens; lower --contexts "
                          "or leave dense out of --policies")
    if task == "agreement":
        if not 2 <= scored_tokens < min(plan.contexts):
            raise EdgekvError("--scored-tokens must be at least 2 and below the smallest context")
        if text_file is not None:
            if not text_file.is_file():
                raise EdgekvError(f"text file {text_file} does not exist")
            text = ArtifactTokenizer.load(manifest).encode(text_file.read_text())
            if len(text) < max(plan.contexts):
                raise EdgekvError(f"{text_file} has {len(text)} tokens, fewer than the largest context "
                                  f"{max(plan.contexts)}; give a longer text or smaller --contexts")
        else:
            text = self_written_text(artifact, max(plan.contexts))
        if reference_dir is not None:
            reference = load_verified(reference_dir)
            if reference.model["source_sha256"] != manifest.model["source_sha256"]:
                raise EdgekvError(f"--reference {reference_dir} holds another model than {artifact}; compare two "
                                  "exports of the same model")
        rows = record_rows(run_agreement(artifact, text, plan, scored_tokens, reference_dir), json_path, header)
        against = f"{reference_dir} (same policy and budget)" if reference_dir else "dense"
        table = Table(title=f"agreement with {against} over the last {scored_tokens} tokens of each context")
        for column in ("policy", "budget", "context", "top-1 agreement", "mean KL", "perplexity"):
            table.add_column(column, justify="right")
        for r in rows:
            table.add_row(r["policy"], str(r["budget"] or "full"), str(r["context"]), f"{r['top1_agreement']:.3f}",
                          f"{r['mean_kl']:.4f}", f"{r['perplexity']:.2f}")
    else:
        rows = record_rows(run_retrieval(artifact, task, plan), json_path, header)
        table = Table(title=f"{task}: share of right answers over {len(depth_list)} depths")
        for column in ("policy", "budget", "context", "accuracy", "right at depths"):
            table.add_column(column, justify="right")
        groups = dict.fromkeys((r["policy"], r["budget"], r["requested_context"]) for r in rows)
        for policy, budget, context in groups:
            mine = [r for r in rows if (r["policy"], r["budget"], r["requested_context"]) == (policy, budget, context)]
            table.add_row(policy, str(budget or "full"), str(context), f"{np.mean([r['correct'] for r in mine]):.2f}",
                          " ".join(f"{r['depth']:g}" for r in mine if r["correct"]) or "-")
    (out if out.is_terminal else Console(width=200)).print(table)
    if plot_path:
        plot_eval(rows, plot_path, f"{task}: {manifest.model['name']}, {manifest.profile.name}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise EdgekvError(f"{option} takes comma-separated integers, e.g. 1024,4096") from None
    if any(v < 2 for v in values):
        raise EdgekvError(f"{option} values must be at least 2 tokens")
    return values


def _print_summary(manifest, report) -> None:
    model, profile = manifest.model, manifest.profile
    table = Table(title=f"{manifest.directory}: {model['name']} ({model['architecture']}) for {profile.name}")
    for column in ("variant", "graphs", "tokens/call", "KV budget per layer (tokens)", "k_sel shape"):
        table.add_column(column)
    for variant, names in manifest.data["variants"].items():
        graphs = manifest.variant(variant)
        budgets = [g.budget for g in graphs if g.kind != "embed"]
        summary = ", ".join(f"{b}x{budgets.count(b)}" for b in dict.fromkeys(budgets))
        k_sel = next(t.shape for t in graphs[1].inputs if t.name == "k_sel")
        table.add_row(variant, str(len(names)), str(graphs[0].seq_len), summary, str(list(k_sel)))
    out.print(table)
    size, where = report.largest_tensor
    out.print(f"{report.graphs} graph files, weights {_mib(report.weight_bytes)}, operators "
              f"{len(report.operators)} ({', '.join(sorted(report.operators))}), largest tensor {_mib(size)} ({where})")


def _print_violations(report) -> None:
    console.print(f"[red]{len(report.violations)} violation(s):[/red]")
    for violation in report.violations:
        console.print(f"  {violation}", highlight=False)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except EdgekvError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
