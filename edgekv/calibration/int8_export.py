"""What `edgekv export` runs: float32 graphs (export/exporter.py), and the artifacts converted from them:
float16 weights (float16_weights.py), INT8 QDQ graphs calibrated on real activations for NPUs
(quantize.py), or weight-only MatMulNBits graphs for CPUs (weight_only.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekv.calibration.float16_weights import FLOAT16_SUFFIX, convert_float16_weights
from edgekv.calibration.prompts import read_text_tokens
from edgekv.calibration.quantize import CALIBRATION_TOKENS, QDQ_OPS, quantize_qdq, vocabulary_int16
from edgekv.calibration.weight_only import (WEIGHT_ONLY_FORMATS, WeightOnlyFormat, quantize_rows,
                                            quantize_weight_only)
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import Manifest, default_artifact_dir, read_manifest, write_manifest
from edgekv.core.profiles import QUANTIZED_WEIGHT_DTYPES, SUPPORTED_WEIGHT_DTYPES, Profile, load_profile
from edgekv.export.exporter import ExportResult, export_artifact, export_result, write_float_artifact
from edgekv.export.models import load_model
from edgekv.export.weights import WeightWriter
from edgekv.runtime.embedding import mapped_weight


def export_for_profile(model_spec: str, profile_spec: str, out_dir: Path | None = None,
                       progress: Callable[[str], None] = print, step: Callable[[str, int, int], None] | None = None,
                       quantize: str | None = None, calibration_text: Path | None = None) -> ExportResult:
    """What `edgekv export` runs: float32 graphs (export/exporter.py), or with `quantize` (default: the
    profile's weight_dtype) float32 graphs first and then the INT8 artifact quantized from them: "int8" QDQ
    graphs calibrated on real activations, or "int8-weight-only" / "int4-weight-only" MatMulNBits graphs for
    onnxruntime's CPU kernels."""
    start = time.perf_counter()
    profile = load_profile(profile_spec)
    weight_dtype = quantize or profile.weight_dtype
    if weight_dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise EdgekvError(f"unknown quantization '{weight_dtype}'; choose one of: {', '.join(SUPPORTED_WEIGHT_DTYPES)}")
    if calibration_text is not None and weight_dtype != "int8":
        raise EdgekvError(f"--calibration-text calibrates the activation ranges of int8 QDQ graphs; {weight_dtype} "
                          "graphs need no calibration: drop --calibration-text")
    if weight_dtype == "float32":
        return export_artifact(model_spec, profile_spec, out_dir, progress, step)
    check_profile_allows(profile, weight_dtype)  # fail before the float32 export, not after it
    progress(f"loading model {model_spec}")
    loaded = load_model(model_spec, progress)
    if calibration_text is not None:
        tokenizer = loaded.tokenizer
        read_text_tokens(lambda text: tokenizer(text).input_ids, calibration_text, CALIBRATION_TOKENS + 1)
    out_dir = Path(out_dir) if out_dir else default_artifact_dir(loaded.source.name, profile.name, weight_dtype)
    float_dir = out_dir.with_name(out_dir.name + ".float32.partial")
    try:
        # float16 weights keep the LM head on the embedding table itself (stored once); the quantizers
        # need it as the right-hand operand.
        write_float_artifact(loaded, profile, float_dir, step, head_weight_on_right=weight_dtype != "float16")
        del loaded  # calibration runs the float32 graphs; the torch model is no longer needed
        quantize_artifact(float_dir, out_dir, weight_dtype, calibration_text, progress)
    finally:
        shutil.rmtree(float_dir, ignore_errors=True)
    return export_result(out_dir, start)


def check_profile_allows(profile: Profile, weight_dtype: str) -> None:
    """The operators the quantized graphs add must be in the profile's list."""
    needed = QDQ_OPS if weight_dtype == "int8" else ("Cast",) if weight_dtype == "float16" else \
        WEIGHT_ONLY_FORMATS[weight_dtype].ops
    missing = [op for op in needed if op not in profile.allowed_ops]
    if missing:
        # WEIGHT_ONLY_FORMATS adds operators from one dtype to the next: the last allowed is the nearest
        allowed = [d for d, form in WEIGHT_ONLY_FORMATS.items() if set(form.ops) <= set(profile.allowed_ops)]
        hint = ("export float32" if weight_dtype not in WEIGHT_ONLY_FORMATS else
                f"--quantize {allowed[-1]}" if allowed else
                "use a CPU profile such as `cpu`, or --quantize int8 for QDQ graphs")
        raise EdgekvError(f"profile {profile.name} does not allow {', '.join(missing)}, which {weight_dtype} graphs "
                          f"need; add them to its [graph] allowed_ops or {hint}")


def quantize_artifact(float_dir: Path, out_dir: Path, weight_dtype: str = "int8", text_file: Path | None = None,
                      progress: Callable[[str], None] = print, weight_only: WeightOnlyFormat | None = None) -> None:
    """Write the quantized artifact of a float32 artifact into out_dir (staged, then renamed). `weight_only`
    replaces a weight-only dtype's format (benchmarks/weight_only_formats.py compares them)."""
    source = read_manifest(float_dir)
    if "quantization" in source.data:
        raise EdgekvError(f"{float_dir} is already quantized ({source.data['quantization']['weight_dtype']}); "
                          "quantize the float32 export instead")
    if weight_dtype not in QUANTIZED_WEIGHT_DTYPES:
        raise EdgekvError(f"unknown quantization '{weight_dtype}'; choose one of: {', '.join(QUANTIZED_WEIGHT_DTYPES)}")
    check_profile_allows(source.profile, weight_dtype)

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "graphs").mkdir(parents=True)
    writer = WeightWriter(staging / "graphs", None)
    if weight_dtype == "int8":
        graphs, quantization = quantize_qdq(source, float_dir, staging, writer, text_file, progress)
    elif weight_dtype == "float16":
        graphs, quantization = convert_float16_weights(source, float_dir, staging, writer, progress)
    else:
        form = weight_only or WEIGHT_ONLY_FORMATS[weight_dtype]
        graphs, quantization = quantize_weight_only(source, float_dir, staging, writer, progress, form)
    embedding = write_embedding(source, weight_dtype, writer)
    writer.close()
    shutil.copytree(float_dir / source.data["tokenizer"]["dir"], staging / source.data["tokenizer"]["dir"])
    profile = dict(source.data["profile"])
    profile["graph"] = {**profile["graph"], "weight_dtype": weight_dtype}
    manifest = {**source.data, "profile": profile, "graphs": graphs, "weights": writer.manifest_table(),
                "embedding": embedding,
                "quantization": {"weight_dtype": weight_dtype, **quantization}}
    write_manifest(staging, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def write_embedding(source: Manifest, weight_dtype: str, writer: WeightWriter) -> dict:
    """The host's embedding table in the converted artifact, and its manifest record: for weight-only
    graphs the rows in 8-bit blocks (quantize_rows), the LM head's very codes and scales when the
    embeddings are tied; float16 rows for float16 weights (the tied LM head's very tensor); for QDQ graphs
    the 16-bit [H, V] matrix with a scale per entry, which the LM head multiplies too when the embeddings
    are tied (the same name and bytes: stored once)."""
    record = source.data["embedding"]
    table = np.array(mapped_weight(source, record["weight"]))
    if weight_dtype == "float16":
        name = record["weight"] + FLOAT16_SUFFIX
        writer.add(name, table.astype(np.float16))
        return {**record, "weight": name}
    if weight_dtype != "int8":
        codes, scales = quantize_rows(table)
        name = f"{record['weight']}.T_Q8"  # the name onnxruntime's quantizer gives the tied head's codes
        writer.add(name, codes)
        writer.add(f"{record['weight']}.T_scales", scales)
        return {"weight": name, "vocab_axis": 0, "scale": f"{record['weight']}.T_scales", "zero_point": 128}
    values, scales = vocabulary_int16(table.T)
    name = f"{record['weight']}.T_int16"
    writer.add(name, values)
    writer.add(f"{name}_scale", scales)
    return {"weight": name, "vocab_axis": 1, "scale": f"{name}_scale"}
