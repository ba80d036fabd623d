"""Decode and prefill speed of two checkouts of edgekv on one artifact, interleaved point by point.

Usage: .venv/bin/python benchmarks/ab_bench.py A_CHECKOUT B_CHECKOUT ARTIFACT_DIR [--artifact-a DIR]
           [--points quest@1024,quest@8192,quest@16384,dense@1024,dense@8192] [--rounds 3] [--json PATH]
Each (policy, context) point runs as its own `edgekv bench` command from each checkout, in the order
AB, BA, AB, ... so that drift on a shared machine falls on both. Prints the medians and B/A ratios.
Where the artifact format changed between A and B, `--artifact-a` is A's own export of the same model
and profile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# An older checkout keeps the CLI in edgekv.toolkit.cli; the python running it must be this venv's.
ENTRY = ("try:\n from edgekv.cli.main import main\nexcept ImportError:\n"
         " from edgekv.toolkit.cli import main\nmain()")


def bench_point(checkout: Path, artifact: Path, policy: str, context: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        subprocess.run([sys.executable, "-c", ENTRY, "bench", str(artifact), "--contexts", str(context),
                        "--policies", policy, "--steps", str(steps), "--json", str(out)],
                       cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, check=True,
                       stdout=subprocess.DEVNULL)
        (row,) = json.loads(out.read_text())["rows"]
    step_ms = row["decode_step_ms"]
    return {"decode_tok_s": row["decode_tok_s"], "prefill_tok_s": row["prefill_tok_s"], "step_ms": step_ms,
            "graph_ms": step_ms * row["graph_share"], "host_ms": step_ms * (1 - row["graph_share"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--artifact-a", type=Path, help="A's own artifact (default: ARTIFACT_DIR)")
    parser.add_argument("--points", default="quest@1024,quest@8192,quest@16384,dense@1024,dense@8192",
                        help="policy@context, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    artifacts = {"A": (args.artifact_a or args.artifact).resolve(), "B": args.artifact.resolve()}
    points = [(p, int(c)) for p, c in (point.split("@") for point in args.points.split(","))]
    runs: dict[str, list] = {f"{p}@{c}": [] for p, c in points}
    for round_index in range(args.rounds):
        for policy, context in points:
            for side in ("AB" if round_index % 2 == 0 else "BA"):
                result = bench_point(checkouts[side], artifacts[side], policy, context, args.steps)
                runs[f"{policy}@{context}"].append({"side": side, "round": round_index, **result})
                print(f"round {round_index + 1} {policy}@{context} {side}: {result['decode_tok_s']:.1f} tok/s "
                      f"(host {result['host_ms']:.1f} ms, graphs {result['graph_ms']:.1f} ms), "
                      f"prefill {result['prefill_tok_s']:.0f} tok/s", flush=True)
    summary = {}
    print(f"\n{'point':<14} {'A tok/s':>8} {'B tok/s':>8} {'B/A':>6} {'A host':>7} {'B host':>7} "
          f"{'A graphs':>9} {'B graphs':>9} {'A prefill':>9} {'B prefill':>9} {'B/A':>6}   (medians of {args.rounds}; "
          "host and graph ms per step, prefill tok/s)")
    for point, rows in runs.items():
        med = {side: {key: float(np.median([r[key] for r in rows if r["side"] == side]))
                      for key in ("decode_tok_s", "host_ms", "graph_ms", "prefill_tok_s")} for side in "AB"}
        ratio = med["B"]["decode_tok_s"] / med["A"]["decode_tok_s"]
        prefill_ratio = med["B"]["prefill_tok_s"] / med["A"]["prefill_tok_s"]
        summary[point] = {"A": med["A"], "B": med["B"], "tok_s_ratio_b_over_a": ratio,
                          "prefill_ratio_b_over_a": prefill_ratio}
        print(f"{point:<14} {med['A']['decode_tok_s']:8.1f} {med['B']['decode_tok_s']:8.1f} {ratio:6.2f} "
              f"{med['A']['host_ms']:7.1f} {med['B']['host_ms']:7.1f} {med['A']['graph_ms']:9.1f} "
              f"{med['B']['graph_ms']:9.1f} {med['A']['prefill_tok_s']:9.0f} {med['B']['prefill_tok_s']:9.0f} "
              f"{prefill_ratio:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"checkouts": {k: str(v) for k, v in checkouts.items()},
                                         "artifacts": {k: str(v) for k, v in artifacts.items()}, "steps": args.steps,
                                         "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
