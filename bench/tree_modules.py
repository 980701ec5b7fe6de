"""A module of whichever tree a worker imports (``PYTHONPATH``), for the benchmarks that run an older commit beside
this one: its path in subpackages (``training.run``), else its path in a tree from before the subpackages (``run``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def tree_module(path: str, flat_path: str) -> ModuleType:
    """``moelora_jax.<path>`` of this tree, else ``moelora_jax.<flat_path>`` of a tree with flat modules."""
    try:
        return importlib.import_module(f"moelora_jax.{path}")
    except ModuleNotFoundError as error:
        if error.name is None or not f"moelora_jax.{path}".startswith(error.name):
            raise
        return importlib.import_module(f"moelora_jax.{flat_path}")
