"""Ctrl-C in the middle of a long prefill that spills to disk leaves no stray files (issue 21).

Starts `edgekv generate` on the default artifact with the opening of Python's language reference (the
`text-passkey` haystack, running text) as a raw prompt of TOKENS tokens, waits until the session's spill
file on disk holds at least --spill-mib (the host tier has overflowed), sends SIGINT as a terminal's
Ctrl-C would, and checks that the command exits with 130, says it was interrupted without a traceback,
and leaves the spill directory empty.

Usage: .venv/bin/python benchmarks/interrupt_long_prefill.py [TOKENS] [--spill-mib N] [--policy P] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.manifest import default_artifact_dir, read_manifest
from edgekv.evaluation.tasks import reference_paragraphs
from edgekv.runtime.host_arena import KV_SPILL_FILE
from edgekv.runtime.tokens import ArtifactTokenizer

POLL_S = 2.0


def running_text(encode, tokens: int) -> str:
    """The first paragraphs of the language reference that make up at least `tokens` tokens."""
    paragraphs, total = [], 0
    for paragraph in reference_paragraphs():
        paragraphs.append(paragraph)
        total += len(encode(paragraph + "\n\n"))
        if total >= tokens:
            return "\n\n".join(paragraphs)
    raise SystemExit(f"the language reference holds only {total} tokens, fewer than {tokens}")


def spilled_bytes(spill_dir: Path) -> int:
    """The bytes the session's spill file holds on disk (its blocks, not its sparse length)."""
    return sum(f.stat().st_blocks * 512 for f in spill_dir.glob(f"*/{KV_SPILL_FILE}"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokens", type=int, nargs="?", default=65536)
    parser.add_argument("--spill-mib", type=float, default=64.0)
    parser.add_argument("--policy", default="rerank")
    parser.add_argument("--artifact", default=str(default_artifact_dir(DEFAULT_MODEL, "npu-small")))
    args = parser.parse_args()
    artifact = Path(args.artifact)
    tokenizer = ArtifactTokenizer.load(read_manifest(artifact))
    with tempfile.TemporaryDirectory() as work:
        prompt, spill_dir = Path(work) / "prompt.txt", Path(work) / "spill"
        prompt.write_text(running_text(tokenizer.encode, args.tokens))
        command = [str(Path(sys.executable).parent / "edgekv"), "generate", str(artifact), "--raw", "--prompt-file",
                   str(prompt), "--max-new-tokens", "16", "--policy", args.policy, "--spill-dir", str(spill_dir)]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while process.poll() is None and spilled_bytes(spill_dir) < args.spill_mib * 2 ** 20:
            time.sleep(POLL_S)
        if process.poll() is not None:
            raise SystemExit(f"generate ended before spilling {args.spill_mib} MiB: {process.stderr.read()}")
        spilled = spilled_bytes(spill_dir)
        print(f"{time.perf_counter() - start:.0f} s into the prefill, {spilled / 2 ** 20:.0f} MiB on disk: SIGINT",
              flush=True)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        left = sorted(str(p.relative_to(spill_dir)) for p in spill_dir.rglob("*"))
        print(f"exit code {process.returncode}; stderr's last line: {err.strip().splitlines()[-1]!r}; "
              f"left in the spill directory: {left or 'nothing'}")
        ok = process.returncode == 130 and "Traceback" not in err and not left
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
