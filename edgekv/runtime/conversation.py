"""A multi-turn conversation over one Engine: each turn prefills only its own new tokens.

The engine's cache holds exactly the tokens the model has seen. For a new turn the whole conversation is
rendered with the tokenizer's chat template; the text of the cached tokens is a prefix of it, and only
the rest (the end of the last reply, the new user message, the assistant header) is tokenized and
prefilled. Should the rendering ever not start with the cached text (a template that rewrites earlier
turns), the cache is rebuilt from the whole conversation once, and the turn says so.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

from edgekv.core.errors import EdgekvError
from edgekv.runtime.engine import Engine, PrefillProgress
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.stats import GenerationStats
from edgekv.runtime.tokens import ArtifactTokenizer


@dataclass
class Turn:
    user: str
    reply: str
    tokens: list[int]
    stats: GenerationStats
    interrupted: bool
    rebuilt: bool  # the cache was rebuilt from the whole conversation for this turn


@dataclass
class Conversation:
    engine: Engine
    tokenizer: ArtifactTokenizer
    sampling: SamplingConfig
    system: str | None = None  # None: the chat template's own default
    messages: list[dict] = field(default_factory=list)  # role, content (+ interrupted for cut replies)
    sampler: Sampler | None = None
    turns: int = 0
    generated_tokens: int = 0

    def __post_init__(self) -> None:
        if self.sampler is None:
            self.sampler = Sampler(self.sampling)

    def template_messages(self, user: str | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        history = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return system + history + ([{"role": "user", "content": user}] if user is not None else [])

    def new_tokens(self, user: str) -> tuple[list[int], bool]:
        """The tokens this turn must prefill, and whether the cache had to be rebuilt for them."""
        text = self.tokenizer.chat_text(self.template_messages(user))
        cached = self.tokenizer.decode_exact(self.engine.tokens)
        if text.startswith(cached):
            return self.tokenizer.encode_continuation(text[len(cached):]), False
        self.engine.reset()
        return self.tokenizer.encode_continuation(text), True

    def reply(self, user: str, max_new_tokens: int, on_token: Callable[[int], None] | None = None,
              interrupted: Callable[[], bool] = lambda: False,
              prefill_progress: PrefillProgress | None = None) -> Turn:
        """Run one turn. `interrupted` is polled after every token: when it turns true the reply stops
        there, and stays in the history marked as interrupted. `prefill_progress(n)`, given the turn's
        n tokens to prefill, is a context around the turn that yields the engine's on_prefill (or None)."""
        if not user.strip():
            raise EdgekvError("empty message: type some text")
        prompt, rebuilt = self.new_tokens(user)
        with (prefill_progress(len(prompt)) if prefill_progress else nullcontext()) as on_prefill:
            tokens, stats = self.engine.run(prompt, max_new_tokens, self.sampler, self.tokenizer.eos_ids,
                                            self.tokenizer.decode, stop=lambda _: interrupted(), on_token=on_token,
                                            on_prefill=on_prefill)
        cut = interrupted()
        text = self.tokenizer.decode(tokens)
        self.messages.append({"role": "user", "content": user})
        self.messages.append({"role": "assistant", "content": text, **({"interrupted": True} if cut else {})})
        self.turns += 1
        self.generated_tokens += len(tokens)
        return Turn(user, text, tokens, stats, cut, rebuilt)

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.engine.reset()
        self.messages = []
        self.sampler = Sampler(self.sampling)
        self.turns = self.generated_tokens = 0

    def set_system(self, text: str) -> None:
        """A new system prompt; the next turn rebuilds the cache once, since the conversation's start changed."""
        self.system = text

    @property
    def context_tokens(self) -> int:
        return len(self.engine.tokens)
