"""Expert load and the auxiliary routing losses of MoE-LoRA gates, from the routing decisions the gates sow.

For one router (a gated projection in one layer) over tokens ``t`` with weights ``w_t`` (1 on real tokens, 0 on
padding; ``n = sum_t w_t``), logits ``z_t: (E,)``, probabilities ``p_t = softmax(z_t)`` and top-k set ``K_t``::

    load        f_i = sum_t w_t [i in K_t] / (k n)      share of the routed slots expert i receives (sums to 1)
    importance  P_i = sum_t w_t p_ti / n                 mean router probability of expert i (sums to 1)
    balance     E * sum_i f_i P_i                         Switch Transformer (Fedus et al. 2022, eq. 4); 1 when even
    z-loss      sum_t w_t logsumexp(z_t)^2 / n           ST-MoE (Zoph et al. 2022, eq. 5)
    MoLE        -sum_i log q_i,  q_i = mean_r P_ri       MoLE's gating balance loss (Wu et al. 2024, eqs. 14-15)

Only ``P`` and the z-loss carry gradient (``f`` counts discrete choices). ``K_t`` is the gate's own top-k choice,
sown beside its logits (:class:`~moelora_jax.adapters.layers.GateRouting`), so no second top-k runs. A dense gate
(``k = E``, e.g. MoLE's) sends every token to every expert, so there the load is the share of gate weight, ``f = P``.
Dividing ``f`` by ``k`` makes the balance loss 1 under even routing for any top-k (Hugging Face's Mixtral loss omits
it and bottoms out at ``k``). Over all routers of a model the losses are averaged, so their coefficients (Switch:
1e-2; ST-MoE: 1e-3; MoLE: 0.5) do not depend on depth. For MoE-LoRA both are off unless asked for.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from moelora_jax.adapters.layers import ROUTER_COLLECTION, GateRouting


class RouterStats(NamedTuple):
    """Per-router statistics, ``R`` routers by ``E`` experts: ``load, importance: (R, E)``, ``z: (R,)``."""

    load: jax.Array
    importance: jax.Array
    z: jax.Array


def sown_routing(sown: dict[str, Any]) -> list[GateRouting]:
    """The sown gate decisions with ``(R_j, tokens..., E)`` arrays: a scanned layer stack keeps its leading layer
    axis (one router per layer), an unscanned router gets a leading axis of 1. ``sown`` is the ``"router"``
    collection."""
    routings = jax.tree.leaves(sown.get(ROUTER_COLLECTION, sown), is_leaf=lambda x: isinstance(x, GateRouting))
    return [jax.tree.map(lambda x: x if x.ndim == 4 else x[None], r) for r in routings]


def router_stats(routings: list[GateRouting], token_weights: jax.Array) -> RouterStats:
    """Load, importance and squared log-partition of every router.

    Args:
      routings: per group of routers, ``(R_j, B, T, E)`` float32 logits and bool top-k choices (see
        :func:`sown_routing`); ``routed=None`` for a dense gate.
      token_weights: ``(B, T)``, 1 on tokens that count (real ones), 0 on padding.

    Shapes (one ``E`` for all groups) and the bool ``routed`` are asserted (chex, at trace time).
    """
    chex.assert_rank(token_weights, 2)
    chex.assert_equal_shape([routing.logits for routing in routings], dims=-1)
    weights = token_weights.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(weights), 1.0)
    loads, importances, zs = [], [], []
    for z, routed in routings:
        chex.assert_shape(z, (None, *token_weights.shape, None))
        if routed is not None:
            chex.assert_equal_shape([z, routed])
            chex.assert_type(routed, bool)
        z = z.astype(jnp.float32)
        importance = jnp.einsum("rbte,bt->re", jax.nn.softmax(z, axis=-1), weights) / n
        if routed is None:  # a dense gate routes every token to every expert: its load is the share of gate weight
            loads.append(importance)
        else:  # each real token fills k slots, so dividing by the slot total divides by k n
            slots = jnp.einsum("rbte,bt->re", routed.astype(jnp.float32), weights)
            loads.append(slots / jnp.maximum(jnp.sum(slots, axis=-1, keepdims=True), 1.0))
        importances.append(importance)
        zs.append(jnp.einsum("rbt,bt->r", jax.nn.logsumexp(z, axis=-1) ** 2, weights) / n)
    return RouterStats(jnp.concatenate(loads), jnp.concatenate(importances), jnp.concatenate(zs))


def balance_loss(stats: RouterStats) -> jax.Array:
    """Switch load-balancing loss ``E * sum_i f_i P_i``, averaged over routers; 1 when routing is even."""
    experts = stats.load.shape[-1]
    return jnp.mean(experts * jnp.sum(jax.lax.stop_gradient(stats.load) * stats.importance, axis=-1))


def z_loss(stats: RouterStats) -> jax.Array:
    """Router z-loss ``mean_t logsumexp(z_t)^2``, averaged over routers."""
    return jnp.mean(stats.z)


def mole_balance_loss(stats: RouterStats) -> jax.Array:
    """MoLE's gating balance loss ``-log prod_i q_i`` with ``q_i`` the gate weight of LoRA ``i`` averaged over every
    gate and token; smallest (``N log N``) when the LoRAs are used evenly."""
    return -jnp.sum(jnp.log(jnp.mean(stats.importance, axis=0)))


def load_metrics(stats: RouterStats) -> dict[str, jax.Array]:
    """How evenly experts are used: ``load_cv``, the coefficient of variation ``std_i f_i / mean_i f_i`` averaged
    over routers (0 when even; ``sqrt(E/k - 1)`` when every token picks the same ``k``), and ``expert_load``, each
    router's loads sorted in decreasing order and averaged over routers (``(E,)``, all ``1/E`` when even)."""
    load = jax.lax.stop_gradient(stats.load)
    cv = jnp.std(load, axis=-1) / jnp.mean(load, axis=-1)
    return {"load_cv": jnp.mean(cv), "expert_load": jnp.mean(-jnp.sort(-load, axis=-1), axis=0)}


class RouterLosses(NamedTuple):
    """Coefficients of the auxiliary routing losses added to the training loss (0: off). ``mole_balance`` is None
    where MoLE's loss is not defined (every adapter but MoLE), and then it is neither computed nor reported."""

    balance: float = 0.0
    z: float = 0.0
    mole_balance: float | None = None

    def __call__(self, stats: RouterStats) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``balance * balance_loss + z * z_loss [+ mole_balance * mole_balance_loss]``, and the metrics of
        ``stats``: the losses (whatever their coefficients) and :func:`load_metrics`."""
        values = {"balance_loss": balance_loss(stats), "z_loss": z_loss(stats)}
        total = self.balance * values["balance_loss"] + self.z * values["z_loss"]
        if self.mole_balance is not None:
            values["mole_balance_loss"] = mole_balance_loss(stats)
            total = total + self.mole_balance * values["mole_balance_loss"]
        return total, values | load_metrics(stats)

    @property
    def active(self) -> bool:
        return any(c for c in self)
