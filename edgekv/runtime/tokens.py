"""The artifact's tokenizer: chat prompts, EOS ids, streaming text and stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgekv.toolkit.errors import EdgekvError
from edgekv.toolkit.manifest import Manifest


@dataclass
class ArtifactTokenizer:
    hf: object  # a transformers tokenizer
    eos_ids: set[int]

    @classmethod
    def load(cls, manifest: Manifest) -> "ArtifactTokenizer":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(manifest.directory / manifest.data["tokenizer"]["dir"])
        vocab = manifest.model["vocab"]
        if len(hf) > vocab:
            raise EdgekvError(f"the tokenizer in {manifest.directory} has {len(hf)} tokens but the model {vocab}: "
                              "the artifact mixes two models; re-run `edgekv export`")
        eos = set(manifest.data["generation"]["eos_token_ids"])
        if hf.eos_token_id is not None:
            eos.add(hf.eos_token_id)
        return cls(hf, eos)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text).input_ids)

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a sequence: no BOS or other added tokens."""
        return list(self.hf(text, add_special_tokens=False).input_ids)

    def decode_exact(self, tokens: list[int]) -> str:
        """The text tokens stand for, special tokens included and spacing untouched."""
        return self.hf.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the tokenizer's chat template (plain lines without one)."""
        if not self.hf.chat_template:
            return "\n".join(m["content"] for m in messages) + ("\n" if add_generation_prompt else "")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            return self.encode("\n".join(m["content"] for m in messages))
        return list(self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def decode(self, tokens: list[int]) -> str:
        return self.hf.decode(tokens, skip_special_tokens=True)

    def streamer(self, emit: Callable[[str], None]) -> Callable[[int], None]:
        """on_token callback that emits the new text of each token (held back mid UTF-8 sequence)."""
        tokens: list[int] = []
        shown = [0]

        def on_token(token: int) -> None:
            tokens.append(token)
            text = self.decode(tokens)
            if text.endswith("\ufffd"):
                return
            emit(text[shown[0]:])
            shown[0] = len(text)

        return on_token

    def stop_check(self, stops: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
        if not stops:
            return None
        return lambda tokens: any(stop in self.decode(tokens) for stop in stops)
