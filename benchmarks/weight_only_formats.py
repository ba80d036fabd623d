"""Which weight-only format for the `cpu` profile: MatMulNBits over 8-bit or 4-bit weights, by block size,
zero points, accuracy level and which weights stay 8-bit, measured on agreement, bytes and decode speed.

Usage: .venv/bin/python benchmarks/weight_only_formats.py [--formats int8,int4-b32,...] [--context 2048]
       [--scored 256] [--policies quest,dense] [--kv-dtype float32] [--rounds 3] [--json FILE]

The float32 graphs of the `cpu` profile are exported once (into WORK_DIR/float32; again if the profile
changed) and every format is quantized from them, as `edgekv export --profile cpu --quantize ...` does.
For each format and text, each policy (default `quest` at the profile's budgets, and `dense`) is
teacher-forced over the last `scored` tokens of `context` tokens, against the float32 npu-small artifact
under the same policy (the cpu profile's KV side is npu-small's): top-1 agreement and mean KL, as the
INT8 work measured them. The formats' pages are the cpu profile's (INT8) unless --kv-dtype names another
(float32: the weights' error alone, the reference's pages being float32). The texts:
the README at 3d57c8d (the INT8 tables' text) and Python's language reference (`pydoc_data/topics.py`).

Speed: each round opens every format's engine in turn (one at a time: an idle engine's onnxruntime
threads spin and slow the others), prefills the same 1K random tokens (timed) and times DECODE_STEPS
greedy steps, formats interleaved: medians over rounds (--rounds 0: no speed). --reuse-agreement takes the
agreement rows from the --json file of an earlier run and measures speed alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekv.calibration.int8_export import quantize_artifact  # noqa: E402
from edgekv.calibration.weight_only import INT4_FORMAT, INT4_SPLIT_FORMAT, INT8_FORMAT, WeightOnlyFormat  # noqa: E402
from edgekv.core.manifest import read_manifest  # noqa: E402
from edgekv.evaluation.evaluate import DENSE_RUN, EvalRun, forced_logits  # noqa: E402
from edgekv.evaluation.metrics import mean_kl, top1_agreement  # noqa: E402
from edgekv.runtime.engine import Engine  # noqa: E402
from edgekv.runtime.tokens import ArtifactTokenizer  # noqa: E402

WORK_DIR = REPO / "artifacts" / "weight-only-formats"
REFERENCE = REPO / "artifacts" / "smollm2-135m-instruct-npu-small"
README_COMMIT = "3d57c8d"
FORMATS: dict[str, tuple[str, WeightOnlyFormat]] = {
    "int8": ("int8-weight-only", INT8_FORMAT),
    "int4": ("int4-weight-only", INT4_FORMAT),  # a float offset per block; LM head, queries and keys 8-bit
    "int4-qk4": ("int4-weight-only", replace(INT4_FORMAT, eight_bit=("embed_tokens", "lm_head"))),
    "int4-head4": ("int4-weight-only", replace(INT4_FORMAT, eight_bit=())),
    "int4-acc0": ("int4-weight-only", replace(INT4_FORMAT, accuracy_level=0)),
    "int4-8bit-acc0": ("int4-weight-only", replace(INT4_FORMAT, float_activations=("lm_head", "q_proj", "k_proj"))),
    "int4-qk-b16": ("int4-weight-only", replace(INT4_FORMAT, small_blocks=("q_proj", "k_proj"))),
    # the input and its int8 rounding error as two rows (split_activation_rows), of the 8-bit kernels or all
    "int4-split-8bit": ("int4-weight-only", replace(INT4_FORMAT, split_activations=("embed_tokens", "q_proj",
                                                                                      "k_proj"))),
    "int4-split-head": ("int4-weight-only", replace(INT4_FORMAT, split_activations=("embed_tokens",))),
    "int4-split-qk": ("int4-weight-only", replace(INT4_FORMAT, split_activations=("q_proj", "k_proj"))),
    "int4-split-all": ("int4-split-activations", replace(INT4_SPLIT_FORMAT, chunks_at_level0=False)),
    "int4-split-activations": ("int4-split-activations", INT4_SPLIT_FORMAT),  # prefill chunks' 4-bit at level 0
    "int4-acc0-split-8bit": ("int4-weight-only", replace(INT4_FORMAT, accuracy_level=0,
                                                          split_activations=("embed_tokens", "q_proj", "k_proj"))),
    "int4-zero-point": ("int4-weight-only", replace(INT4_FORMAT, offsets=False)),  # onnxruntime's quantizer
    "int4-symmetric": ("int4-weight-only", replace(INT4_FORMAT, offsets=False, symmetric=True)),
}
PROMPT_TOKENS = 1024
DECODE_STEPS = 16
WARMUP_STEPS = 4


def float_artifact() -> Path:
    """The cpu profile's float32 graphs, with the LM head's weight on the right as the quantizers need."""
    from edgekv.core.profiles import load_profile
    from edgekv.export.exporter import write_float_artifact
    from edgekv.export.models import load_model

    out, profile = WORK_DIR / "float32", load_profile("cpu")
    if (out / "manifest.json").exists():
        # The formats name their weight dtype; any other change of the profile (its operators, budgets)
        # makes the cached graphs stale: the quantizers would refuse them or measure old shapes.
        if replace(read_manifest(out).profile, weight_dtype=profile.weight_dtype) == profile:
            return out
        print(f"{out} was exported under another cpu profile: exporting it again")
        shutil.rmtree(out)
    write_float_artifact(load_model("smollm2-135m-instruct", print), profile, out, None,
                         head_weight_on_right=True)
    return out


def graph_weight_bytes(artifact: Path) -> int:
    """Bytes of the weights the graphs read: a host-only embedding table is left out (a step reads one row),
    the tied LM head's rows, which the host's lookup shares, are in."""
    manifest = read_manifest(artifact)
    read = {name for graph in manifest.data["graphs"].values() for name in graph["weights"]}
    return sum(int(np.prod(e["shape"])) * np.dtype(e["dtype"]).itemsize
               for name, e in manifest.data["weights"].items() if name in read)


def texts(tokenizer: ArtifactTokenizer, context: int) -> dict[str, list[int]]:
    import pydoc_data.topics

    readme = subprocess.run(["git", "show", f"{README_COMMIT}:README.md"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    found = {f"README at {README_COMMIT}": tokenizer.encode(readme),
             "Python language reference": tokenizer.encode(Path(pydoc_data.topics.__file__).read_text())}
    for name, tokens in found.items():
        if len(tokens) < context:
            raise SystemExit(f"{name} has {len(tokens)} tokens, fewer than --context {context}")
    return {name: tokens[:context] for name, tokens in found.items()}


def decode_speed(artifacts: dict[str, Path], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """tok/s of DECODE_STEPS greedy `quest` steps after a 1K prompt, and of the prompt's prefill, formats
    interleaved in each round."""
    rng = np.random.default_rng(0)
    speeds: dict[str, list[float]] = {label: [] for label in artifacts}
    prefill: dict[str, list[float]] = {label: [] for label in artifacts}
    for r in range(rounds):
        prompt = rng.integers(1000, 40000, PROMPT_TOKENS).tolist()
        for label, path in artifacts.items():
            engine = Engine.open(path, "quest")
            try:
                start = time.perf_counter()
                token = int(np.argmax(engine.prefill(prompt)))
                prefill[label].append(PROMPT_TOKENS / (time.perf_counter() - start))
                for _ in range(WARMUP_STEPS):
                    token = int(np.argmax(engine.decode(token)))
                times = []
                for _ in range(DECODE_STEPS):
                    start = time.perf_counter()
                    token = int(np.argmax(engine.decode(token)))
                    times.append(time.perf_counter() - start)
            finally:
                engine.close()
            speeds[label].append(1 / float(np.median(times)))
            print(f"  round {r + 1}: {label:<16} {speeds[label][-1]:6.1f} tok/s, prefill {prefill[label][-1]:6.1f} "
                  "tok/s", flush=True)
    return speeds, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--scored", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--reuse-agreement", action="store_true")
    parser.add_argument("--policies", default="quest,dense", help="of quest, rerank, dense")
    parser.add_argument("--kv-dtype", default=None, help="the formats' KV pages (default: the cpu profile's)")
    args = parser.parse_args()
    labels = args.formats.split(",")
    unknown = [label for label in labels if label not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format {unknown[0]}; choose from {', '.join(FORMATS)}")

    float_dir = float_artifact()
    artifacts = {}
    for label in labels:
        dtype, form = FORMATS[label]
        out = WORK_DIR / label
        if not (out / "manifest.json").exists():
            start = time.perf_counter()
            quantize_artifact(float_dir, out, dtype, progress=lambda _: None, weight_only=form)
            print(f"{label}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
        artifacts[label] = out

    rows = json.loads(args.json.read_text())["rows"] if args.reuse_agreement else []
    tokenizer = ArtifactTokenizer.load(read_manifest(REFERENCE))
    pages = {label: args.kv_dtype or read_manifest(artifact).profile.kv_dtype for label, artifact in artifacts.items()}
    for text, tokens in texts(tokenizer, args.context).items() if not args.reuse_agreement else ():
        for policy in args.policies.split(","):
            run = DENSE_RUN if policy == "dense" else EvalRun(policy, None)
            reference, _ = forced_logits(REFERENCE, run, tokens, args.scored)
            for label, artifact in artifacts.items():
                logits, _ = forced_logits(artifact, run, tokens, args.scored, args.kv_dtype)
                row = {"format": label, "text": text, "policy": run.policy, "kv_dtype": pages[label],
                       "top1_agreement": top1_agreement(logits, reference), "mean_kl": mean_kl(logits, reference)}
                rows.append(row)
                print(f"{label:<16} {run.policy:<6} {text:<26} top-1 {row['top1_agreement']:.3f} "
                      f"KL {row['mean_kl']:.4f}", flush=True)

    unmeasured = {label: [np.nan] for label in labels}
    speeds, prefill = decode_speed(artifacts, args.rounds) if args.rounds else (unmeasured, unmeasured)
    summary = []
    for label in labels:
        top1 = [r["top1_agreement"] for r in rows if r["format"] == label] or [np.nan]  # nan: not measured
        kl = [r["mean_kl"] for r in rows if r["format"] == label] or [np.nan]
        summary.append({"format": label, **asdict(FORMATS[label][1]),
                        "graph_weight_mib": graph_weight_bytes(artifacts[label]) / 2**20,
                        "min_top1": float(np.min(top1)), "mean_top1": float(np.mean(top1)),
                        "mean_kl": float(np.mean(kl)),
                        "decode_tok_s": float(np.median(speeds[label])), "decode_rounds": speeds[label],
                        "prefill_tok_s": float(np.median(prefill[label])), "prefill_rounds": prefill[label]})
    print(f"\n{'format':<16} {'weights MiB':>11} {'min top-1':>9} {'mean top-1':>10} {'mean KL':>8} {'tok/s':>6} "
          f"{'prefill':>7}")
    for s in summary:
        print(f"{s['format']:<16} {s['graph_weight_mib']:11.1f} {s['min_top1']:9.3f} {s['mean_top1']:10.3f} "
              f"{s['mean_kl']:8.4f} {s['decode_tok_s']:6.1f} {s['prefill_tok_s']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps({"context": args.context, "scored": args.scored, "rows": rows,
                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
