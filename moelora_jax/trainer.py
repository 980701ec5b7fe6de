"""The training step and evaluation, each one jitted XLA program with explicit shardings over a device mesh.

Loss: mean next-token cross-entropy over the response tokens of the whole (accumulated) batch,
``L = sum_{b,t} m[b,t] * -log p(x[b,t] | x[b,<t]) / sum_{b,t} m[b,t]`` with ``m`` the loss mask. A step takes
``(n_micro, B, T)`` batches, scans over the micro-batches summing gradients of the *summed* loss and the token
counts, then divides once, so accumulating ``n`` micro-batches equals one ``n``-times larger batch exactly.
The output head runs only at the batch's ``targets`` (:mod:`moelora_jax.loss`); packed batches carry
``segment_ids`` and ``positions`` (:func:`moelora_jax.data.pack`). Gradients exist only for the ``"adapters"``
tree. With a gate, the step also reports expert load and the routing losses of :mod:`moelora_jax.routing` (over
real tokens), and with ``router_losses`` it trains on ``L + c_balance * L_balance + c_z * L_z + c_mole * L_mole``
(each averaged over micro-batches). An update whose loss or gradients are not finite is skipped (state unchanged)
and counted.
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

from moelora_jax.adapters import ROUTER_COLLECTION
from moelora_jax.data import Example, encode_prompt, left_pad, round_up
from moelora_jax.distributed import host_local_batch, to_host
from moelora_jax.generation import generate
from moelora_jax.loss import head_loss
from moelora_jax.models.llama import Llama, abstract_variables, init_variables, output_head
from moelora_jax.routing import RouterLosses, router_stats, sown_routing
from moelora_jax.sharding import DEFAULT_RULES, LogicalRules, batch_sharding, logical_shardings
from moelora_jax.tasks import Task


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
    return *head_loss(hidden, head, batch["tokens"], batch["loss_mask"], batch.get("targets")), sown


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Trainer:
    """Holds the model, optimizer and mesh; ``init``, ``train_step``, ``eval_loss`` and ``generate`` run under the
    mesh and its logical-axis rules, with parameters, adapters and batches placed by those rules."""

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
        self.shardings = logical_shardings(abstract_variables(model), mesh, rules)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._train_step = None
        self._eval_loss = jax.jit(self._eval_loss_fn)

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def place_params(self, params: Any) -> Any:
        """Frozen weights placed by the rules (a no-op for weights already loaded that way)."""
        return jax.device_put(params, self.shardings["params"])

    def init(self, rng: jax.Array) -> TrainState:
        """Fresh adapters (B = 0, so the model starts as the base) and optimizer state, placed on the mesh."""
        key_data = jax.device_put(np.asarray(jax.random.key_data(rng)), self._replicated)  # works multi-process

        def fresh(key_data):
            init_rng, rng = jax.random.split(jax.random.wrap_key_data(key_data))
            adapters = init_variables(self.model, init_rng, ("adapters",))["adapters"]
            adapters = jax.lax.with_sharding_constraint(adapters, self.shardings["adapters"])
            zero = jnp.zeros((), jnp.int32)
            return TrainState(zero, adapters, self.optimizer.init(adapters), rng, zero)

        with self._context():
            state = jax.jit(fresh)(key_data)
        return jax.device_put(state, self.state_shardings(state))

    def put_batch(self, batch: dict[str, Any], leading: int = 0) -> dict[str, jax.Array]:
        """A numpy batch (the same on every process) as global arrays sharded on axis ``leading`` over
        ``data x fsdp``; each process transfers only its own rows. Arrays already on devices pass through."""
        if all(isinstance(v, jax.Array) for v in batch.values()):
            return batch
        shape = batch["tokens"].shape[: leading + 1]
        flat = {k: np.asarray(v).reshape(-1, *np.shape(v)[leading + 1 :]) for k, v in batch.items()}
        return host_local_batch(
            lambda rows: {k: v[rows] for k, v in flat.items()}, shape, batch_sharding(self.mesh, leading)
        )

    def state_shardings(self, state: TrainState) -> TrainState:
        """Adapters by the rules; optimizer leaves as the compiler placed them; scalars and the rng replicated."""

        def sharding(x):
            return x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else self._replicated

        return TrainState(
            self._replicated,
            self.shardings["adapters"],
            jax.tree.map(sharding, state.opt_state),
            self._replicated,
            self._replicated,
        )

    def _loss_and_grads(self, params, adapters, batch, rng):
        """Mean response-token loss, gradients of the objective (that loss plus the weighted routing losses, each
        averaged over micro-batches), the target count, and the routing metrics (empty without a gate)."""
        n_micro = batch["tokens"].shape[0]
        count = jnp.sum(batch["loss_mask"][..., 1:].astype(jnp.float32))
        denom = jnp.maximum(count, 1.0)
        routed = self.model.adapter.num_experts > 1

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
        return new_state, metrics

    def _step_program(self, state: TrainState):
        if self._train_step is None:
            self._train_step = jax.jit(
                self._train_step_fn,
                in_shardings=(
                    self.state_shardings(state),
                    self.shardings["params"],
                    batch_sharding(self.mesh, leading=1),
                ),
                out_shardings=(self.state_shardings(state), self._replicated),
                donate_argnums=(0,),
            )
        return self._train_step

    def train_step(self, state: TrainState, params: Any, batch: dict[str, Any]) -> tuple[TrainState, dict]:
        """One optimizer update from a ``(n_micro, B, T)`` batch (``tokens``, ``attention_mask``, ``loss_mask``;
        optionally ``targets``, ``segment_ids``, ``positions``), numpy or global arrays from :meth:`put_batch`."""
        batch = self.put_batch(batch, leading=1)
        with self._context():
            return self._step_program(state)(state, params, batch)

    def compile_train_step(self, state: TrainState, params: Any, batch: dict[str, Any]) -> jax.stages.Compiled:
        """The train step compiled for this batch's shapes, for its ``memory_analysis()`` and ``cost_analysis()``."""
        batch = self.put_batch(batch, leading=1)
        with self._context():
            return self._step_program(state).lower(state, params, batch).compile()

    def _eval_loss_fn(self, params, adapters, batch):
        return batch_loss(self.model, {"params": params, "adapters": adapters}, batch)[:2]

    def eval_loss(self, params: Any, adapters: Any, batches: Sequence[dict[str, np.ndarray]]) -> float:
        """Mean response-token loss over ``(B, T)`` batches."""
        total = count = 0.0
        with self._context():
            for batch in batches:
                s, n = self._eval_loss(params, adapters, self.put_batch(batch))
                total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def generate_answers(
        self,
        params: Any,
        adapters: Any,
        tokenizer: Any,
        examples: Sequence[Example],
        *,
        batch_size: int,
        prompt_length: int,
        max_new_tokens: int,
        use_chat_template: bool = True,
        length_bucket: int = 0,
    ) -> list[str]:
        """Greedy answers to each example's prompt, decoded, in the examples' order.

        Prompts are batched by length, longest first, and each batch left-padded to its longest prompt rounded up to
        ``length_bucket`` (0: to ``prompt_length``), so at most ``prompt_length / length_bucket`` shapes compile."""
        eos = tuple(self.model.config.eos_token_ids) or (tokenizer.eos_token_id,)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        prompts = [
            encode_prompt(tokenizer, e.prompt, prompt_length, use_chat_template=use_chat_template) for e in examples
        ]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        variables = {"params": params, "adapters": adapters}
        with self._context():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                chunk = [prompts[i] for i in rows]
                chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape; extra rows are dropped
                length = min(prompt_length, round_up(len(chunk[0]), length_bucket)) if length_bucket else prompt_length
                tokens, mask = left_pad(chunk, length, pad)
                batch = self.put_batch({"tokens": tokens, "attention_mask": mask})
                out = generate(
                    self.model,
                    variables,
                    batch["tokens"],
                    batch["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    eos_ids=eos,
                    pad_id=pad,
                )
                for i, row in zip(rows, to_host(out), strict=False):
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True)
        return answers

    def evaluate(
        self, params: Any, adapters: Any, tokenizer: Any, task: Task, examples: Sequence[Example], **kwargs
    ) -> float:
        """The task's score (accuracy or MCC) of greedy answers; ``kwargs`` as for ``generate_answers``."""
        return task.score(self.generate_answers(params, adapters, tokenizer, examples, **kwargs), examples)
