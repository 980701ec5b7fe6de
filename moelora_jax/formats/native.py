"""Our adapter format, for any adapter (LoRA, MoSLoRA, MoE-LoRA): ``adapters.safetensors`` + ``adapters.json``.

Tensors per layer and projection, named like the base model's modules (``model.layers.{i}.self_attn.q_proj.lora_a``,
:data:`~moelora_jax.models.llama.PROJECTIONS`), in our orientation: ``lora_a (E, d_in, r)``, ``lora_b (E, r,
d_out)``, ``gate (d_in, E)``, ``mixer (E, r, r)``. The JSON records the adapter's settings, its targets and the base
model's config: all :func:`load_adapters` needs to rebuild the model. The directory appears atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from moelora_jax.adapters.layers import AdapterConfig
from moelora_jax.adapters.leaves import ADAPTER_LEAVES
from moelora_jax.errors import UserError
from moelora_jax.io.atomic import atomic_directory
from moelora_jax.io.safetensors import SafetensorsFile, save_safetensors
from moelora_jax.models.llama import PROJECTIONS, LlamaConfig

ADAPTERS_FILE, ADAPTERS_CONFIG = "adapters.safetensors", "adapters.json"
EXPORT_FORMAT = 1


def layer_leaves(adapters: dict[str, Any], targets: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
    """``(target, leaf name) -> (layers, ...)`` float32 host arrays of an ``"adapters"`` tree."""
    out = {}
    for target in targets:
        block, name = PROJECTIONS[target].path[1:]
        for leaf, value in adapters["layers"][block][name].items():
            if leaf not in ADAPTER_LEAVES:
                raise ValueError(f"adapter leaf {target}.{leaf} is not one of {ADAPTER_LEAVES}: it would not load.")
            out[target, leaf] = np.asarray(jax.device_get(value), np.float32)
    return out


def adapter_tensors(adapters: dict[str, Any], targets: Sequence[str]) -> dict[str, np.ndarray]:
    """``model.layers.{i}.<module>.<leaf>`` -> one layer's leaf, for every target projection."""
    tensors = {}
    for (target, leaf), stacked in layer_leaves(adapters, targets).items():
        for i, layer in enumerate(stacked):
            tensors[f"{PROJECTIONS[target].hf_name(i)}.{leaf}"] = layer
    return tensors


def export_adapters(
    directory: str | os.PathLike,
    adapters: dict[str, Any],
    *,
    adapter: AdapterConfig,
    targets: Sequence[str],
    model_config: LlamaConfig,
    base_model: str = "",
) -> Path:
    """Write ``adapters.safetensors`` and ``adapters.json`` to ``directory`` (replacing an earlier export)."""
    info = {
        "format": EXPORT_FORMAT,
        "library": "moelora_jax",
        "adapter": dataclasses.asdict(adapter),
        "targets": list(targets),
        "num_layers": model_config.num_layers,
        "layout": "lora_a (E, d_in, r), lora_b (E, r, d_out), gate (d_in, E), mixer (E, r, r); y = x W0 + "
        "(alpha / r) sum_i g_i(x) (x A_i [M_i]) B_i",
        "base_model": base_model,
        "base_model_config": model_config.to_hf().to_dict(),
    }
    with atomic_directory(directory) as tmp:
        save_safetensors(tmp / ADAPTERS_FILE, adapter_tensors(adapters, targets), {"format": "moelora_jax"})
        (tmp / ADAPTERS_CONFIG).write_text(json.dumps(info, indent=2))
    return Path(directory)


@dataclasses.dataclass(frozen=True)
class ExportedAdapters:
    """What :func:`load_adapters` read: ``Llama(model_config, adapter=adapter, adapter_targets=targets)`` applies
    ``{"params": base, "adapters": adapters}``."""

    adapter: AdapterConfig
    targets: tuple[str, ...]
    model_config: LlamaConfig
    adapters: dict[str, Any]
    base_model: str


def is_native(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds our adapter export (its JSON)."""
    return (Path(directory) / ADAPTERS_CONFIG).exists()


def _info(directory: Path) -> dict[str, Any]:
    """The export's JSON, checked for this version's format."""
    config_path = directory / ADAPTERS_CONFIG
    if not config_path.exists() or not (directory / ADAPTERS_FILE).exists():
        raise UserError(f"{directory} is not an adapter export: it needs {ADAPTERS_CONFIG} and {ADAPTERS_FILE}.")
    info = json.loads(config_path.read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{config_path} has export format {info.get('format')}; this version reads {EXPORT_FORMAT}.")
    return info


def describe_adapters(directory: str | os.PathLike) -> tuple[AdapterConfig, tuple[str, ...]]:
    """An export's adapter and targets, from its JSON alone (no tensor is read)."""
    info = _info(Path(directory))
    return AdapterConfig(**info["adapter"]), tuple(info["targets"])


def load_adapters(directory: str | os.PathLike) -> ExportedAdapters:
    """Read an :func:`export_adapters` directory back into an ``"adapters"`` tree (numpy, stacked over layers)."""
    directory = Path(directory)
    info = _info(directory)
    reader = SafetensorsFile(directory / ADAPTERS_FILE)
    by_target: dict[tuple[str, ...], list[np.ndarray]] = {}
    for target in info["targets"]:
        projection = PROJECTIONS[target]
        for leaf in ADAPTER_LEAVES:
            names = [f"{projection.hf_name(i)}.{leaf}" for i in range(info["num_layers"])]
            if names[0] in reader:
                by_target[*projection.path, leaf] = [reader.get(n) for n in names]
    adapters = traverse_util.unflatten_dict({k: np.stack(v) for k, v in by_target.items()})
    return ExportedAdapters(
        AdapterConfig(**info["adapter"]),
        tuple(info["targets"]),
        LlamaConfig.from_hf(info["base_model_config"]),
        adapters,
        info.get("base_model", ""),
    )
