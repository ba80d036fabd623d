"""edgekv's Python API: open an artifact, generate or chat with streaming, read the stats.

    from edgekv.api import Model

    with Model.open() as model:  # the default export (`edgekv export --profile npu-small`)
        reply = model.generate([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=64,
                               on_text=lambda piece: print(piece, end="", flush=True))
        print(reply.finish_reason, reply.stats.decode_tok_s)
        chat = model.chat(system="You are terse.")
        print(chat.reply("Hi", max_new_tokens=32).reply)

One Model is one engine: one KV cache, used by one caller at a time. `edgekv generate`, `edgekv chat` and
`edgekv serve` are its users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgekv.core.constants import DEFAULT_POLICY
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import artifact_dir, read_manifest
from edgekv.runtime.conversation import Conversation
from edgekv.runtime.engine import Engine
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.stats import GenerationStats
from edgekv.runtime.tokens import ArtifactTokenizer, ReplyText
from edgekv.targets.registry import backend_for

Prompt = str | list[dict[str, str]]  # raw text, or chat messages ({"role", "content"}) for the chat template


@dataclass
class Reply:
    text: str  # cut before a stop string, if one ended it
    tokens: list[int]  # every sampled token, the EOS included
    stats: GenerationStats
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens) or "cancelled"


@dataclass
class Model:
    engine: Engine
    tokenizer: ArtifactTokenizer

    @classmethod
    def open(cls, directory: Path | str | None = None, policy: str = DEFAULT_POLICY, backend: str | None = None,
             positions: str | None = None, spill_dir: Path | str | None = None, threads: int = 0) -> "Model":
        """The artifact in `directory` (default: the default export) with a policy, a backend (default: the
        profile's if compiled, else onnxruntime's CPU) and a position scheme (default: the profile's)."""
        directory = artifact_dir(directory)
        engine = Engine.open(directory, policy, spill_dir=spill_dir, threads=threads, positions=positions,
                             backend=backend_for(backend, read_manifest(directory)))
        try:
            return cls(engine, ArtifactTokenizer.load(engine.manifest))
        except BaseException:
            engine.close()
            raise

    @property
    def name(self) -> str:
        return self.engine.manifest.model["name"]

    def sampling(self, **overrides) -> SamplingConfig:
        """The model's own sampling defaults, with the given temperature, top_k, top_p, repetition_penalty
        or seed (None: the default) on top."""
        return SamplingConfig.from_generation_defaults(self.engine.manifest.data["generation"], **overrides)

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """Raw text as it is, or messages through the chat template, as tokens."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EdgekvError("empty prompt: give some text")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise EdgekvError("empty message list: give at least one message")
        return self.tokenizer.chat_prompt(prompt)

    def generate(self, prompt: Prompt | list[int], max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
                 stop: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False,
                 on_prefill: Callable[[int], None] | None = None) -> Reply:
        """A reply to `prompt` (raw text, chat messages, or token ids) from an empty cache. `on_text` gets
        the reply's text piece by piece as it is sampled; `cancelled` is polled after every token and ends
        the reply there; `on_prefill` gets the prompt tokens fed so far, chunk by chunk."""
        self.engine.reset()
        ids = isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
        tokens = prompt if ids else self.prompt_tokens(prompt)
        return self.extend(tokens, max_new_tokens, sampling, stop, on_text, cancelled, on_prefill)

    def extend(self, tokens: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop: tuple[str, ...] = (), on_text: Callable[[str], None] | None = None,
               cancelled: Callable[[], bool] = lambda: False,
               on_prefill: Callable[[int], None] | None = None) -> Reply:
        """generate() on top of what the cache already holds: only `tokens` are prefilled."""
        if max_new_tokens < 1:
            raise EdgekvError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        text = ReplyText(self.tokenizer, tuple(stop))
        sampler = Sampler(sampling or self.sampling())

        def on_token(token: int) -> None:
            piece = text.add(token)
            if piece and on_text is not None:
                on_text(piece)

        sampled, stats = self.engine.run(tokens, max_new_tokens, sampler, self.tokenizer.eos_ids,
                                         self.tokenizer.decode, stop=lambda _: text.stopped or cancelled(),
                                         on_token=on_token, on_prefill=on_prefill)
        if not text.stopped and on_text is not None and (rest := text.rest()):
            on_text(rest)
        if text.stopped or (sampled and sampled[-1] in self.tokenizer.eos_ids):
            reason = "stop"
        else:
            reason = "cancelled" if cancelled() else "length"
        return Reply(text.text, sampled, stats, reason)

    def chat(self, system: str | None = None, sampling: SamplingConfig | None = None) -> Conversation:
        """A multi-turn conversation on this model's cache (each turn prefills only its new tokens)."""
        self.engine.reset()
        return Conversation(self.engine, self.tokenizer, sampling or self.sampling(), system)

    def close(self) -> None:
        """Remove the session's spill files and release the graphs."""
        self.engine.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
