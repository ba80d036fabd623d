from pathlib import Path

import pytest

from conftest import run_edgekv
from edgekv.core.errors import EdgekvError
from edgekv.core.profiles import load_profile, shipped_profile_names

SHIPPED = {"cpu": (8, 512, 64), "npu-small": (8, 512, 64), "npu-medium": (16, 1024, 128), "npu-large": (16, 2048, 128)}


def test_shipped_profiles_have_the_documented_budgets():
    assert shipped_profile_names() == sorted(SHIPPED)
    for name, (page, budget, chunk) in SHIPPED.items():
        p = load_profile(name)
        assert (p.name, p.page_size, p.decode_budget, p.prefill_chunk, p.opset) == (name, page, budget, chunk, 17)
        assert p.layer_budget(0, prefill=False) == 4 * budget == p.layer_budget(1, prefill=False)
        assert p.layer_budget(2, prefill=False) == budget
        assert p.layer_budget(0, prefill=True) == 4 * p.prefill_budget


def _write_variant(tmp_path: Path, old: str, new: str) -> Path:
    text = (Path(__file__).parents[1] / "edgekv/device_profiles/npu-small.toml").read_text()
    assert old in text
    path = tmp_path / "custom.toml"
    path.write_text(text.replace(old, new))
    return path


def test_user_profile_file_loads(tmp_path):
    path = _write_variant(tmp_path, "decode_budget = 512", "decode_budget = 256")
    assert load_profile(str(path)).decode_budget == 256


@pytest.mark.parametrize("old,new,message", [
    ("page_size = 8", "page_size = 8\nbudget = 3", "unknown key 'kv.budget'"),
    ("page_size = 8", "page_sise = 8", "unknown key 'kv.page_sise'"),
    ("opset = 17", "", "missing key 'graph.opset'"),
    ("page_size = 8", "page_size = 17", "key 'kv.page_size' must be a power of two"),
    ("decode_budget = 512", "decode_budget = 500", "key 'kv.decode_budget' must be a multiple of kv.page_size"),
    ("decode_budget = 512", 'decode_budget = "512"', "key 'kv.decode_budget' must be a positive integer"),
    ('kv_dtype = "float32"', 'kv_dtype = "float13"', "key 'kv.kv_dtype' must be one of"),
    ("int8_tops = 6.0", "int8_tops = -1", "key 'device.int8_tops' must be a positive number"),
    ("[runtime]", '[runtime]\npositions = "relative"', "key 'runtime.positions' must be one of"),
    ("[kv]", "[kv]\nlocal_window = -8", "key 'kv.local_window' must be an integer number of tokens >= 0"),
    ("[kv]", "[kv]\nlocal_window = 12", "key 'kv.local_window' must be a multiple of kv.page_size"),
    ("[runtime]", "[runtim]", "unknown key 'runtim'"),
])
def test_bad_profile_keys_are_named(tmp_path, old, new, message):
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(EdgekvError, match=message.replace("(", r"\(")):
        load_profile(str(path))


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(EdgekvError) as error:
        load_profile("npu-tiny")
    assert "unknown profile 'npu-tiny'" in str(error.value)
    assert all(name in str(error.value) for name in SHIPPED)


def test_profiles_cli_lists_and_shows():
    listing = run_edgekv("profiles", check=True).stdout.splitlines()
    assert [line.split()[0] for line in listing] == sorted(SHIPPED)
    shown = run_edgekv("profiles", "show", "npu-medium", check=True).stdout
    assert "decode_budget = 1024" in shown and "prefill_chunk = 128" in shown
