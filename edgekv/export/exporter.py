"""`edgekv export`: trace a Hugging Face causal LM into fixed-shape per-layer ONNX graphs.

Four variants of the L+1 graphs of a step are written (see modules.py for the graphs):

    budget-decode / budget-prefill   KV input of the profile's budget (larger for the first dense layers),
                                     used by the quest and streaming policies;
    dense-decode / dense-prefill     KV input of the model's full context: the classic static-NPU design
                                     that benchmarks compare against.

Graphs that are identical across variants (the first q/k/v graph) are written once; every weight is
written once into the shared weight files (weights.py), and so is the embedding table the host looks
token embeddings up in (the LM head's own tensor when the model ties them).
"""

from __future__ import annotations

import io
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

import edgekv
from edgekv.core.constants import DEFAULT_MODEL
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import ARTIFACT_FORMAT_VERSION, default_artifact_dir, read_manifest, write_manifest
from edgekv.core.profiles import Profile, load_profile
from edgekv.export.models import LoadedModel, load_model
from edgekv.export.modules import FirstQKV, LastLayerHead, LayerBoundary
from edgekv.export.weights import WeightWriter, parameter_digests

# The host's embedding table (runtime/embedding.py): the model's own parameter name, which the LM head's
# tensor also has when the embeddings are tied, so the weight files hold it once.
EMBEDDING_WEIGHT = "model.embed_tokens.weight"
VARIANTS = ("budget-decode", "budget-prefill", "dense-decode", "dense-prefill")
GRAPHS_SUBDIR = "graphs"
TOKENIZER_SUBDIR = "tokenizer"


@dataclass(frozen=True)
class GraphPlan:
    kind: str  # qkv | layer | head
    layer: int  # the layer whose attention runs in the graph (-1 for qkv)
    seq_len: int
    budget: int  # KV slots (0 for qkv)

    @property
    def name(self) -> str:
        if self.kind == "qkv":
            return f"qkv.s{self.seq_len}"
        if self.kind == "head":
            return f"head.s{self.seq_len}.b{self.budget}"
        return f"layer{self.layer:02d}.s{self.seq_len}.b{self.budget}"


def model_dims(config) -> dict[str, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "q_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": head_dim, "vocab": config.vocab_size, "max_context": config.max_position_embeddings}


def plan_variants(profile: Profile, layers: int, max_context: int) -> dict[str, list[GraphPlan]]:
    if profile.layer_budgets and len(profile.layer_budgets) != layers:
        raise EdgekvError(f"profile {profile.name} gives {len(profile.layer_budgets)} kv.layer_budgets but the model "
                          f"has {layers} layers; calibrate the profile for this model")
    plans = {}
    for variant in VARIANTS:
        dense, prefill = variant.startswith("dense"), variant.endswith("prefill")
        seq = profile.prefill_chunk if prefill else 1

        def budget(layer: int) -> int:
            return max_context if dense else profile.layer_budget(layer, prefill)

        plans[variant] = ([GraphPlan("qkv", -1, seq, 0)]
                          + [GraphPlan("layer", layer, seq, budget(layer)) for layer in range(layers - 1)]
                          + [GraphPlan("head", layers - 1, seq, budget(layers - 1))])
    return plans


def example_inputs(plan: GraphPlan, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Inputs that fix every shape of the traced graph (values are irrelevant to the trace)."""
    s, b, d = plan.seq_len, plan.budget, dims["head_dim"]
    if plan.kind == "qkv":
        return {"hidden_in": torch.randn(s, dims["hidden"])}
    return {
        "hidden_in": torch.randn(s, dims["hidden"]),
        "q_in": torch.randn(dims["q_heads"], s, d),
        "k_sel": torch.randn(dims["kv_heads"], b, d),
        "v_sel": torch.randn(dims["kv_heads"], b, d),
        "mask": torch.zeros(s, b),
    }


def output_names(plan: GraphPlan) -> list[str]:
    return {"qkv": ["q_out", "k_out", "v_out"], "layer": ["hidden_out", "q_out", "k_out", "v_out"],
            "head": ["logits"]}[plan.kind]


def graph_module(model, plan: GraphPlan, head_weight_on_right: bool = False) -> torch.nn.Module:
    if plan.kind == "qkv":
        return FirstQKV(model)
    if plan.kind == "head":
        return LastLayerHead(model, head_weight_on_right)
    return LayerBoundary(model, plan.layer)


def trace_graph(model, plan: GraphPlan, dims: dict[str, int], opset: int,
                head_weight_on_right: bool = False) -> onnx.ModelProto:
    inputs = example_inputs(plan, dims)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is used on purpose: it gives static shapes, folds constants and
        # traces these small modules in well under a second each. Its deprecation notice is noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph_module(model, plan, head_weight_on_right), tuple(inputs.values()), buffer, dynamo=False,
                          opset_version=opset, input_names=list(inputs), output_names=output_names(plan),
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def tensor_specs(values) -> list[dict]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        specs.append({"name": value.name, "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param
                                                    for d in tensor_type.shape.dim],
                      "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name})
    return specs


def generation_defaults(loaded: LoadedModel) -> dict:
    config = loaded.model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else loaded.model.config.eos_token_id
    eos_ids = sorted(set(eos if isinstance(eos, list) else [eos])) if eos is not None else []
    return {"eos_token_ids": eos_ids, "do_sample": bool(config.do_sample),
            "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
            "repetition_penalty": config.repetition_penalty}


def rope_record(model) -> dict:
    """The rotary module's inverse frequencies and scaling, after the config's rope theta and scaling
    (llama3, linear, yarn, ...): what the host computes cos/sin from (runtime/rope.py)."""
    rotary = model.model.rotary_emb
    return {"inv_freq": [float(f) for f in rotary.inv_freq.float().numpy()],
            "attention_scaling": float(rotary.attention_scaling)}


def model_record(loaded: LoadedModel) -> dict:
    config = loaded.model.config
    return {"name": loaded.source.name, "source": str(loaded.source.path), "source_sha256": loaded.source_sha256,
            "architecture": loaded.architecture, **model_dims(config), "rope": rope_record(loaded.model),
            "rope_theta": float(config.rope_theta), "rope_scaling": getattr(config, "rope_scaling", None),
            "rms_norm_eps": float(config.rms_norm_eps), "tie_word_embeddings": bool(config.tie_word_embeddings),
            "sliding_window": getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True)
            else None,
            "bos_token_id": config.bos_token_id}


@dataclass
class ExportResult:
    directory: Path
    seconds: float
    graph_count: int
    weight_bytes: int
    artifact_bytes: int


def export_artifact(model_spec: str = DEFAULT_MODEL, profile_spec: str = "npu-small", out_dir: Path | None = None,
                    progress: Callable[[str], None] = print,
                    step: Callable[[str, int, int], None] | None = None) -> ExportResult:
    """Export `model_spec` for `profile_spec` as float32 graphs into `out_dir`; step(name, i, n) reports graph
    progress. (INT8 artifacts are quantized from these: calibration/quantize.py.)"""
    start = time.perf_counter()
    profile = load_profile(profile_spec)
    progress(f"loading model {model_spec}")
    loaded = load_model(model_spec, progress)
    out_dir = Path(out_dir) if out_dir else default_artifact_dir(loaded.source.name, profile.name)
    write_float_artifact(loaded, profile, out_dir, step)
    return export_result(out_dir, start)


def export_result(out_dir: Path, started: float) -> ExportResult:
    """What an export wrote into out_dir, since time.perf_counter() read `started`."""
    manifest = read_manifest(out_dir)
    weight_bytes = sum(entry["length"] for entry in manifest.data["weights"].values())
    artifact_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return ExportResult(out_dir, time.perf_counter() - started, len(manifest.data["graphs"]), weight_bytes,
                        artifact_bytes)


def write_float_artifact(loaded: LoadedModel, profile: Profile, out_dir: Path,
                         step: Callable[[str, int, int], None] | None = None,
                         head_weight_on_right: bool = False) -> None:
    """Trace every graph of every variant in float32 and write the artifact (staged, then renamed)."""
    dims = model_dims(loaded.model.config)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    graphs_dir = staging / GRAPHS_SUBDIR
    graphs_dir.mkdir(parents=True)

    variants = plan_variants(profile, dims["layers"], dims["max_context"])
    unique = {plan.name: plan for plans in variants.values() for plan in plans}
    writer = WeightWriter(graphs_dir, parameter_digests(loaded.model))
    graphs = {}
    for i, plan in enumerate(unique.values()):
        if step:
            step(plan.name, i, len(unique))
        proto = trace_graph(loaded.model, plan, dims, profile.opset, head_weight_on_right)
        rel = f"{GRAPHS_SUBDIR}/{plan.name}.onnx"
        graphs[plan.name] = graph_record(plan, rel, proto, writer.save(proto, staging / rel))
    if step:
        step("done", len(unique), len(unique))
    writer.add(EMBEDDING_WEIGHT, loaded.model.model.embed_tokens.weight.detach().numpy())
    writer.close()

    loaded.tokenizer.save_pretrained(staging / TOKENIZER_SUBDIR)
    manifest = {
        "format_version": ARTIFACT_FORMAT_VERSION,
        "edgekv_version": edgekv.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_record(loaded),
        "profile": profile.to_tables(),
        "graphs": graphs,
        "variants": {variant: [plan.name for plan in plans] for variant, plans in variants.items()},
        "weights": writer.manifest_table(),
        "embedding": {"weight": EMBEDDING_WEIGHT, "vocab_axis": 0, "scale": None},
        "tokenizer": {"dir": TOKENIZER_SUBDIR, "chat_template": loaded.tokenizer.chat_template},
        "generation": generation_defaults(loaded),
    }
    write_manifest(staging, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def graph_record(plan: GraphPlan, rel: str, proto: onnx.ModelProto, weights: list[str]) -> dict:
    """A graph's manifest entry: what it is, its file, its inputs and outputs, the shared weights it uses."""
    return {"name": plan.name, "file": rel, "kind": plan.kind, "layer": plan.layer,
            "seq_len": plan.seq_len, "budget": plan.budget,
            "inputs": tensor_specs(proto.graph.input), "outputs": tensor_specs(proto.graph.output),
            "weights": weights}
