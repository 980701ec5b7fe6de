"""The training step and the evaluation loss, each one jitted XLA program with explicit shardings over a mesh.

Loss: mean next-token cross-entropy over the response tokens of the whole (accumulated) batch,
``L = sum_{b,t} m[b,t] * -log p(x[b,t] | x[b,<t]) / sum_{b,t} m[b,t]`` with ``m`` the loss mask. A step takes
``(n_micro, B, T)`` batches, scans over the micro-batches summing gradients of the *summed* loss and the token
counts, then divides once, so accumulating ``n`` micro-batches equals one ``n``-times larger batch exactly.
The output head runs only at the batch's ``targets`` (:mod:`moelora_jax.models.loss`); packed batches carry
``segment_ids`` and ``positions`` (:func:`moelora_jax.data.encoding.pack`). Gradients exist only for the ``"adapters"``
tree. With a gate, the step also reports expert load and the routing losses of :mod:`moelora_jax.adapters.routing` (over
real tokens), and with ``router_losses`` it trains on ``L + c_balance * L_balance + c_z * L_z + c_mole * L_mole``
(each averaged over micro-batches). An update whose loss or gradients are not finite is skipped (state unchanged)
and counted; the count is also among the step's metrics (``skipped``), so a loop reads it without touching the
donated state. Evaluation by generation is :mod:`moelora_jax.evaluation.scoring`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from moelora_jax.adapters.layers import ROUTER_COLLECTION
from moelora_jax.adapters.routing import RouterLosses, router_stats, sown_routing
from moelora_jax.models.llama import Llama, abstract_variables, init_variables, output_head
from moelora_jax.models.loss import head_loss
from moelora_jax.parallel.distributed import fetch, host_local_batch
from moelora_jax.parallel.sharding import DEFAULT_RULES, LogicalRules, batch_sharding, logical_shardings


class TrainState(NamedTuple):
    """``step``: updates attempted; ``skipped``: of those, how many were dropped as non-finite."""

    step: jax.Array
    adapters: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


def batch_loss(model: Llama, variables: dict[str, Any], batch: dict[str, jax.Array], **apply_kwargs) -> tuple:
    """Summed next-token NLL of a ``(B, T)`` batch over its targets, their count, and what ``apply_kwargs``'
    ``mutable`` collections sowed (``{}`` without). The batch's optional ``segment_ids``, ``positions`` and
    ``targets`` are used when present."""
    hidden = model.apply(
        variables,
        batch["tokens"],
        batch["attention_mask"],
        batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        output="hidden",
        **apply_kwargs,
    )
    hidden, sown = hidden if "mutable" in apply_kwargs else (hidden, {})
    head = output_head(variables["params"], model.config)
    cap = model.config.final_logit_softcap
    return *head_loss(hidden, head, batch["tokens"], batch["loss_mask"], batch.get("targets"), cap=cap), sown


def _optimizer_state_shardings(
    optimizer: optax.GradientTransformation, adapters: Any, adapter_shardings: Any, replicated: NamedSharding
) -> Any:
    """The optimizer state's shardings, from its shapes alone (``jax.eval_shape`` of ``init``): optax's
    ``tree_map_params`` gives each parameter-shaped subtree the adapters' shardings (``optax.partition``'s masked
    placeholders stay as they are) and every other leaf (counts) ``replicated``."""

    def masked(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    return optax.tree_map_params(
        optimizer,
        lambda leaf, sharding: leaf if masked(leaf) else sharding,
        jax.eval_shape(optimizer.init, adapters),
        adapter_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )


def _with_sharding(shape: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Trainer:
    """Holds the model, optimizer and mesh; ``init``, ``train_step`` and ``eval_loss`` run under the mesh and its
    logical-axis rules (:meth:`context`), with parameters, adapters, optimizer state and batches placed by them.

    Every sharding is declared before anything runs: the adapters' by the rules, the optimizer state's mapped from
    the adapters' (each leaf of the state shaped like an adapter leaf is sharded like it; counts and other
    scalars are replicated), so the step's input and output shardings and a checkpoint's restore target are fixed
    by the model and optimizer alone.
    """

    def __init__(
        self,
        model: Llama,
        optimizer: optax.GradientTransformation,
        mesh: jax.sharding.Mesh,
        rules: LogicalRules = DEFAULT_RULES,
        router_losses: RouterLosses | None = None,
    ) -> None:
        if model.adapter is None:
            raise ValueError("the model has no adapter: training updates adapters only.")
        self.model, self.optimizer, self.mesh, self.rules = model, optimizer, mesh, rules
        self.router_losses = router_losses or RouterLosses()
        abstract = abstract_variables(model)
        self.shardings = logical_shardings(abstract, mesh, rules)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            self._replicated,
            self.shardings["adapters"],
            _optimizer_state_shardings(
                optimizer, nn.unbox(abstract)["adapters"], self.shardings["adapters"], self._replicated
            ),
            self._replicated,
            self._replicated,
        )
        self._train_step = None
        self._eval_loss = jax.jit(self._eval_loss_fn)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical-axis rules every program of this trainer's model runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def place_params(self, params: Any) -> Any:
        """Frozen weights placed by the rules (a no-op for weights already loaded that way)."""
        return jax.device_put(params, self.shardings["params"])

    def _fresh(self, key_data: jax.Array) -> TrainState:
        init_rng, rng = jax.random.split(jax.random.wrap_key_data(key_data))
        adapters = init_variables(self.model, init_rng, ("adapters",))["adapters"]
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, adapters, self.optimizer.init(adapters), rng, zero)

    def init(self, rng: jax.Array) -> TrainState:
        """Fresh adapters (B = 0, so the model starts as the base) and optimizer state, placed on the mesh."""
        key_data = jax.device_put(np.asarray(jax.random.key_data(rng)), self._replicated)  # works multi-process
        with self.context():
            return jax.jit(self._fresh, out_shardings=self.state_shardings)(key_data)

    def abstract_state(self) -> TrainState:
        """The shapes, dtypes and shardings of :meth:`init`'s state, computed without running it."""
        key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        with self.context():
            shapes = jax.eval_shape(self._fresh, key_data)
        return jax.tree.map(_with_sharding, shapes, self.state_shardings)

    def abstract_params(self) -> Any:
        """The shapes, dtypes and shardings of the frozen weights, as the rules place them."""
        shapes = nn.unbox(abstract_variables(self.model))["params"]
        return jax.tree.map(_with_sharding, shapes, self.shardings["params"])

    def put_batch(self, batch: dict[str, Any], leading: int = 0) -> dict[str, jax.Array]:
        """A numpy batch (the same on every process) as global arrays sharded on axis ``leading`` over
        ``data x fsdp``; each process transfers only its own rows. Arrays already on devices, and abstract ones
        (``jax.ShapeDtypeStruct``, for compiling), pass through."""
        if all(isinstance(v, jax.Array | jax.ShapeDtypeStruct) for v in batch.values()):
            return batch
        shape = batch["tokens"].shape[: leading + 1]
        flat = {k: np.asarray(v).reshape(-1, *np.shape(v)[leading + 1 :]) for k, v in batch.items()}
        return host_local_batch(
            lambda rows: {k: v[rows] for k, v in flat.items()}, shape, batch_sharding(self.mesh, leading)
        )

    def _loss_and_grads(self, params, adapters, batch, rng):
        """Mean response-token loss, gradients of the objective (that loss plus the weighted routing losses, each
        averaged over micro-batches), the target count, and the routing metrics (empty without a gate)."""
        n_micro = batch["tokens"].shape[0]
        count = jnp.sum(batch["loss_mask"][..., 1:].astype(jnp.float32))
        denom = jnp.maximum(count, 1.0)
        routed = self.model.adapter.kind.routed

        def micro(carry, xs):
            grads, total = carry
            mb, index = xs

            def loss(ad):
                summed, _, sown = batch_loss(
                    self.model,
                    {"params": params, "adapters": ad},
                    mb,
                    deterministic=False,
                    rngs={"dropout": jax.random.fold_in(rng, index)},
                    mutable=[ROUTER_COLLECTION],
                )
                if not routed:
                    return summed, (summed, {})
                stats = router_stats(sown_routing(sown), mb["attention_mask"])
                aux, values = self.router_losses(stats)
                objective = summed + aux * denom / n_micro if self.router_losses.active else summed
                return objective, (summed, values)

            (_, (summed, values)), g = jax.value_and_grad(loss, has_aux=True)(adapters)
            return (jax.tree.map(jnp.add, grads, g), total + summed), values

        init = (jax.tree.map(jnp.zeros_like, adapters), jnp.zeros((), jnp.float32))
        (grads, total), values = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
        metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), values)
        return total / denom, jax.tree.map(lambda g: g / denom, grads), count, metrics

    def _train_step_fn(self, state: TrainState, params: Any, batch: dict[str, jax.Array]):
        rng, step_rng = jax.random.split(state.rng)
        loss, grads, count, routing = self._loss_and_grads(params, state.adapters, batch, step_rng)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.adapters)
        adapters = optax.apply_updates(state.adapters, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            state.step + 1,
            keep(adapters, state.adapters),
            keep(opt_state, state.opt_state),
            rng,
            state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        )
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads), "finite": finite} | routing
        return new_state, metrics | {"skipped": new_state.skipped}

    def _step_program(self):
        if self._train_step is None:
            self._train_step = jax.jit(
                self._train_step_fn,
                in_shardings=(self.state_shardings, self.shardings["params"], batch_sharding(self.mesh, leading=1)),
                out_shardings=(self.state_shardings, self._replicated),
                donate_argnums=(0,),
            )
        return self._train_step

    def train_step(self, state: TrainState, params: Any, batch: dict[str, Any]) -> tuple[TrainState, dict]:
        """One optimizer update from a ``(n_micro, B, T)`` batch (``tokens``, ``attention_mask``, ``loss_mask``;
        optionally ``targets``, ``segment_ids``, ``positions``), numpy or global arrays from :meth:`put_batch`."""
        batch = self.put_batch(batch, leading=1)
        with self.context():
            return self._step_program()(state, params, batch)

    def compile_train_step(self, state: TrainState, params: Any, batch: dict[str, Any]) -> jax.stages.Compiled:
        """The train step compiled for these arguments' shapes (arrays, or the ``jax.ShapeDtypeStruct`` trees of
        :meth:`abstract_state`, :meth:`abstract_params` and a batch), for its ``memory_analysis()`` and
        ``cost_analysis()``."""
        batch = self.put_batch(batch, leading=1)
        with self.context():
            return self._step_program().lower(state, params, batch).compile()

    def compile_eval_loss(self, params: Any, adapters: Any, batch: dict[str, Any]) -> jax.stages.Compiled:
        """The held-out loss program compiled for a ``(B, T)`` batch of these shapes (arrays or
        ``jax.ShapeDtypeStruct``)."""
        with self.context():
            return self._eval_loss.lower(params, adapters, self.put_batch(batch)).compile()

    def _eval_loss_fn(self, params, adapters, batch):
        return batch_loss(self.model, {"params": params, "adapters": adapters}, batch)[:2]

    def eval_loss(self, params: Any, adapters: Any, batches: Sequence[dict[str, np.ndarray]]) -> float:
        """Mean response-token loss over ``(B, T)`` batches: every batch is dispatched, then their loss sums and
        target counts are fetched at once and summed on the host (in float64)."""
        with self.context():
            sums = [self._eval_loss(params, adapters, self.put_batch(batch)) for batch in batches]
        total = count = 0.0
        for s, n in fetch(sums):
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)
