"""The artifact's tokenizer: chat prompts, EOS ids, streaming text and stop strings.

Read with the `tokenizers` library and the chat template rendered with jinja2, exactly as transformers
does both (tests/test_tokens.py compares them), so that running a model never imports transformers,
whose import alone takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import Manifest

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (apply_chat_template): sandboxed, blocks trimmed,
    loop controls, its tojson (no HTML escaping), raise_exception and strftime_now."""
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(source)


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: the spaces some tokenizers decode before punctuation."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


@dataclass
class ArtifactTokenizer:
    tokenizer: Tokenizer
    eos_ids: set[int]
    template: jinja2.Template | None
    special_tokens: dict[str, str]  # bos_token, eos_token, ...: what a chat template may refer to
    clean_up: bool  # the tokenizer's clean_up_tokenization_spaces

    @classmethod
    def load(cls, manifest: Manifest) -> "ArtifactTokenizer":
        directory = manifest.directory / manifest.data["tokenizer"]["dir"]
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = json.loads((directory / "tokenizer_config.json").read_text())
        vocab = manifest.model["vocab"]
        if tokenizer.get_vocab_size(with_added_tokens=True) > vocab:
            raise EdgekvError(f"the tokenizer in {manifest.directory} has {tokenizer.get_vocab_size()} tokens but the "
                              f"model {vocab}: the artifact mixes two models; re-run `edgekv export`")
        special = {key: _token_text(config[key]) for key in SPECIAL_TOKEN_KEYS if _token_text(config.get(key))}
        eos = set(manifest.data["generation"]["eos_token_ids"])
        if "eos_token" in special and tokenizer.token_to_id(special["eos_token"]) is not None:
            eos.add(tokenizer.token_to_id(special["eos_token"]))
        source = manifest.data["tokenizer"].get("chat_template")
        return cls(tokenizer, eos, chat_template(source) if source else None, special,
                   bool(config.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a sequence: no BOS or other added tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_exact(self, tokens: list[int]) -> str:
        """The text tokens stand for, special tokens included and spacing untouched."""
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the tokenizer's chat template (plain lines without one)."""
        if self.template is None:
            return "\n".join(m["content"] for m in messages) + ("\n" if add_generation_prompt else "")
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if self.template is None:
            return self.encode("\n".join(m["content"] for m in messages))
        return self.encode_continuation(self.chat_text(messages, add_generation_prompt))

    def decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return clean_up_spaces(text) if self.clean_up else text


class ReplyText:
    """A reply's text as its tokens arrive: `add` returns the new text safe to show, never half a UTF-8
    character nor the start of what may become a stop string, and sets `stopped` once a stop string
    appears (the text ends before it)."""

    def __init__(self, tokenizer: ArtifactTokenizer, stops: tuple[str, ...] = ()):
        if any(not stop for stop in stops):
            raise EdgekvError("an empty stop string would stop every reply at once; drop it")
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""  # the reply so far, up to a stop string
        self.shown = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # mid UTF-8 sequence: wait for the rest
            return ""
        cuts = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            self.stopped, text = True, text[:min(cuts)]
            safe = len(text)
        else:  # hold back a tail that a stop string starts with
            safe = len(text) - max((n for stop in self.stops for n in range(len(stop) - 1, 0, -1)
                                    if text.endswith(stop[:n])), default=0)
        self.text = text
        piece, self.shown = text[self.shown:safe], max(self.shown, safe)
        return piece

    def rest(self) -> str:
        """What was held back, once the reply is over."""
        piece, self.shown = self.text[self.shown:], len(self.text)
        return piece
