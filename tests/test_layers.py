"""The package's layers: every module imports only from its own subpackage or the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

import moelora_jax

PACKAGE = Path(moelora_jax.__file__).parent
LAYERS = ("io", "parallel", "data", "adapters", "models", "optim", "formats", "evaluation", "training")
"""The subpackages from the bottom up, as docs/ARCHITECTURE.md draws them. ``errors`` sits below them all; the
package's ``__init__`` (the public API) and its commands (``compile``, ``evaluate``) sit above them all."""


def _level(module: str) -> int:
    """Where a dotted module of this package sits: -1 for ``errors``, a layer's index, or above every layer."""
    parts = module.split(".")
    if parts[1:2] == ["errors"]:
        return -1
    if len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of this package in a file, at its top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("moelora_jax")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moelora_jax"):
            if node.module == "moelora_jax":  # `from moelora_jax import x`: the package's API (or its modules)
                found += [(node.lineno, f"moelora_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _module_name(path: Path) -> str:
    return ".".join(("moelora_jax", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_every_subpackage_has_a_layer():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        for line, imported in _imports(path):
            if _level(imported) > _level(importer):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {imported}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: an adapter module importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from moelora_jax.training.trainer import Trainer\n")
    ((line, imported),) = _imports(bad)
    assert (line, _level(imported)) == (2, LAYERS.index("training"))
    assert _level("moelora_jax.adapters.layers") < _level(imported)
