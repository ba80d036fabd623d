"""KV reuse across requests of `edgekv serve`, measured: a 3-turn conversation whose first turn carries a long
document; each turn's time to first token and the prompt tokens the server reused, over the official client.

Usage: .venv/bin/python benchmarks/serve_reuse.py [ARTIFACT_DIR] [--document-tokens 6000] [--max-tokens 32]
       [--json PATH]

Starts `edgekv serve` on a free loopback port, streams each turn (time to first token: request sent to the
first content chunk), sends the reply back as the assistant's message, and stops the server with SIGTERM.
The document is running English text (Python's language reference, as the text-passkey task uses).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import running_server  # noqa: E402

from edgekv.core.manifest import artifact_dir  # noqa: E402
from edgekv.evaluation.tasks import reference_paragraphs  # noqa: E402

QUESTIONS = ("Summarize the text above in one sentence.", "What does the text say about names?",
             "Give one more detail from the text.")
WORDS_PER_TOKEN = 0.6  # of this text under SmolLM2's tokenizer (4200 words made 7021 tokens)


def document(words: int) -> str:
    text, paragraphs = [], iter(reference_paragraphs())
    while sum(len(p.split()) for p in text) < words:
        text.append(next(paragraphs))
    return "\n\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", type=Path, default=None)
    parser.add_argument("--document-tokens", type=int, default=6000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with running_server(artifact_dir(args.artifact), "--max-context", "8192") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=3600)
        name = client.models.list().data[0].id
        messages = [{"role": "user", "content": document(int(args.document_tokens * WORDS_PER_TOKEN)) + "\n\n"
                     + QUESTIONS[0]}]
        turns = []
        for turn, question in enumerate(QUESTIONS, 1):
            if turn > 1:
                messages += [{"role": "assistant", "content": turns[-1]["reply"]},
                             {"role": "user", "content": question}]
            start, first, pieces, usage = time.perf_counter(), None, [], None
            for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=args.max_tokens,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
            reused = usage.prompt_tokens_details.cached_tokens
            turns.append({"turn": turn, "prompt_tokens": usage.prompt_tokens, "reused_tokens": reused,
                          "prefilled_tokens": usage.prompt_tokens - reused, "ttft_s": first - start,
                          "total_s": time.perf_counter() - start, "reply": "".join(pieces)})
            print(f"turn {turn}: prompt {usage.prompt_tokens} tokens, reused {reused}, prefilled "
                  f"{usage.prompt_tokens - reused}, time to first token {first - start:.2f} s", flush=True)
    for t in turns[1:]:
        print(f"turn {t['turn']}: time to first token {t['ttft_s'] / turns[0]['ttft_s']:.3f}x turn 1's")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "turns": turns}, indent=1))


if __name__ == "__main__":
    main()
