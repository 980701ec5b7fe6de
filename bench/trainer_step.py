"""Our real train step (``Trainer.train_step``: jitted, state donated) as a zero-argument closure, for timing."""

from __future__ import annotations

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


def trainer_step(
    config: LlamaConfig,
    params: Any,
    adapter: AdapterConfig,
    optim: OptimConfig,
    tokens: np.ndarray,
    targets: Sequence[str] = ("q", "k", "v", "o"),
    dtype: Any = None,
) -> tuple[Callable[[], jax.Array], float]:
    """``(step, first_loss)``: ``step()`` runs one update on ``tokens (B, T)`` (every next token a target),
    carrying the donated state along, and returns its loss; the first update has already run (and compiled)."""
    kwargs = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
    model = Llama(config, adapter=adapter, adapter_targets=tuple(targets), **kwargs)
    trainer = Trainer(model, build_optimizer(optim, nn.unbox(abstract_variables(model))["adapters"]), make_mesh())
    params = trainer.place_params(params)
    ones = np.ones_like(tokens)[None]
    batch = trainer.put_batch({"tokens": tokens[None], "attention_mask": ones, "loss_mask": ones}, leading=1)
    holder = {"state": trainer.init(jax.random.key(0))}

    def step() -> jax.Array:
        holder["state"], metrics = trainer.train_step(holder["state"], params, batch)
        return metrics["loss"]

    return step, float(step())
