"""Warm starts: a run's adapters taken from an adapter directory instead of drawn at random (``adapter.init_from``).

The directory is our export (``export/adapters``) or, for plain LoRA, a PEFT LoRA directory. Only the adapters are
taken: the optimizer starts fresh and the step count at 0, which is what tells a warm start from resuming a
checkpoint (a run's own checkpoint, when it has one, is resumed instead, and its fingerprint records the source's
digest, :func:`source_digest`). The function the adapters compute is kept exactly:

- From our export (any adapter): every leaf as exported, ``B`` rescaled by ``s' / s`` (the export's scale over this
  run's ``s = alpha / r``); the experts, rank, mixer and targets must be this run's.
- From a PEFT LoRA (plain LoRA runs, E = 1): each projection's ``A`` and ``B``, ``B`` rescaled by ``s' / s`` with
  PEFT's ``s' = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); a run with a MoSLoRA mixer starts it at the
  identity.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from moelora_jax.adapters.layers import AdapterConfig, AdapterKind
from moelora_jax.errors import UserError
from moelora_jax.formats.native import ADAPTERS_CONFIG, ADAPTERS_FILE, is_native, load_adapters
from moelora_jax.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS, is_peft, read_peft
from moelora_jax.models.llama import PROJECTIONS, LlamaConfig


def source_digest(directory: str | os.PathLike) -> str:
    """A short SHA-256 of an adapter directory's weights and config (what a checkpoint's fingerprint records)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in (ADAPTERS_CONFIG, ADAPTERS_FILE, PEFT_CONFIG, PEFT_WEIGHTS):
        if (directory / name).exists():
            digest.update(name.encode() + (directory / name).read_bytes())
    return digest.hexdigest()[:16]


def _check_targets(directory: Path, found: Sequence[str], targets: Sequence[str]) -> None:
    if sorted(found) != sorted(targets):
        raise UserError(
            f"{directory} adapts {','.join(sorted(found))} but the adapter's targets are {','.join(sorted(targets))}: "
            "target the source's projections."
        )


def _from_peft(directory: Path, adapter: AdapterConfig, targets: Sequence[str], model_config: LlamaConfig) -> dict:
    """Leaves ``{(block, proj, leaf): array}`` of a plain LoRA run from a PEFT LoRA directory."""
    factors = read_peft(directory, model_config)
    _check_targets(directory, factors, targets)
    leaves = {}
    for target, (a, scaled_b) in factors.items():
        if a.shape[-1] != adapter.rank:
            raise UserError(
                f"{directory} has rank {a.shape[-1]} but the adapter's is {adapter.rank}: give the adapter rank "
                f"{a.shape[-1]}."
            )
        block, name = PROJECTIONS[target].path[1:]
        leaves[block, name, "lora_a"] = a[:, None]
        leaves[block, name, "lora_b"] = scaled_b[:, None] / adapter.scale
        if adapter.mixer:
            leaves[block, name, "mixer"] = np.broadcast_to(np.eye(adapter.rank), (a.shape[0], 1, *[adapter.rank] * 2))
    return leaves


def _from_native(directory: Path, adapter: AdapterConfig, targets: Sequence[str]) -> dict:
    """Leaves ``{(block, proj, leaf): array}`` from our export of an adapter of the same shape."""
    exported = load_adapters(directory)
    theirs = exported.adapter
    for name in ("num_experts", "rank", "mixer"):
        if getattr(theirs, name) != getattr(adapter, name):
            raise UserError(
                f"{directory} has {name}={getattr(theirs, name)} but the adapter's is {getattr(adapter, name)}: a warm "
                f"start keeps the adapter's shape (give the adapter the source's {name})."
            )
    _check_targets(directory, exported.targets, targets)
    leaves = {}
    for target in targets:
        block, name = PROJECTIONS[target].path[1:]
        for leaf, value in exported.adapters["layers"][block][name].items():
            rescale = theirs.scale / adapter.scale if leaf == "lora_b" else 1.0
            leaves[block, name, leaf] = np.asarray(value, np.float32) * rescale
    return leaves


def warm_adapters(
    directory: str | os.PathLike,
    fresh: dict[str, Any],
    *,
    adapter: AdapterConfig,
    targets: Sequence[str],
    model_config: LlamaConfig,
) -> dict[str, Any]:
    """The ``"adapters"`` tree ``fresh`` (host arrays, as ``Trainer.init`` draws them) with every leaf taken from the
    adapter directory (see the module docstring), in ``fresh``'s dtypes; a one-line ``UserError`` when the source
    is not an adapter, or its kind, rank, targets or shapes are not this run's."""
    directory = Path(directory)
    if not is_native(directory) and not is_peft(directory):
        raise UserError(
            f"{directory} is not an adapter directory: it needs {ADAPTERS_CONFIG} (our export) or {PEFT_CONFIG} (PEFT)."
        )
    if is_native(directory):
        leaves = _from_native(directory, adapter, targets)
    elif adapter.kind is AdapterKind.LORA:
        leaves = _from_peft(directory, adapter, targets, model_config)
    else:
        raise UserError(
            f"{directory} is a PEFT LoRA, which warm-starts a plain LoRA only (this adapter is {adapter.kind.value})."
        )
    flat = traverse_util.flatten_dict(fresh["layers"])
    for key, value in flat.items():
        if key not in leaves:
            raise UserError(f"{directory} has no {'.'.join(key)}, which the adapter has.")
        if leaves[key].shape != value.shape:
            raise UserError(
                f"{directory}: its {'.'.join(key)} is {leaves[key].shape} but this model's is "
                f"{value.shape}: the source was trained on another base model."
            )
        flat[key] = np.asarray(leaves[key], value.dtype)
    return {**fresh, "layers": traverse_util.unflatten_dict(flat)}
