"""Long-context retrieval prompts, generated locally at a requested length and depth.

- passkey: the pass-key haystack of evaluation/passkey.py.
- retrieve-number: ∞Bench's Retrieve.Number: a 10-digit number hidden in the same repeated filler.
- retrieve-kv: ∞Bench's Retrieve.KV: a JSON object of random UUID keys and values; the model must give
  the value of one key, which sits at the requested depth.
- text-passkey: the pass key in running text instead of repeated filler: Python's language reference
  as the standard library ships it (pydoc_data.topics: English prose with code, about 115K tokens, the
  same for anyone with Python 3.11), the key's sentence between two of its paragraphs.
Each prompt carries its answer; a reply is right when it contains the answer.
"""

from __future__ import annotations

import json
import uuid
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydoc_data.topics import topics

from edgekv.evaluation.passkey import FILLER, passkey_prompt

TASKS = ("passkey", "retrieve-number", "retrieve-kv", "text-passkey")
ANSWER_TOKENS = {"passkey": 8, "retrieve-number": 16, "retrieve-kv": 40, "text-passkey": 8}


@dataclass(frozen=True)
class TaskPrompt:
    tokens: list[int]
    answer: str
    depth: float


def _fit(build: Callable[[int], list[int]], total_tokens: int, unit_tokens: float,
         fixed_tokens: int) -> tuple[list[int], int]:
    """build(n) for the n (estimated from the tokens per unit, then stepped down) that fits total_tokens."""
    n = max(1, int((total_tokens - fixed_tokens) / unit_tokens))
    tokens = build(n)
    while len(tokens) > total_tokens and n > 1:
        n = max(1, n - max(1, int((len(tokens) - total_tokens) / unit_tokens)))
        tokens = build(n)
    return tokens, n


def retrieve_number_prompt(encode: Callable[[str], list[int]], total_tokens: int, depth: float,
                           rng: np.random.Generator) -> TaskPrompt:
    number = "".join(str(d) for d in rng.integers(0, 10, 10))
    needle = f"The sequence of digits is {number}. Remember it. {number} is the sequence of digits. "
    intro = "There is an important sequence of digits hidden inside a lot of irrelevant text. Find it and memorize it. "
    question = "What is the sequence of digits? The sequence of digits is"

    def build(repeats: int) -> list[int]:
        before = round(repeats * depth)
        return encode(intro + FILLER * before + needle + FILLER * (repeats - before) + question)

    per_filler = len(encode(FILLER * 20)) / 20
    tokens, _ = _fit(build, total_tokens, per_filler, len(encode(intro + needle + question)))
    return TaskPrompt(tokens, number, depth)


def retrieve_kv_prompt(encode: Callable[[str], list[int]], total_tokens: int, depth: float,
                       rng: np.random.Generator) -> TaskPrompt:
    def new_uuid() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    pairs = [(new_uuid(), new_uuid()) for _ in range(max(4, total_tokens // 20))]
    intro = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"

    def build(n: int) -> list[int]:
        target = min(n - 1, round((n - 1) * depth))
        key = pairs[target][0]
        data = json.dumps(dict(pairs[:n]), indent=1)
        return encode(f'{intro}{data}\n\nKey: "{key}"\nThe value associated with the specified key is: "')

    per_pair = len(encode(json.dumps(dict(pairs[:20]), indent=1))) / 20
    tokens, n = _fit(build, total_tokens, per_pair, len(encode(intro)) + 40)
    target = min(n - 1, round((n - 1) * depth))
    return TaskPrompt(tokens, pairs[target][1], depth)


def reference_paragraphs() -> list[str]:
    """The paragraphs of Python's language reference, in the standard library's order."""
    return [p for text in topics.values() for p in text.split("\n\n") if p.strip()]


def reference_text() -> str:
    """The running text of `edgekv eval --task perplexity`: the reference's paragraphs, one after another."""
    return "\n\n".join(reference_paragraphs())


def text_passkey_prompt(encode: Callable[[str], list[int]], total_tokens: int, depth: float, key: int) -> TaskPrompt:
    needle = f"A note for the reader: the pass key is {key}. Remember it. {key} is the pass key."
    question = "\n\nWhat is the pass key? The pass key is"
    paragraphs, ends = [], [0]  # the paragraphs a prompt of total_tokens can reach, and where each ends
    for paragraph in reference_paragraphs():
        if ends[-1] > total_tokens:
            break
        paragraphs.append(paragraph)
        ends.append(ends[-1] + len(encode(paragraph + "\n\n")))
    ends = np.array(ends[1:])

    def build(n: int) -> list[int]:
        before = int(np.searchsorted(ends[:n], depth * ends[n - 1], side="right"))  # depth in tokens
        return encode("\n\n".join(paragraphs[:before] + [needle] + paragraphs[before:n]) + question)

    # The most paragraphs that fit (prompt length grows with n); the text runs out past about 115K tokens.
    n = bisect_right(range(1, len(paragraphs) + 1), total_tokens, key=lambda n: len(build(n)))
    return TaskPrompt(build(max(n, 1)), str(key), depth)


def task_prompt(task: str, encode: Callable[[str], list[int]], total_tokens: int, depth: float, seed: int) -> TaskPrompt:
    rng = np.random.default_rng(seed)
    if task == "passkey":
        prompt = passkey_prompt(encode, total_tokens, depth, int(rng.integers(10000, 100000)))
        return TaskPrompt(prompt.tokens, str(prompt.key), depth)
    if task == "retrieve-number":
        return retrieve_number_prompt(encode, total_tokens, depth, rng)
    if task == "retrieve-kv":
        return retrieve_kv_prompt(encode, total_tokens, depth, rng)
    if task == "text-passkey":
        return text_passkey_prompt(encode, total_tokens, depth, int(rng.integers(10000, 100000)))
    raise ValueError(task)
