"""Calibration prompts: long text and a retrieval prompt, run through the real runtime.

The text is the user's (`--text FILE`) or, by default, text the model writes itself from a fixed seed
(evaluation/evaluate.py), so calibration needs no dataset and no network. The retrieval prompt is
∞Bench's Retrieve.KV (random UUIDs: digits, hex and punctuation the text lacks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import read_manifest
from edgekv.evaluation.evaluate import self_written_text
from edgekv.evaluation.tasks import task_prompt
from edgekv.runtime.tokens import ArtifactTokenizer

CALIBRATION_SEED = 1234  # the retrieval prompt's seed: held-out prompts use other seeds


def read_text_tokens(encode: Callable[[str], list[int]], text_file: Path, tokens_needed: int) -> list[int]:
    """The first `tokens_needed` tokens of a text file, or a clear error when it is missing or too short."""
    try:
        tokens = encode(Path(text_file).read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise EdgekvError(f"cannot read the calibration text {text_file} ({e.strerror}); pass an existing --text "
                          "FILE") from None
    if len(tokens) < tokens_needed:
        raise EdgekvError(f"the calibration text {text_file} has {len(tokens)} tokens, fewer than the {tokens_needed} "
                          "calibration needs; give a longer text")
    return tokens[:tokens_needed]


def text_tokens(artifact: Path, tokens_needed: int, text_file: Path | None) -> list[int]:
    """`tokens_needed` tokens of the calibration text: the file's, or the model's own."""
    if text_file is None:
        return self_written_text(artifact, tokens_needed)
    return read_text_tokens(ArtifactTokenizer.load(read_manifest(artifact)).encode, text_file, tokens_needed)


def calibration_prompts(artifact: Path, length: int, text_file: Path | None = None,
                        seed: int = CALIBRATION_SEED) -> list[list[int]]:
    """Two prompts of `length` tokens: the calibration text and a Retrieve.KV prompt."""
    tokenizer = ArtifactTokenizer.load(read_manifest(artifact))
    retrieval = task_prompt("retrieve-kv", tokenizer.encode, length, 0.5, seed).tokens
    return [text_tokens(artifact, length, text_file), retrieval]
