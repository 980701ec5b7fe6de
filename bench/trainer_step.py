"""Our real train step (``Trainer.train_step``: jitted, state donated) as a zero-argument closure, for timing."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from moelora_jax import AdapterConfig
from moelora_jax.models.llama import Llama, LlamaConfig, abstract_variables
from moelora_jax.optim import OptimConfig, build_optimizer
from moelora_jax.sharding import make_mesh
from moelora_jax.trainer import Trainer


def token_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """``tokens (B, T)`` as a batch in which every next token is a target (the full output head)."""
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "attention_mask": ones, "loss_mask": ones.astype(bool)}


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
    kwargs = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
    model = Llama(config, adapter=adapter, adapter_targets=tuple(targets), **kwargs)
    trainer = Trainer(model, build_optimizer(optim, nn.unbox(abstract_variables(model))["adapters"]), make_mesh())
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
