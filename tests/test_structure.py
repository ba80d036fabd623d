"""The package's structure, measured: layers that only point down, no import cycles, short modules, and
the commands that run a model never import torch or transformers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "edgekv"
# Each package of edgekv and its floor: a module may import its own package and the floors below its own.
LAYERS = {"core": 0, "device_profiles": 0, "runtime": 1, "export": 1, "evaluation": 2, "targets": 2, "calibration": 3,
          "api": 3, "server": 4, "cli": 5}
LONG_MODULE_LINES = 300
LONG_MODULE_REASON = "Longer than 300 lines because"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edgekv_imports(path: Path) -> set[str]:
    """Every edgekv module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("edgekv")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgekv"):
            for alias in node.names:  # `from edgekv.core import errors` imports a module, not a name
                child = f"{node.module}.{alias.name}"
                found.add(child if (PACKAGE.parent / child.replace(".", "/")).with_suffix(".py").exists() else node.module)
    return found


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the root package (its version only)


MODULES = {module_name(path): edgekv_imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_package_has_a_layer():
    assert {package_of(m) for m in MODULES} - {None} == set(LAYERS)


def test_imports_only_point_down():
    upward = []
    for module, imports in MODULES.items():
        mine = package_of(module)
        for imported in imports:
            theirs = package_of(imported)
            if mine is None or theirs is None or theirs == mine:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_no_import_cycles():
    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in MODULES.get(module, ()):
            if imported != "edgekv":
                visit(imported, path + [module])
        done.add(module)

    done: set[str] = set()
    for module in MODULES:
        visit(module, [])


def test_long_modules_say_why():
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LONG_MODULE_LINES and LONG_MODULE_REASON not in docstring:
            unexplained.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
    assert unexplained == []


def modules_loaded_by(args: list[str], stdin: str = "") -> set[str]:
    """Run an edgekv command in a subprocess, as its console script does; the modules it had imported."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n'))\n"
            f"sys.argv = ['edgekv'] + {args!r}\n"
            "from edgekv.cli.main import main\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_running_a_model_imports_neither_torch_nor_transformers(command, tiny_artifacts):
    artifact = str(tiny_artifacts["llama"])
    if command == "generate":
        loaded = modules_loaded_by(["generate", artifact, "--prompt", "Hi", "--max-new-tokens", "2"])
    else:
        loaded = modules_loaded_by(["chat", artifact, "--max-new-tokens", "2"], stdin="Hello\n/stats\n")
    assert "onnxruntime" in loaded and "edgekv.runtime.engine" in loaded  # it really ran the model
    assert {"torch", "transformers", "onnx"} & loaded == set()
