from edgekv.evaluation.passkey import FILLER, passkey_prompt
from tiny_models import tiny_tokenizer


def test_passkey_prompt_hides_the_key_at_the_stated_depth_and_length():
    tokenizer = tiny_tokenizer()
    encode = lambda text: tokenizer(text).input_ids  # noqa: E731
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        prompt = passkey_prompt(encode, 2000, depth, 91827)
        assert 2000 - len(encode(FILLER)) < len(prompt.tokens) <= 2000
        text = tokenizer.decode(prompt.tokens)
        assert text.count("91827") == 2
        position = text.index("The pass key is 91827") / len(text)
        assert abs(position - depth) < 0.05
        assert text.endswith("The pass key is")
