"""Loading a config file (``configs/*.py`` with ``get_config(preset)``) by path, as ``train.py --config`` does."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ml_collections import ConfigDict


def load_module(path: str | os.PathLike) -> ModuleType:
    """The Python file at ``path`` imported as a module (registered as ``_file_<stem>``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    name = f"_file_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_config(path: str | os.PathLike, preset: str = "") -> Any:
    """``get_config(preset)`` of the config file at ``path`` (an ``ml_collections.ConfigDict``)."""
    return load_module(path).get_config(preset)


def dataclass_section(instance: Any) -> ConfigDict:
    """A config section of every field of a library dataclass (``OptimConfig``, ``AdapterConfig``) at
    ``instance``'s values: its keys and defaults stay the dataclass's own, set once there."""
    return ConfigDict(dataclasses.asdict(instance))
