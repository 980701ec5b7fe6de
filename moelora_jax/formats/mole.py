"""MoLE's experts: trained LoRAs read from disk and stacked, frozen, into the base model's parameters.

A source is a directory this project exported (``export/adapters`` of a plain LoRA run; a MoSLoRA mixer is folded
into ``A``) or a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) for the same base
model. Each LoRA's scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is folded into ``B`` and ranks are
zero-padded to the largest, so LoRA ``i`` adds ``x @ mole_a[i] @ mole_b[i]``; a projection a LoRA does not adapt
holds zeros for it. The stacks go into ``"params"`` beside each adapted kernel (see ``MoleConfig``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from moelora_jax.adapters.layers import AdapterKind, MoleConfig
from moelora_jax.errors import UserError
from moelora_jax.formats.merged import plain_lora_factors
from moelora_jax.formats.native import ADAPTERS_CONFIG, describe_adapters, is_native, load_adapters
from moelora_jax.formats.peft import PEFT_CONFIG, Factors, describe_peft, is_peft, read_peft
from moelora_jax.io.atomic import atomic_directory
from moelora_jax.io.safetensors import SafetensorsFile, save_safetensors
from moelora_jax.models.llama import PROJECTIONS, LlamaConfig


@dataclasses.dataclass(frozen=True)
class LoraStack:
    """``N`` LoRAs stacked: ``factors[target] = (A: (L, N, d_in, r), B: (L, N, r, d_out))``."""

    sources: tuple[str, ...]
    rank: int
    targets: tuple[str, ...]
    factors: dict[str, tuple[np.ndarray, np.ndarray]]


def _read_native(directory: Path, model_config: LlamaConfig) -> Factors:
    exported = load_adapters(directory)
    if exported.adapter.kind is not AdapterKind.LORA:
        raise UserError(
            f"{directory} holds a mixture of {exported.adapter.num_experts} experts; MoLE mixes plain LoRAs."
        )
    _same_base(directory, exported.model_config, model_config)
    factors = {}
    for target in exported.targets:
        block, name = PROJECTIONS[target].path[1:]
        a, b = plain_lora_factors(exported.adapters["layers"][block][name])
        factors[target] = (np.asarray(a, np.float32), exported.adapter.scale * np.asarray(b, np.float32))
    return factors


def _same_base(directory: Path, theirs: LlamaConfig, ours: LlamaConfig) -> None:
    if dataclasses.replace(theirs, eos_token_ids=(), bos_token_id=None, pad_token_id=None) != dataclasses.replace(
        ours, eos_token_ids=(), bos_token_id=None, pad_token_id=None
    ):
        raise UserError(f"{directory} was trained on another base model ({theirs}); MoLE needs LoRAs of this one.")


def read_lora(directory: str | os.PathLike, model_config: LlamaConfig) -> Factors:
    """One LoRA's factors per target, from our export (its base config must match) or a PEFT directory; shapes are
    checked against the base model when :func:`with_loras` places them."""
    if is_native(directory):
        return _read_native(Path(directory), model_config)
    if is_peft(directory):
        return read_peft(directory, model_config)
    raise _not_a_lora(Path(directory))


def _not_a_lora(directory: Path) -> UserError:
    return UserError(f"{directory} is not a LoRA: it needs {ADAPTERS_CONFIG} (our export) or {PEFT_CONFIG} (PEFT).")


def stack_loras(directories: Sequence[str | os.PathLike], model_config: LlamaConfig) -> LoraStack:
    """``N >= 2`` LoRAs as one frozen stack over the union of their targets (see the module docstring)."""
    if len(directories) < 2:
        raise UserError(f"MoLE mixes at least 2 LoRAs; got {len(directories)} directories.")
    loras = [read_lora(d, model_config) for d in directories]
    targets = tuple(t for t in PROJECTIONS if any(t in lora for lora in loras))
    rank = max(a.shape[-1] for lora in loras for a, _ in lora.values())
    factors = {}
    for target in targets:
        shapes = [(a.shape[:2], b.shape[::2]) for lora in loras if target in lora for a, b in [lora[target]]]
        (layers, d_in), (_, d_out) = shapes[0]
        if any(s != shapes[0] for s in shapes):
            raise UserError(f"the LoRAs' {target} projections differ in shape ({shapes}): they are for other bases.")
        a_stack = np.zeros((layers, len(loras), d_in, rank), np.float32)
        b_stack = np.zeros((layers, len(loras), rank, d_out), np.float32)
        for i, lora in enumerate(loras):
            if target in lora:
                a, b = lora[target]
                a_stack[:, i, :, : a.shape[-1]], b_stack[:, i, : b.shape[1]] = a, b
        factors[target] = (a_stack, b_stack)
    return LoraStack(tuple(str(d) for d in directories), rank, targets, factors)


def with_loras(params: dict[str, Any], stack: LoraStack) -> dict[str, Any]:
    """``params`` (a Llama's frozen tree) with ``mole_a`` / ``mole_b`` beside every kernel the stack adapts."""
    flat = traverse_util.flatten_dict(params)
    for target, (a, b) in stack.factors.items():
        path = PROJECTIONS[target].path
        kernel = flat[*path, "kernel"].shape
        if kernel != (a.shape[0], a.shape[2], b.shape[3]):
            raise UserError(
                f"the LoRAs' {target} projection is {a.shape[0]} x {a.shape[2]} -> {b.shape[3]} but the base "
                f"model's is {kernel[0]} x {kernel[1]} -> {kernel[2]}: they were trained on another base model."
            )
        flat[*path, "mole_a"], flat[*path, "mole_b"] = a, b
    return traverse_util.unflatten_dict(flat)


def describe_lora(directory: str | os.PathLike) -> tuple[int, tuple[str, ...]]:
    """A LoRA source's rank and targets, from its JSON alone (for describing a job before loading anything)."""
    if is_native(directory):
        adapter, targets = describe_adapters(directory)
        return adapter.rank, targets
    if is_peft(directory):
        return describe_peft(directory)
    raise _not_a_lora(Path(directory))


MOLE_GATES, MOLE_CONFIG = "mole_gates.safetensors", "mole.json"
MOLE_FORMAT = 1


def export_mole(
    directory: str | os.PathLike,
    adapters: dict[str, Any],
    *,
    mole: MoleConfig,
    sources: Sequence[str],
    targets: Sequence[str],
    model_config: LlamaConfig,
) -> Path:
    """Write a trained MoLE: its gates (``mole_gates.safetensors``, leaves named by their tree path, stacked over
    layers) and ``mole.json`` (the ``MoleConfig``, the source LoRA directories, targets and base config)."""
    tensors = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(adapters).items()}
    info = {
        "format": MOLE_FORMAT,
        "mole": dataclasses.asdict(mole),
        "sources": list(sources),
        "targets": list(targets),
        "base_model_config": model_config.to_hf().to_dict(),
    }
    with atomic_directory(directory) as tmp:
        save_safetensors(tmp / MOLE_GATES, tensors)
        (tmp / MOLE_CONFIG).write_text(json.dumps(info, indent=2))
    return Path(directory)


def load_mole(directory: str | os.PathLike) -> tuple[MoleConfig, tuple[str, ...], tuple[str, ...], dict[str, Any]]:
    """An :func:`export_mole` directory as ``(MoleConfig, sources, targets, "adapters" tree)``; the LoRAs themselves
    come from the sources (:func:`stack_loras`)."""
    directory = Path(directory)
    info = json.loads((directory / MOLE_CONFIG).read_text())
    if info.get("format") != MOLE_FORMAT:
        raise UserError(f"{directory / MOLE_CONFIG} has format {info.get('format')}; this version reads {MOLE_FORMAT}.")
    reader = SafetensorsFile(directory / MOLE_GATES)
    adapters = traverse_util.unflatten_dict({tuple(name.split("/")): reader.get(name) for name in reader})
    mole = info["mole"] | {"masked": tuple(info["mole"]["masked"])}
    return MoleConfig(**mole), tuple(info["sources"]), tuple(info["targets"]), adapters
