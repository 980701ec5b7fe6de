"""Trained adapters out of the trainer: our own format for any adapter, PEFT's for plain LoRA, and merged weights.

- :func:`export_adapters`: ``adapters.safetensors`` + ``adapters.json``, any adapter (MoE-LoRA, MoSLoRA, LoRA).
  Tensors per layer and projection, named like the base model's (``model.layers.{i}.self_attn.q_proj.lora_a``),
  in our orientation: ``lora_a (E, d_in, r)``, ``lora_b (E, r, d_out)``, ``gate (d_in, E)``, ``mixer (E, r, r)``.
  The JSON records the adapter settings, targets and the base model's config, all :func:`load_adapters` needs to
  rebuild the model.
- :func:`export_peft` (E = 1, no mixer): ``adapter_model.safetensors`` + ``adapter_config.json`` that
  ``peft.PeftModel.from_pretrained`` loads onto transformers' LLaMA: ``lora_A.weight = A^T (r, d_in)``,
  ``lora_B.weight = B^T (d_out, r)``, ``lora_alpha / r`` our scale; and a ``README.md`` model card.
- :func:`merge_adapters` / :func:`export_merged` (E = 1): ``W0 + s * A [M] B`` folded into the frozen kernels and
  written as a Hugging Face model directory that transformers and vLLM serve as is: ``config.json``
  (``LlamaForCausalLM``, the weights' dtype), ``generation_config.json``, the tokenizer with its chat template, and
  ``model.safetensors`` or, above ``max_shard_bytes``, shards listed in ``model.safetensors.index.json``.
  A gated mixture (MoE-LoRA, MoLE) depends on each token's gate, so it has neither a merged nor a PEFT form.

Every export directory appears atomically (:func:`~moelora_jax.io.atomic.atomic_directory`).
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
from huggingface_hub import split_state_dict_into_shards_factory

from moelora_jax.adapters.layers import AdapterConfig, MoleConfig
from moelora_jax.adapters.leaves import ADAPTER_LEAVES
from moelora_jax.errors import UserError
from moelora_jax.io.atomic import atomic_directory
from moelora_jax.models.llama import LlamaConfig
from moelora_jax.models.pretrained import SafetensorsFile, hf_tensors, save_safetensors

ADAPTERS_FILE, ADAPTERS_CONFIG = "adapters.safetensors", "adapters.json"
EXPORT_FORMAT = 1
MAX_SHARD_BYTES = 5 * 10**9
"""Largest ``.safetensors`` file of a merged export before it is split into shards: huggingface_hub's "5GB"."""

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


def _require_plain_lora(adapter: AdapterConfig | MoleConfig, what: str, allow_mixer: bool) -> None:
    """Raise unless ``adapter`` is plain LoRA (E = 1), with a MoSLoRA mixer only where ``allow_mixer``."""
    if adapter.num_experts != 1:
        raise UserError(
            f"{what} needs plain LoRA (adapter.kind=lora), but this adapter mixes {adapter.num_experts} experts "
            "(MoE-LoRA or MoLE) by a per-token gate, which neither merged weights nor a PEFT LoRA can express: use "
            "our export (export/adapters, or export/mole for MoLE), read by moelora_jax.formats.export.load_adapters "
            "(moelora_jax.formats.mole.load_mole) and run by moelora_jax.models.generation.generate."
        )
    if adapter.mixer and not allow_mixer:
        raise UserError(
            f"{what} has no place for a MoSLoRA mixer: use the merged export (export/merged) or ours (export/adapters)."
        )


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
    _require_plain_lora(adapter, "the PEFT export", allow_mixer=False)
    tensors, modules = {}, sorted(MODULES[t][1] for t in targets)
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
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with atomic_directory(directory) as tmp:
        save_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(_peft_model_card(adapter, modules, base_model))
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


def save_hf_weights(
    directory: str | os.PathLike, tensors: dict[str, np.ndarray], max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Write Hugging Face weights into ``directory``: ``model.safetensors``, or where they exceed
    ``max_shard_bytes``, shards ``model-00001-of-0000n.safetensors`` filled in ``tensors``' order (a tensor larger
    than the limit gets one of its own) and ``model.safetensors.index.json`` (``metadata.total_size`` in bytes,
    ``weight_map``: tensor -> file), the layout ``transformers`` writes and reads."""
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes={max_shard_bytes} must be a positive number of bytes (default 5e9).")
    directory = Path(directory)
    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
    )
    for file, names in split.filename_to_tensors.items():
        save_safetensors(directory / file, {name: tensors[name] for name in names}, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_merged(
    directory: str | os.PathLike,
    params: dict[str, Any],
    adapters: dict[str, Any],
    *,
    adapter: AdapterConfig,
    targets: Sequence[str],
    model_config: LlamaConfig,
    tokenizer: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the merged model as a Hugging Face directory that ``transformers.AutoModelForCausalLM`` and vLLM load as
    is: ``config.json`` (``LlamaForCausalLM``; ``dtype`` the weights', e.g. ``bfloat16``), ``generation_config.json``
    (the config's bos / eos / pad ids), the tokenizer's files (its chat template included) and the weights
    (:func:`save_hf_weights`)."""
    import transformers

    merged = merge_adapters(params, adapters, adapter=adapter, targets=targets)
    tensors = hf_tensors(merged, model_config)
    hf_config = model_config.to_hf()
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = tensors["model.embed_tokens.weight"].dtype.name  # every leaf has the base's weights_dtype
    generation = transformers.GenerationConfig(
        bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id, pad_token_id=hf_config.pad_token_id
    )
    with atomic_directory(directory) as tmp:
        hf_config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_hf_weights(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
