"""The runtime's tokenizer (tokenizers + jinja2) gives exactly what transformers gives for the same files."""

import pytest
from transformers import AutoTokenizer

from edgekv.core.manifest import read_manifest
from edgekv.runtime.tokens import ArtifactTokenizer

TEXTS = ["Hello, world!", "Hello , world ! Don't you 've seen it ? 're 'm 's n't", "  leading and trailing  ",
         "naïve café, 東京 and emoji 🎨 — dashes", "line one\nline two\n\n\ttabbed", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}],
]


def check_same_as_transformers(artifact):
    manifest = read_manifest(artifact)
    ours = ArtifactTokenizer.load(manifest)
    theirs = AutoTokenizer.from_pretrained(manifest.directory / manifest.data["tokenizer"]["dir"])
    assert theirs.eos_token_id in ours.eos_ids
    for text in TEXTS:
        ids = list(theirs(text).input_ids)
        assert ours.encode(text) == ids, text
        assert ours.encode_continuation(text) == list(theirs(text, add_special_tokens=False).input_ids), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode_exact(ids) == theirs.decode(ids, skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False), text
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours.chat_text(messages, generation_prompt) == text
            assert ours.chat_prompt(messages, generation_prompt) == list(
                theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt))
            ids = ours.chat_prompt(messages, generation_prompt)
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
            assert ours.decode_exact(ids) == text


def test_default_tokenizer_is_transformers_own(default_artifact):
    check_same_as_transformers(default_artifact)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_tokenizers_are_transformers_own(arch, tiny_artifacts):
    check_same_as_transformers(tiny_artifacts[arch])
