"""Device profiles: what a static-shape NPU accepts and what the host runtime may use.

A profile is a TOML file with four tables ([kv], [graph], [runtime], [device]). The shipped ones live
in `edgekv/device_profiles/`; a user passes a path to their own. Every key is checked, and required
unless it has a default (kv.layer_budgets, kv.local_window, graph.mask_value, device.qnn_*,
runtime.backend, runtime.positions): unknown
keys, missing keys and bad values are errors that name the key and the expected form.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import MISSING, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from edgekv.core.constants import BACKENDS, KV_DTYPES, MASK_VALUE, POSITION_SCHEMES
from edgekv.core.errors import EdgekvError

# float16: weights stored in float16, computed in float32 (what RKNN and the HTP hold); int8: QDQ graphs
# calibrated on real activations (NPUs); int8-weight-only, int4-weight-only and int4-split-activations:
# onnxruntime's CPU MatMulNBits kernels (calibration/weight_only.py)
SUPPORTED_WEIGHT_DTYPES = ("float32", "float16", "int8", "int8-weight-only", "int4-weight-only",
                           "int4-split-activations")
QUANTIZED_WEIGHT_DTYPES = tuple(d for d in SUPPORTED_WEIGHT_DTYPES if d != "float32")
SUPPORTED_KV_DTYPES = KV_DTYPES  # how pages are stored in the host and disk tiers (runtime/page_format.py)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    # [kv] paging and budgets, in tokens
    page_size: int
    decode_budget: int
    prefill_chunk: int
    prefill_budget: int
    dense_layers: int  # the first layers, far less sparse (Quest): they get a larger budget
    dense_layer_budget_factor: int
    kv_dtype: str
    # [graph] what the device compiler accepts
    opset: int
    weight_dtype: str
    max_tensor_bytes: int
    allowed_ops: tuple[str, ...]
    # [runtime] what the host runtime may use
    device_kv_bytes: int
    host_kv_bytes: int
    execution_providers: tuple[str, ...]
    # [device] figures used to project speed onto the device
    int8_tops: float
    memory_bandwidth_gbps: float
    host_link_gbps: float
    call_overhead_us: float
    # [kv] optional: one decode budget per layer, as `edgekv calibrate` fits them (empty: from the above)
    layer_budgets: tuple[int, ...] = ()
    # [graph] optional: the additive mask of KV slots a query must not see (some quantizers refuse -65504)
    mask_value: float = MASK_VALUE
    # [device] optional: the Hexagon HTP that `edgekv compile --target qnn-htp` compiles for (QNN's
    # htp_arch and soc_model; the defaults are Snapdragon 8 Gen 3's)
    qnn_htp_arch: int = 75
    qnn_soc_model: int = 57
    # [runtime] optional: the backend that runs the graphs when the artifact was compiled for it (else cpu)
    backend: str = "cpu"
    # [runtime] optional: where the paged cache's keys sit for the queries (runtime/positions.py)
    positions: str = "clamped"
    # [kv] optional: tokens of the most recent pages that every quest or rerank selection keeps (a local window)
    local_window: int = 0

    def layer_budget(self, layer: int, prefill: bool) -> int:
        """Static KV budget (tokens) of one layer's graph."""
        if self.layer_budgets and not prefill:
            return self.layer_budgets[layer]
        base = self.prefill_budget if prefill else self.decode_budget
        return base * self.dense_layer_budget_factor if layer < self.dense_layers else base

    def to_tables(self) -> dict[str, Any]:
        """The profile in its TOML table layout, so it reloads through the same checks."""
        data: dict[str, Any] = {}
        for table, key in list(_SCHEMA) + list(_OPTIONAL):
            value = getattr(self, key)
            if (table, key) in _OPTIONAL and value == _OPTIONAL[(table, key)]:
                continue
            value = list(value) if isinstance(value, tuple) else value
            (data.setdefault(table, {}) if table else data)[key] = value
        return data


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _string_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v)


def _one_of(options: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in options


# (table, key) -> (check, expected form shown in errors)
_SCHEMA: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("", "name"): (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("", "description"): (lambda v: isinstance(v, str), "a string"),
    ("kv", "page_size"): (lambda v: _positive_int(v) and v & (v - 1) == 0, "a power of two, e.g. 16"),
    ("kv", "decode_budget"): (_positive_int, "a positive integer number of tokens"),
    ("kv", "prefill_chunk"): (_positive_int, "a positive integer number of tokens"),
    ("kv", "prefill_budget"): (_positive_int, "a positive integer number of tokens"),
    ("kv", "dense_layers"): (_non_negative_int, "an integer >= 0"),
    ("kv", "dense_layer_budget_factor"): (_positive_int, "a positive integer, e.g. 4"),
    ("kv", "kv_dtype"): (_one_of(SUPPORTED_KV_DTYPES), f"one of {list(SUPPORTED_KV_DTYPES)}"),
    ("graph", "opset"): (lambda v: _positive_int(v) and 13 <= v <= 21, "an ONNX opset from 13 to 21"),
    ("graph", "weight_dtype"): (_one_of(SUPPORTED_WEIGHT_DTYPES), f"one of {list(SUPPORTED_WEIGHT_DTYPES)}"),
    ("graph", "max_tensor_bytes"): (_positive_int, "a positive integer number of bytes"),
    ("graph", "allowed_ops"): (_string_list, "a non-empty list of ONNX operator names"),
    ("runtime", "device_kv_bytes"): (_positive_int, "a positive integer number of bytes"),
    ("runtime", "host_kv_bytes"): (_positive_int, "a positive integer number of bytes"),
    ("runtime", "execution_providers"): (_string_list, 'a non-empty list, e.g. ["CPUExecutionProvider"]'),
    ("device", "int8_tops"): (_positive_number, "a positive number (INT8 tera-operations/s)"),
    ("device", "memory_bandwidth_gbps"): (_positive_number, "a positive number (GB/s)"),
    ("device", "host_link_gbps"): (_positive_number, "a positive number (GB/s)"),
    ("device", "call_overhead_us"): (_positive_number, "a positive number (microseconds per graph call)"),
}


# Optional keys (checked like the others when present; their defaults are the dataclass's).
_SCHEMA_OPTIONAL: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("kv", "layer_budgets"): (lambda v: isinstance(v, list) and len(v) > 0 and all(_positive_int(x) for x in v),
                              "a non-empty list of positive integers, one decode budget per layer"),
    # At most -50: exp of it must vanish beside a live slot's score, in float16 as in float32.
    ("graph", "mask_value"): (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                              and MASK_VALUE <= v <= -50, f"a number from {MASK_VALUE:g} to -50"),
    ("device", "qnn_htp_arch"): (_positive_int, "QNN's HTP architecture number, e.g. 75"),
    ("device", "qnn_soc_model"): (_positive_int, "QNN's SoC model number, e.g. 57"),
    ("runtime", "backend"): (_one_of(BACKENDS), f"one of {list(BACKENDS)}"),
    ("runtime", "positions"): (_one_of(POSITION_SCHEMES), f"one of {list(POSITION_SCHEMES)}"),
    ("kv", "local_window"): (_non_negative_int, "an integer number of tokens >= 0"),
}
# (table, key) -> default, from the Profile dataclass, so a default is written once
_OPTIONAL: dict[tuple[str, str], Any] = {
    (table, f.name): f.default for f in fields(Profile) if f.default is not MISSING
    for table, key in _SCHEMA_OPTIONAL if key == f.name}


def _key_name(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def profile_from_dict(data: dict[str, Any], origin: str) -> Profile:
    """Check every key of a parsed profile and build the Profile; errors name the key."""
    tables = {t for t, _ in _SCHEMA if t}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in tables:
            if not isinstance(value, dict):
                raise EdgekvError(f"profile {origin}: [{key}] must be a table")
            for sub, sub_value in value.items():
                if (key, sub) not in _SCHEMA and (key, sub) not in _OPTIONAL:
                    raise EdgekvError(f"profile {origin}: unknown key '{key}.{sub}'; allowed in [{key}]: "
                                      + ", ".join(k for t, k in list(_SCHEMA) + list(_OPTIONAL) if t == key))
                flat[sub] = sub_value
        elif ("", key) in _SCHEMA:
            flat[key] = value
        else:
            raise EdgekvError(f"profile {origin}: unknown key '{key}'; top-level keys are name, description "
                              f"and the tables {sorted(tables)}")
    for (table, key), (check, expected) in _SCHEMA.items():
        if key not in flat:
            raise EdgekvError(f"profile {origin}: missing key '{_key_name(table, key)}' ({expected})")
        if not check(flat[key]):
            raise EdgekvError(f"profile {origin}: key '{_key_name(table, key)}' must be {expected}, "
                              f"got {flat[key]!r}")
    for (table, key), (check, expected) in _SCHEMA_OPTIONAL.items():
        if key in flat and not check(flat[key]):
            raise EdgekvError(f"profile {origin}: key '{_key_name(table, key)}' must be {expected}, "
                              f"got {flat[key]!r}")
    for key in ("allowed_ops", "execution_providers", "layer_budgets"):
        if key in flat:
            flat[key] = tuple(flat[key])
    for key in ("int8_tops", "memory_bandwidth_gbps", "host_link_gbps", "call_overhead_us", "mask_value"):
        if key in flat:
            flat[key] = float(flat[key])
    profile = Profile(**flat)
    _check_budgets(profile, origin)
    return profile


def _check_budgets(p: Profile, origin: str) -> None:
    for key in ("decode_budget", "prefill_chunk", "prefill_budget", "local_window"):
        if getattr(p, key) % p.page_size:
            raise EdgekvError(f"profile {origin}: key 'kv.{key}' must be a multiple of kv.page_size "
                              f"({p.page_size}), got {getattr(p, key)}")
    for budget in p.layer_budgets:
        if budget % p.page_size or budget < 2 * p.page_size:
            raise EdgekvError(f"profile {origin}: every value of 'kv.layer_budgets' must be a multiple of kv.page_size "
                              f"({p.page_size}) of at least 2 pages, got {budget}")
    # A decode step needs the sink page and the current page; a prefill chunk needs the sink page,
    # the page it starts in and every page it covers.
    if p.decode_budget < 2 * p.page_size:
        raise EdgekvError(f"profile {origin}: key 'kv.decode_budget' must be at least 2 pages "
                          f"({2 * p.page_size} tokens), got {p.decode_budget}")
    if p.prefill_budget < p.prefill_chunk + 2 * p.page_size:
        raise EdgekvError(f"profile {origin}: key 'kv.prefill_budget' must be at least kv.prefill_chunk + "
                          f"2 pages ({p.prefill_chunk + 2 * p.page_size} tokens), got {p.prefill_budget}")


def profile_toml(profile: Profile) -> str:
    """The profile as a TOML file that load_profile reads back to the same Profile. (Values are strings,
    numbers and lists of them, which JSON writes in TOML's own syntax.)"""
    lines = []
    for table, values in profile.to_tables().items():
        if not isinstance(values, dict):
            lines.append(f"{table} = {json.dumps(values)}")
    for table, values in profile.to_tables().items():
        if isinstance(values, dict):
            lines += ["", f"[{table}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def shipped_profile_names() -> list[str]:
    folder = resources.files("edgekv.device_profiles")
    return sorted(f.name.removesuffix(".toml") for f in folder.iterdir() if f.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (npu-small, ...) or a user's TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.is_file():
            raise EdgekvError(f"profile file {name_or_path} does not exist; pass an existing .toml file "
                              f"or one of: {', '.join(shipped_profile_names())}")
        text, origin = path.read_text(), str(path)
    else:
        names = shipped_profile_names()
        if name_or_path not in names:
            raise EdgekvError(f"unknown profile '{name_or_path}'; choose one of: {', '.join(names)}, "
                              "or pass the path of a .toml file")
        text = resources.files("edgekv.device_profiles").joinpath(f"{name_or_path}.toml").read_text()
        origin = name_or_path
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgekvError(f"profile {origin} is not valid TOML: {e}") from None
    return profile_from_dict(data, origin)
