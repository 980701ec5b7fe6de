"""Merged weights: a plain LoRA (E = 1, a MoSLoRA mixer folded in) added into the frozen kernels, written as a
Hugging Face model directory that transformers and vLLM serve as is.

``W0 + s * A [M] B`` replaces each adapted kernel. The directory holds ``config.json`` (``LlamaForCausalLM``, the
weights' dtype), ``generation_config.json``, the tokenizer with its chat template, and ``model.safetensors`` or,
above ``max_shard_bytes``, shards listed in ``model.safetensors.index.json``. A gated mixture (MoE-LoRA, MoLE)
depends on each token's gate, so it has neither a merged nor a PEFT form. The directory appears atomically.
"""

from __future__ import annotations

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
from moelora_jax.errors import UserError
from moelora_jax.io.atomic import atomic_directory
from moelora_jax.io.safetensors import save_safetensors
from moelora_jax.models.llama import PROJECTIONS, LlamaConfig
from moelora_jax.models.pretrained import hf_tensors

MAX_SHARD_BYTES = 5 * 10**9
"""Largest ``.safetensors`` file of a merged export before it is split into shards: huggingface_hub's "5GB"."""


def require_plain_lora(adapter: AdapterConfig | MoleConfig, what: str, allow_mixer: bool) -> None:
    """Raise unless ``adapter`` is plain LoRA (E = 1), with a MoSLoRA mixer only where ``allow_mixer``."""
    if not adapter.kind.merges:
        raise UserError(
            f"{what} needs plain LoRA, but this adapter ({adapter.kind.value}) mixes experts by a per-token gate, "
            "which neither merged weights nor a PEFT LoRA can express: use "
            "our export (export/adapters, or export/mole for MoLE), read by moelora_jax.formats.native.load_adapters "
            "(moelora_jax.formats.mole.load_mole) and run by moelora_jax.models.generation.generate."
        )
    if adapter.mixer and not allow_mixer:
        raise UserError(
            f"{what} has no place for a MoSLoRA mixer: use the merged export (export/merged) or ours (export/adapters)."
        )


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
    require_plain_lora(adapter, "merging", allow_mixer=True)
    merged = traverse_util.flatten_dict(params)
    for target in targets:
        path = PROJECTIONS[target].path
        block, name = path[1:]
        a, b = plain_lora_factors(adapters["layers"][block][name])
        kernel = merged[*path, "kernel"]
        delta = adapter.scale * jnp.einsum("lir,lro->lio", a, b, precision="highest")
        merged[*path, "kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
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
    is: ``config.json`` (its family's class, e.g. ``LlamaForCausalLM``; ``dtype`` the weights', e.g. ``bfloat16``),
    ``generation_config.json`` (the config's bos / eos / pad ids), the tokenizer's files (its chat template included)
    and the weights (:func:`save_hf_weights`)."""
    import transformers

    merged = merge_adapters(params, adapters, adapter=adapter, targets=targets)
    tensors = hf_tensors(merged, model_config)
    hf_config = model_config.to_hf()
    hf_config.architectures = [model_config.family.architecture]
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
