"""Tiny randomly initialised Llama, Qwen2 and Mistral models saved as Hugging Face directories.

They exercise every supported architecture's code path (GQA, q/k/v bias, untied heads, llama3 rope
scaling) in seconds. The tokenizer is a small byte-level BPE trained here on a fixed text, with a
ChatML template, so the directories load exactly like a downloaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB = 384
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TRAINING_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
                 "What is the capital of France? Paris is the capital of France. Numbers 0 1 2 3 4 5 6 7 8 9. ") * 20

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", chat_template=CHATML)


def tiny_configs() -> dict:
    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=50000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                             architectures=["LlamaForCausalLM"]),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1000000.0,
                             architectures=["Qwen2ForCausalLM"]),
        "mistral": MistralConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None,
                                 architectures=["MistralForCausalLM"]),
    }


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}


def save_tiny_model(arch: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](tiny_configs()[arch]).eval()
    # Random init leaves biases at zero; give Qwen2's q/k/v biases values so they are really exercised.
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
