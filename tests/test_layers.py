"""The import direction of the layers: core <- data <- training <- bench <- cli.

A module of a layer imports only its own layer and lower ones. Two checks, each able to fail:

* at run time: importing a layer and every module under it (in a fresh interpreter) leaves no
  module of a higher layer in ``sys.modules``;
* statically: no ``import`` / ``from ... import`` anywhere in a layer's source, including those
  inside functions (the lazy ones the run-time check never executes), names a higher layer;
  ``from senslora import NAME`` counts as the layer that defines the public name.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import senslora

LAYERS = ("core", "data", "training", "bench", "cli")
PACKAGE = Path(senslora.__file__).parent


def layer_index(module: str) -> int | None:
    """Position of ``module``'s layer in :data:`LAYERS`; ``None`` for the top-level package and
    for anything outside senslora."""
    parts = module.split(".")
    if parts[0] != "senslora" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def higher(layer: str, modules) -> list[str]:
    own = LAYERS.index(layer)
    return sorted(m for m in modules if (i := layer_index(m)) is not None and i > own)


IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "senslora" or m.startswith("senslora."))))
"""


def loaded_by(package: str) -> list[str]:
    """The senslora modules in ``sys.modules`` after importing ``package`` and all its modules."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, package], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layer", LAYERS)
def test_importing_a_layer_loads_no_higher_layer(layer):
    loaded = loaded_by(f"senslora.{layer}")
    assert f"senslora.{layer}" in loaded
    missing = sorted(set(_modules_under(layer)) - set(loaded))
    assert not missing, f"not imported: {missing}"
    assert not higher(layer, loaded), f"importing senslora.{layer} loaded {higher(layer, loaded)}"


def _modules_under(layer: str) -> list[str]:
    root = PACKAGE / layer
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


def imported_modules(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``path``, at any depth, relative imports resolved."""
    rel = path.relative_to(package_dir.parent).with_suffix("")
    package = rel.parts[:-1]  # a module's package; an __init__'s package is its own folder
    exports = senslora._EXPORTS
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "senslora":  # the lazy public names and the layer packages themselves
                for alias in node.names:
                    if alias.name in exports:
                        found.append((node.lineno, f"senslora.{exports[alias.name]}"))
                    else:
                        found.append((node.lineno, f"senslora.{alias.name}"))
            else:
                found.append((node.lineno, target))
    return found


def upward_imports(layer: str, package_dir: Path = PACKAGE) -> list[str]:
    own = LAYERS.index(layer)
    bad = []
    for path in sorted((package_dir / layer).rglob("*.py")):
        for line, module in imported_modules(path, package_dir):
            index = layer_index(module)
            if index is not None and index > own:
                bad.append(f"{path.relative_to(package_dir.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_higher_layer(layer):
    assert not upward_imports(layer)


def test_every_module_lives_in_a_layer():
    """Only the package's face (``__init__``, ``__main__``) sits outside the layers."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        LAYERS
    )


def test_the_static_check_sees_a_lazy_upward_import(tmp_path):
    """A violating import inside a function is reported (so the check above can fail)."""
    fake = tmp_path / "senslora"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text(
        "def f():\n    from ..cli.recipes import run_allocate\n\n"
        "def g():\n    from senslora import load_model\n"
    )
    assert upward_imports("core", fake) == [
        "senslora/core/bad.py:2 imports senslora.cli.recipes",
        "senslora/core/bad.py:5 imports senslora.data.models",
    ]


def test_the_run_time_check_sees_an_upward_module():
    assert higher(
        "data", ["senslora", "senslora.core.errors", "senslora.data.models", "senslora.training.train"]
    ) == ["senslora.training.train"]
