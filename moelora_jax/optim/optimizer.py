"""The whole adapter optimizer, built from a config: parameter groups, schedules and the preconditioner.

Adapter leaves are labelled by name (``adapter_labels``, the names of :mod:`moelora_jax.adapters.leaves`): ``lora_a``
/ ``lora_b`` / ``mixer`` are ``experts``, ``gate`` and ``log_tau`` (a MoLE gate's temperature) are ``gate``, and any
leaf named in ``frozen`` is ``frozen`` (no update). Each group gets its own chain under ``optax.partition``::

    experts: [riemann_precond(reg)] -> sgd | adamw | reference_adamw   (lr schedule, weight decay on factors)
    gate:    [clip_by_global_norm(c)] -> the same family                 (its own lr schedule)

(Gradient accumulation happens inside the trainer's step, which sums micro-batch gradients before one update.)
With ``gauss_seidel`` the experts follow the reference code's scaled AdamW exactly: ``A`` is preconditioned (by the
old ``B``) and updated first, then ``G_B`` is preconditioned by the *updated* ``A`` before ``B``'s update.
``reference_adamw`` is the reference code's AdamW: no bias correction and ``eps`` outside the square root,
``u = -lr * m / (sqrt(v) + eps)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from moelora_jax.adapters.leaves import FACTOR_LEAVES, GATE_LEAVES, leaf_name
from moelora_jax.errors import UserError, check_at_least, check_choice
from moelora_jax.optim.riemann import riemann_precond

Family = Literal["sgd", "adamw", "reference_adamw"]
FAMILIES: tuple[str, ...] = ("sgd", "adamw", "reference_adamw")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """How adapters are optimised (see the module docstring). Schedules are in optimizer updates, not micro-steps.
    The defaults are the ones ``configs/llama_moelora.py`` runs, which takes this section from here."""

    family: Family = "adamw"
    lr: float = 1e-3
    gate_lr: float = 1e-3
    gate_clip_norm: float | None = 1.0
    momentum: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    riemann: bool = True
    riemann_reg: float = 1e-6
    gauss_seidel: bool = False
    warmup_steps: int = 0
    decay_steps: int | None = None
    end_factor: float = 0.0
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Raises UserError naming the first bad setting."""
        check_choice("OptimConfig.family", self.family, FAMILIES)
        for name in ("lr", "gate_lr", "weight_decay", "momentum", "end_factor", "warmup_steps"):
            check_at_least(f"OptimConfig.{name}", getattr(self, name), 0)
        if self.riemann and self.riemann_reg <= 0:
            raise UserError(f"OptimConfig.riemann_reg={self.riemann_reg} must be > 0.")
        if self.gauss_seidel and not self.riemann:
            raise UserError(
                "OptimConfig.gauss_seidel=True preconditions with the updated factors: it needs riemann=True."
            )
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise UserError(f"OptimConfig.decay_steps={self.decay_steps} must exceed warmup_steps={self.warmup_steps}.")
        if self.gate_clip_norm is not None and self.gate_clip_norm <= 0:
            raise UserError(f"OptimConfig.gate_clip_norm={self.gate_clip_norm} must be > 0 (or None for no clipping).")


def lr_schedule(peak: float, config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then linear decay to ``end_factor * peak`` at ``decay_steps``
    (held there after); constant after warmup when ``decay_steps`` is None."""
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps) if config.warmup_steps else None
    if config.decay_steps is None:
        after = optax.constant_schedule(peak)
    else:
        after = optax.linear_schedule(peak, peak * config.end_factor, config.decay_steps - config.warmup_steps)
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [config.warmup_steps])


class ReferenceAdamState(NamedTuple):
    mu: Any
    nu: Any


def scale_by_reference_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """The reference code's Adam direction: ``m / (sqrt(v) + eps)`` with the raw (not bias-corrected) moments."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return ReferenceAdamState(zeros, zeros)

    def update(grads, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, grads)
        updates = jax.tree.map(lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, grads)
        return updates, ReferenceAdamState(mu, nu)

    return optax.GradientTransformation(init, update)


def adapter_labels(adapters: Any, frozen: tuple[str, ...] = ()) -> Any:
    """``"experts"``, ``"gate"`` or ``"frozen"`` per adapter leaf, by the leaf's name."""

    def label(path, _):
        name = leaf_name(path)
        if name in frozen:
            return "frozen"
        if name in GATE_LEAVES:
            return "gate"
        if name in FACTOR_LEAVES:
            return "experts"
        raise ValueError(f"adapter leaf {jax.tree_util.keystr(path)} is not an expert factor, mixer or gate.")

    return jax.tree_util.tree_map_with_path(label, adapters)


def _family(config: OptimConfig, lr: optax.Schedule, decay: bool) -> optax.GradientTransformation:
    weight_decay = config.weight_decay if decay else 0.0
    if config.family == "sgd":
        parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        return optax.chain(*parts, optax.sgd(lr, momentum=config.momentum or None))
    if config.family == "adamw":
        return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=weight_decay)
    parts = [scale_by_reference_adam(config.b1, config.b2, config.eps)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts, optax.scale_by_learning_rate(lr))


def _named(name: str):
    """A mask function: True on leaves called ``name`` (optax ``MaskedNode`` placeholders hold no leaves)."""
    return lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path) == name, tree)


class GaussSeidelState(NamedTuple):
    lora_a: Any
    lora_b: Any


def gauss_seidel_precond(inner: optax.GradientTransformation, reg: float) -> optax.GradientTransformationExtraArgs:
    """Precondition and update ``lora_a`` first, then precondition ``G_B`` with the updated ``A`` and update
    ``lora_b``; ``inner`` runs separately (own state) on each factor. Only ``lora_a`` / ``lora_b`` leaves allowed."""
    inner_a, inner_b = optax.masked(inner, _named("lora_a")), optax.masked(inner, _named("lora_b"))
    precond = riemann_precond(reg)

    def init(params):
        paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        others = {leaf_name(path) or jax.tree_util.keystr(path) for path in paths} - {"lora_a", "lora_b"}
        if others:
            raise UserError(f"optim gauss_seidel=True supports lora_a / lora_b experts only, not {sorted(others)}.")
        return GaussSeidelState(inner_a.init(params), inner_b.init(params))

    def update(grads, state, params=None, **extra):
        del extra
        if params is None:
            raise ValueError("gauss_seidel_precond needs the current parameters.")
        is_a = _named("lora_a")(grads)
        pre_a, _ = precond.update(grads, optax.EmptyState(), params)
        step_a, state_a = inner_a.update(pre_a, state.lora_a, params)
        moved = jax.tree.map(lambda p, u, a: p + u if a else p, params, step_a, is_a)
        pre_b, _ = precond.update(grads, optax.EmptyState(), moved)
        step_b, state_b = inner_b.update(pre_b, state.lora_b, params)
        updates = jax.tree.map(lambda ua, ub, a: ua if a else ub, step_a, step_b, is_a)
        return updates, GaussSeidelState(state_a, state_b)

    return optax.GradientTransformationExtraArgs(init, update)


def build_optimizer(config: OptimConfig, adapters: Any) -> optax.GradientTransformation:
    """The optimizer for an ``"adapters"`` tree (its structure fixes the labels); UserError if ``config.frozen``
    freezes some but not all of the tree's factor leaves, which ``riemann`` preconditions together."""
    if config.riemann:
        names = {leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
        factors = names & set(FACTOR_LEAVES)
        if set(config.frozen) & factors not in (set(), factors):
            raise UserError(
                f"optim frozen={config.frozen} splits the adapters' {' / '.join(sorted(factors))}: riemann=True "
                "preconditions them together, so freeze all of them or none (or set riemann=False)."
            )
    experts = _family(config, lr_schedule(config.lr, config), decay=True)
    if config.gauss_seidel:
        experts = gauss_seidel_precond(experts, config.riemann_reg)
    elif config.riemann:
        experts = optax.chain(riemann_precond(config.riemann_reg), experts)
    gate = _family(config, lr_schedule(config.gate_lr, config), decay=False)
    if config.gate_clip_norm is not None:
        gate = optax.chain(optax.clip_by_global_norm(config.gate_clip_norm), gate)
    return optax.partition(
        {"experts": experts, "gate": gate, "frozen": optax.set_to_zero()}, adapter_labels(adapters, config.frozen)
    )
