"""PEFT's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``), written for a plain LoRA and read
as a MoLE source or a warm start.

PEFT stores each projection's factors in PyTorch's orientation, ``lora_A.weight = A^T (r, d_in)`` and
``lora_B.weight = B^T (d_out, r)``, under ``base_model.model.<module>``, with the scale ``lora_alpha / r`` (``/
sqrt(r)`` with rsLoRA) in its config. :func:`export_peft` writes what ``peft.PeftModel.from_pretrained`` loads onto
transformers' LLaMA, and a ``README.md`` model card; :func:`read_peft` reads any plain PEFT LoRA of a LLaMA base back
into our ``(A, B)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelora_jax.adapters.layers import AdapterConfig
from moelora_jax.errors import UserError
from moelora_jax.formats.merged import require_plain_lora
from moelora_jax.formats.native import layer_leaves
from moelora_jax.io.atomic import atomic_directory
from moelora_jax.io.safetensors import SafetensorsFile, save_safetensors
from moelora_jax.models.llama import PROJECTIONS, LlamaConfig

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Factors = dict[str, tuple[np.ndarray, np.ndarray]]
"""target -> ``(A: (L, d_in, r), B: (L, r, d_out))`` float32, the scale folded into ``B``."""


def _tensor_name(target: str, layer: int, factor: str) -> str:
    """PEFT's name of one layer's ``factor`` (``"A"`` or ``"B"``) of a target projection."""
    return f"base_model.model.{PROJECTIONS[target].hf_name(layer)}.lora_{factor}.weight"


def is_peft(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a PEFT adapter (its config)."""
    return (Path(directory) / PEFT_CONFIG).exists()


PEFT_CARD = """\
---
{front_matter}
---

# LoRA adapter

A plain LoRA trained with moelora_jax (JAX/Flax) and written in PEFT's format. Each target projection of every
decoder layer computes `y = x W0 + (alpha / r) * (x A) B`, with `W0` frozen, `A: (d_in, r)` and `B: (r, d_out)`.

| setting | value |
| --- | --- |
| base model | `{base_model}` |
| method | LoRA |
| rank r | {rank} |
| alpha | {alpha:g} (scale alpha / r = {scale:g}) |
| dropout | {dropout:g} (training only) |
| targets | {targets} |

## Loading

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({base_model_literal})
model = PeftModel.from_pretrained(base, "path/to/this/directory")
```
"""
"""``README.md`` of a PEFT export; ``front_matter`` is the model card's YAML metadata (Hugging Face Hub keys)."""


def _peft_model_card(adapter: AdapterConfig, modules: Sequence[str], base_model: str) -> str:
    """The ``README.md`` of a PEFT export: YAML front matter (``base_model``, ``library_name: peft``, tags), the
    method and its settings, and how to load it with ``peft.PeftModel.from_pretrained``."""
    front_matter = [f"base_model: {json.dumps(base_model)}"] if base_model else []
    front_matter += ["library_name: peft", "pipeline_tag: text-generation", "tags:", "- lora", "- moelora_jax"]
    base = base_model or "path/to/the/base/model"
    return PEFT_CARD.format(
        front_matter="\n".join(front_matter),
        base_model=base,
        base_model_literal=json.dumps(base),
        rank=adapter.rank,
        alpha=adapter.alpha,
        scale=adapter.scale,
        dropout=adapter.dropout,
        targets=", ".join(f"`{m}`" for m in modules),
    )


def export_peft(
    directory: str | os.PathLike,
    adapters: dict[str, Any],
    *,
    adapter: AdapterConfig,
    targets: Sequence[str],
    base_model: str = "",
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``, ``README.md``) for E = 1,
    no mixer; ``base_model`` (a Hub id or a path) goes into its config and model card."""
    require_plain_lora(adapter, "the PEFT export", allow_mixer=False)
    tensors, modules = {}, sorted(PROJECTIONS[t].name for t in targets)
    for (target, leaf), stacked in layer_leaves(adapters, targets).items():
        factor = {"lora_a": "A", "lora_b": "B"}[leaf]
        for i, layer in enumerate(stacked):
            tensors[_tensor_name(target, i, factor)] = layer[0].T.copy()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with atomic_directory(directory) as tmp:
        save_safetensors(tmp / PEFT_WEIGHTS, tensors, {"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(_peft_model_card(adapter, modules, base_model))
    return Path(directory)


def _config(directory: Path) -> dict[str, Any]:
    """A PEFT directory's config, refused unless it is a plain LoRA this project reads."""
    config = json.loads((directory / PEFT_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UserError(f"{directory} is not a plain LoRA (peft_type {config.get('peft_type')}, DoRA or similar).")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{directory} sets rank_pattern/alpha_pattern, which are not read: export a plain LoRA.")
    return config


def describe_peft(directory: str | os.PathLike) -> tuple[int, tuple[str, ...]]:
    """A PEFT LoRA's rank and targets, from its config alone (no tensor is read)."""
    config = _config(Path(directory))
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    names = {projection.name: target for target, projection in PROJECTIONS.items()}
    return int(config["r"]), tuple(names[m.split(".")[-1]] for m in modules if m.split(".")[-1] in names)


def read_peft(directory: str | os.PathLike, model_config: LlamaConfig) -> Factors:
    """A plain PEFT LoRA's factors per target it adapts, in our orientation, its scale folded into ``B``."""
    directory = Path(directory)
    config = _config(directory)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    reader = SafetensorsFile(directory / PEFT_WEIGHTS)
    factors = {}
    layers = range(model_config.num_layers)
    for target in PROJECTIONS:
        if _tensor_name(target, 0, "A") not in reader:
            continue
        a = np.stack([reader.get(_tensor_name(target, i, "A")).T for i in layers]).astype(np.float32)
        b = np.stack([reader.get(_tensor_name(target, i, "B")).T for i in layers]).astype(np.float32)
        factors[target] = (a, scale * b)
    if not factors:
        raise UserError(f"{directory}/{PEFT_WEIGHTS} has no LoRA weights for a LLaMA projection this base model has.")
    return factors
