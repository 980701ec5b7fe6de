"""Our real train step (``Trainer.train_step``: jitted, state donated), built by the job setup's ``build_trainer``, as a
zero-argument closure, for timing."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from bbc_batches import CONFIG

from moelora_jax import AdapterConfig
from moelora_jax.models.llama import LlamaConfig
from moelora_jax.optim.optimizer import OptimConfig
from moelora_jax.parallel.sharding import make_mesh
from moelora_jax.training.config_file import load_config
from moelora_jax.training.job import build_trainer
from moelora_jax.training.settings import Settings


def token_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """``tokens (B, T)`` as a batch in which every next token is a target (the full output head)."""
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "attention_mask": ones, "loss_mask": ones.astype(bool)}


def job_settings(adapter: AdapterConfig, optim: OptimConfig, targets: Sequence[str], dtype: Any = None) -> Settings:
    """``configs/llama_moelora.py``'s settings with this adapter on ``targets``, this optimizer and, if given, the
    compute and weights ``dtype``."""
    base = Settings.from_config(load_config(CONFIG))
    model = base.model
    if dtype is not None:
        model = dataclasses.replace(model, dtype=np.dtype(dtype).name, param_dtype=np.dtype(dtype).name)
    adapter_settings = dataclasses.replace(base.adapter, config=adapter, targets=tuple(targets))
    return dataclasses.replace(base, model=model, adapter=adapter_settings, optim=optim)


def trainer_step(
    config: LlamaConfig,
    params: Any,
    adapter: AdapterConfig,
    optim: OptimConfig,
    batches: np.ndarray | Sequence[dict[str, np.ndarray]],
    targets: Sequence[str] = ("q", "k", "v", "o"),
    dtype: Any = None,
) -> tuple[Callable[[], jax.Array], float]:
    """``(step, first_loss)``: ``step()`` runs one update on the next of ``batches`` (``(B, T)`` batch dicts, in a
    cycle; or a ``(B, T)`` token array, every next token a target), carrying the donated state along, and returns
    its loss. Every batch shape has already been compiled; ``first_loss`` is that of the first batch at init."""
    trainer = build_trainer(job_settings(adapter, optim, targets, dtype), config, make_mesh())
    params = trainer.place_params(params)
    if isinstance(batches, np.ndarray):
        batches = [token_batch(batches)]
    placed = [trainer.put_batch(jax.tree.map(lambda x: x[None], b), leading=1) for b in batches]
    holder = {"state": trainer.init(jax.random.key(0))}
    cycle = itertools.cycle(placed)

    def step() -> jax.Array:
        holder["state"], metrics = trainer.train_step(holder["state"], params, next(cycle))
        return metrics["loss"]

    first = float(step())
    for _ in range(len(placed) - 1):  # compile every shape before timing
        step()
    return step, first
