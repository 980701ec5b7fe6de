"""Trained adapters out of the trainer: our own format for any adapter, PEFT's for plain LoRA, and merged weights.

- :func:`export_adapters`: ``adapters.safetensors`` + ``adapters.json``, any adapter (MoE-LoRA, MoSLoRA, LoRA).
  Tensors per layer and projection, named like the base model's (``model.layers.{i}.self_attn.q_proj.lora_a``),
  in our orientation: ``lora_a (E, d_in, r)``, ``lora_b (E, r, d_out)``, ``gate (d_in, E)``, ``mixer (E, r, r)``.
  The JSON records the adapter settings, targets and the base model's config, all :func:`load_adapters` needs to
  rebuild the model.
- :func:`export_peft` (E = 1, no mixer): ``adapter_model.safetensors`` + ``adapter_config.json`` that
  ``peft.PeftModel.from_pretrained`` loads onto transformers' LLaMA: ``lora_A.weight = A^T (r, d_in)``,
  ``lora_B.weight = B^T (d_out, r)``, ``lora_alpha / r`` our scale.
- :func:`merge_adapters` / :func:`export_merged` (E = 1): ``W0 + s * A [M] B`` folded into the frozen kernels and
  written as a plain Hugging Face model directory. A gated mixture depends on each token's gate, so it has no
  merged form.

Every export directory appears atomically (:func:`~moelora_jax.atomic.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moelora_jax.adapter_leaves import ADAPTER_LEAVES
from moelora_jax.adapters import AdapterConfig
from moelora_jax.atomic import atomic_directory
from moelora_jax.errors import UserError
from moelora_jax.models.llama import LlamaConfig
from moelora_jax.pretrained import SafetensorsFile, hf_tensors, save_safetensors

ADAPTERS_FILE, ADAPTERS_CONFIG = "adapters.safetensors", "adapters.json"
EXPORT_FORMAT = 1

MODULES = {
    "q": ("attn", "q_proj", "self_attn.q_proj"),
    "k": ("attn", "k_proj", "self_attn.k_proj"),
    "v": ("attn", "v_proj", "self_attn.v_proj"),
    "o": ("attn", "o_proj", "self_attn.o_proj"),
    "gate": ("mlp", "gate_proj", "mlp.gate_proj"),
    "up": ("mlp", "up_proj", "mlp.up_proj"),
    "down": ("mlp", "down_proj", "mlp.down_proj"),
}
"""Target name -> (our block, our projection, the Hugging Face module path inside a layer)."""


def _layer_leaves(adapters: dict[str, Any], targets: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
    """``(target, leaf name) -> (layers, ...)`` host arrays of an ``"adapters"`` tree."""
    out = {}
    for target in targets:
        block, proj, _ = MODULES[target]
        for leaf, value in adapters["layers"][block][proj].items():
            if leaf not in ADAPTER_LEAVES:
                raise ValueError(f"adapter leaf {target}.{leaf} is not one of {ADAPTER_LEAVES}: it would not load.")
            out[target, leaf] = np.asarray(jax.device_get(value), np.float32)
    return out


def adapter_tensors(adapters: dict[str, Any], targets: Sequence[str]) -> dict[str, np.ndarray]:
    """``model.layers.{i}.<module>.<leaf>`` -> one layer's leaf, for every target projection."""
    tensors = {}
    for (target, leaf), stacked in _layer_leaves(adapters, targets).items():
        for i, layer in enumerate(stacked):
            tensors[f"model.layers.{i}.{MODULES[target][2]}.{leaf}"] = layer
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


def load_adapters(directory: str | os.PathLike) -> ExportedAdapters:
    """Read an :func:`export_adapters` directory back into an ``"adapters"`` tree (numpy, stacked over layers)."""
    directory = Path(directory)
    config_path, tensors_path = directory / ADAPTERS_CONFIG, directory / ADAPTERS_FILE
    if not config_path.exists() or not tensors_path.exists():
        raise UserError(f"{directory} is not an adapter export: it needs {ADAPTERS_CONFIG} and {ADAPTERS_FILE}.")
    info = json.loads(config_path.read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{config_path} has export format {info.get('format')}; this version reads {EXPORT_FORMAT}.")
    reader = SafetensorsFile(tensors_path)
    by_target: dict[tuple[str, ...], list[np.ndarray]] = {}
    for target in info["targets"]:
        block, proj, module = MODULES[target]
        for leaf in ADAPTER_LEAVES:
            names = [f"model.layers.{i}.{module}.{leaf}" for i in range(info["num_layers"])]
            if names[0] in reader:
                by_target["layers", block, proj, leaf] = [reader.get(n) for n in names]
    adapters = traverse_util.unflatten_dict({k: np.stack(v) for k, v in by_target.items()})
    return ExportedAdapters(
        AdapterConfig(**info["adapter"]),
        tuple(info["targets"]),
        LlamaConfig.from_hf(info["base_model_config"]),
        adapters,
        info.get("base_model", ""),
    )


def _require_plain_lora(adapter: AdapterConfig, what: str, allow_mixer: bool) -> None:
    if adapter.num_experts != 1:
        raise UserError(
            f"{what} needs plain LoRA (adapter.kind=lora), but this adapter mixes {adapter.num_experts} experts by "
            "an input-dependent gate: use the adapters.safetensors export."
        )
    if adapter.mixer and not allow_mixer:
        raise UserError(f"{what} has no MoSLoRA mixer: use the merged or the adapters.safetensors export.")


def export_peft(
    directory: str | os.PathLike,
    adapters: dict[str, Any],
    *,
    adapter: AdapterConfig,
    targets: Sequence[str],
    base_model: str = "",
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``) for E = 1, no mixer."""
    _require_plain_lora(adapter, "the PEFT export", allow_mixer=False)
    tensors = {}
    for (target, leaf), stacked in _layer_leaves(adapters, targets).items():
        name = {"lora_a": "lora_A", "lora_b": "lora_B"}[leaf]
        for i, layer in enumerate(stacked):
            tensors[f"base_model.model.model.layers.{i}.{MODULES[target][2]}.{name}.weight"] = layer[0].T.copy()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(MODULES[t][1] for t in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with atomic_directory(directory) as tmp:
        save_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(directory)


def plain_lora_factors(leaves: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """One projection's plain LoRA (E = 1) as ``A: (L, d_in, r)`` and ``B: (L, r, d_out)``, a MoSLoRA mixer folded
    into ``A`` (``A M``); the scale is not applied."""
    a, b = leaves["lora_a"][:, 0], leaves["lora_b"][:, 0]
    if "mixer" in leaves:
        a = jnp.einsum("lir,lrs->lis", a, leaves["mixer"][:, 0])
    return a, b


def merge_adapters(
    params: dict[str, Any], adapters: dict[str, Any], *, adapter: AdapterConfig, targets: Sequence[str]
) -> dict[str, Any]:
    """Frozen ``params`` with ``W0 + s * A [M] B`` in place of each adapted kernel (computed in float32, stored
    in the kernel's dtype); E = 1 only."""
    _require_plain_lora(adapter, "merging", allow_mixer=True)
    merged = traverse_util.flatten_dict(params)
    for target in targets:
        block, proj, _ = MODULES[target]
        a, b = plain_lora_factors(adapters["layers"][block][proj])
        kernel = merged["layers", block, proj, "kernel"]
        delta = adapter.scale * jnp.einsum("lir,lro->lio", a, b, precision="highest")
        merged["layers", block, proj, "kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(merged)


def export_merged(
    directory: str | os.PathLike,
    params: dict[str, Any],
    adapters: dict[str, Any],
    *,
    adapter: AdapterConfig,
    targets: Sequence[str],
    model_config: LlamaConfig,
    tokenizer: Any = None,
) -> Path:
    """Write the merged model as a Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer)."""
    merged = merge_adapters(params, adapters, adapter=adapter, targets=targets)
    with atomic_directory(directory) as tmp:
        model_config.to_hf().save_pretrained(tmp)
        save_safetensors(tmp / "model.safetensors", hf_tensors(merged, model_config), {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
