"""`edgekv profiles`, `edgekv export`, `edgekv validate` and `edgekv compile`: device profiles and artifacts."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgekv.cli.common import console, mib, out
from edgekv.core.constants import DEFAULT_MODEL, TARGETS
from edgekv.core.manifest import read_manifest
from edgekv.core.profiles import QUANTIZED_WEIGHT_DTYPES, load_profile, shipped_profile_names
from edgekv.export.models import check_model


@click.group(invoke_without_command=True)
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


@click.command()
@click.option("--profile", "profile_spec", default="npu-small", show_default=True,
              help="Shipped profile name or path to a profile TOML file.")
@click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
              help="Built-in model name, Hugging Face model directory, or .gguf file.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Artifact directory [default: artifacts/<model>-<profile>].")
@click.option("--quantize", type=click.Choice(QUANTIZED_WEIGHT_DTYPES), default=None,
              help="float16: weights stored in float16, half the bytes (NPU profiles); int8: QDQ graphs calibrated "
                   "on real activations (NPU profiles); int8-weight-only, int4-weight-only: onnxruntime's CPU "
                   "MatMulNBits kernels over 8-bit or 4-bit weights (CPU profiles); int4-split-activations: the "
                   "same 4-bit weights with float32-accurate activations, closer to float32 and slower "
                   "[default: the profile's weight_dtype].")
@click.option("--calibration-text", type=click.Path(path_type=Path), default=None,
              help="Text file for INT8 QDQ calibration (--quantize int8) [default: text the model writes itself].")
def export(profile_spec: str, model_spec: str, out_dir: Path | None, quantize: str | None,
           calibration_text: Path | None) -> None:
    """Export a model into fixed-shape ONNX graphs for a device profile, then validate it."""
    # Fail on a bad profile or model before any progress display or weight loading, and before the
    # exporter's imports (torch, onnxruntime's quantizers: seconds), so that a typo is refused at once.
    load_profile(profile_spec)
    check_model(model_spec)
    from edgekv.calibration.int8_export import export_for_profile
    from edgekv.export.validator import validate_artifact
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("tracing graphs", total=None)

        def step(name: str, i: int, n: int) -> None:
            bar.update(task, description=f"tracing {name}", completed=i, total=n)

        result = export_for_profile(model_spec, profile_spec, out_dir, progress=lambda s: bar.console.print(s),
                                 step=step, quantize=quantize, calibration_text=calibration_text)
    manifest = read_manifest(result.directory)
    report = validate_artifact(manifest)
    print_summary(manifest, report)
    out.print(f"exported {result.directory} in {result.seconds:.1f} s: {result.graph_count} graphs, "
              f"weights {mib(result.weight_bytes)}, artifact {mib(result.artifact_bytes)}")
    if not report.ok:
        print_violations(report)
        sys.exit(1)


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--profile", "profile_spec", default=None,
              help="Validate against this profile instead of the one the artifact was exported for.")
def validate(directory: Path, profile_spec: str | None) -> None:
    """Check an artifact: manifest, sha256 of every file, static shapes, operators, tensor sizes."""
    from edgekv.export.validator import validate_artifact

    manifest = read_manifest(directory)
    report = validate_artifact(manifest, load_profile(profile_spec) if profile_spec else None)
    print_summary(manifest, report)
    if not report.ok:
        print_violations(report)
        sys.exit(1)
    out.print("[green]valid[/green]")



@click.command("compile")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--target", required=True, type=click.Choice(list(TARGETS)),
              help="qnn-htp: QNN EPContext models for the Hexagon HTP (onnxruntime-qnn; its simulator here); "
                   "openvino: OpenVINO IR for Intel NPUs (the CPU plugin here); rknn-rk3588: .rknn models "
                   "for the RK3588 NPU (rknn-toolkit2, in its own environment: `edgekv install-rknn`).")
@click.option("--precision", type=click.Choice(["float32", "float16"]), default=None,
              help="What the device computes in: float16 is how NPUs run fastest (QNN: the profile's HTP "
                   "architecture and SoC; RKNN: the only one), float32 the exact reference. "
                   "Default: float16 for rknn-rk3588, float32 otherwise.")
def compile_command(directory: Path, target: str, precision: str | None) -> None:
    """Compile every graph of an artifact with the vendor's toolchain; record the compiled files in the manifest."""
    from edgekv.targets.common import compile_artifact
    from edgekv.targets.registry import PRECISIONS, compiler

    precision = precision or PRECISIONS[target]
    read_manifest(directory)  # a clear error for a directory that is no artifact, before the progress bar
    with compiler(target) as compile_graph, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"compiling for {target}", total=None)

        def step(name: str, i: int, n: int) -> None:
            bar.update(task, description=f"compiling {name}", completed=i, total=n)

        compiled = compile_artifact(directory, target, compile_graph, precision, step)
    device = next(iter(compiled.values())).device
    table = Table(title=f"{directory} compiled for {target} ({device}, {precision})")
    for column in ("graph", f"operators on {device}", "falling back to the host CPU", "MiB"):
        table.add_column(column)
    for name, graph in compiled.items():
        on_device = sum(n for key, n in graph.placement.items() if key.endswith("@device"))
        cpu = ", ".join(f"{op} x{n}" for op, n in graph.host_operators.items()) or "-"
        size = sum(f.stat().st_size for f in graph.files)
        table.add_row(name, str(on_device), cpu, f"{size / 2**20:.1f}")
    out.print(table)
    fallbacks = {name for name, graph in compiled.items() if graph.host_operators}
    out.print(f"compiled {len(compiled)} graphs for {target}; "
              + (f"{len(fallbacks)} run operators on the host CPU" if fallbacks else f"every operator on {device}"))


def print_summary(manifest, report) -> None:
    model, profile = manifest.model, manifest.profile
    table = Table(title=f"{manifest.directory}: {model['name']} ({model['architecture']}) for {profile.name}")
    for column in ("variant", "graphs", "tokens/call", "KV budget per layer (tokens)", "k_sel shape"):
        table.add_column(column)
    for variant, names in manifest.data["variants"].items():
        graphs = manifest.variant(variant)
        budgets = [g.budget for g in graphs if g.kind != "qkv"]
        summary = ", ".join(f"{b}x{budgets.count(b)}" for b in dict.fromkeys(budgets))
        k_sel = next(t.shape for t in graphs[1].inputs if t.name == "k_sel")
        table.add_row(variant, str(len(names)), str(graphs[0].seq_len), summary, str(list(k_sel)))
    out.print(table)
    size, where = report.largest_tensor
    out.print(f"{report.graphs} graph files, weights {mib(report.weight_bytes)}, operators "
              f"{len(report.operators)} ({', '.join(sorted(report.operators))}), largest tensor {mib(size)} ({where})")


def print_violations(report) -> None:
    console.print(f"[red]{len(report.violations)} violation(s):[/red]")
    for violation in report.violations:
        console.print(f"  {violation}", highlight=False)


@click.command("install-rknn")
@click.option("--path", type=click.Path(path_type=Path), default=None,
              help="Where to make the environment (default: ~/.cache/edgekv/rknn-toolkit2).")
def install_rknn(path: Path | None) -> None:
    """Make rknn-toolkit2's own Python environment (its pins cannot share edgekv's), from the package registry."""
    from edgekv.targets import rknn

    path = path or rknn.default_environment()
    python = rknn.install_environment(path, console.print)
    out.print(f"rknn-toolkit2 is installed in {path}"
              + ("" if path == rknn.default_environment() else f"; set {rknn.PYTHON_VARIABLE}={python} to use it"))
