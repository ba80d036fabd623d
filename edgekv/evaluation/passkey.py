"""The pass-key retrieval task: a random number hidden at a given depth of a long repeated haystack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    tokens: list[int]
    key: int
    depth: float  # where the needle starts, as a fraction of the haystack


def passkey_prompt(encode: Callable[[str], list[int]], total_tokens: int, depth: float, key: int) -> PasskeyPrompt:
    """A prompt of about `total_tokens` tokens with the key's sentence after `depth` of the filler."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(repeats: int) -> list[int]:
        before = round(repeats * depth)
        return encode(INTRO + FILLER * before + needle + FILLER * (repeats - before) + QUESTION)

    # Tokens merge across sentence boundaries, so measure the filler's rate over many repeats, then
    # step down until the whole prompt fits.
    per_filler = len(encode(FILLER * 20)) / 20
    repeats = max(1, int((total_tokens - len(encode(INTRO + needle + QUESTION))) / per_filler))
    tokens = build(repeats)
    while len(tokens) > total_tokens and repeats > 1:
        repeats -= 1
        tokens = build(repeats)
    return PasskeyPrompt(tokens, key, depth)
