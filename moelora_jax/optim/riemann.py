"""``riemann_precond()``: the r x r Riemannian preconditioner for LoRA factors as an Optax transformation."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from moelora_jax.adapters.leaves import FACTOR_LEAVES, leaf_name

_HIGHEST = jax.lax.Precision.HIGHEST


class Factor(NamedTuple):
    """What a gradient leaf is to ``riemann_precond``: one factor of one adapter.

    ``adapter`` is any hashable key the factors of one adapter share; ``role`` is ``"lora_a"``
    ``(*stacked, *contracted, r)``, ``"lora_b"`` ``(*stacked, r, *remaining)`` or ``"mixer"`` ``(*stacked, r, r)``;
    ``stacked`` counts the leading axes that index separate adapters (layers, experts): None for every axis before
    the last two (one contracted and one remaining axis). An adapter's contracted and remaining axes are flattened:
    its step is that of the matrices ``A: (prod(contracted), r)`` and ``B: (r, prod(remaining))``.
    """

    adapter: Hashable
    role: str
    stacked: int | None = None


_QWIX_SUFFIXES = (("_lora_a", "lora_a"), ("_lora_b", "lora_b"))


def lora_factors(path: jax.tree_util.KeyPath) -> Factor | None:
    """The factor at ``path``, by the naming of this library and Flax NNX's ``nnx.LoRA`` (sibling leaves ``lora_a``,
    ``lora_b`` and the optional MoSLoRA ``mixer``, every leading axis stacking adapters) or of qwix's
    ``LoraProvider`` (Tunix's LoRA: ``<weight>_lora_a`` and ``<weight>_lora_b`` beside their weight, stacking
    nothing: a dense kernel's are ``(d_in, r)`` / ``(r, d_out)``, an einsum weight's ``(*contracted, r)`` /
    ``(r, *remaining)``); None for any other leaf. ``riemann_precond``'s default ``factors``."""
    name = leaf_name(path)
    if name in FACTOR_LEAVES:
        return Factor(path[:-1], name)
    for suffix, role in _QWIX_SUFFIXES:
        if name is not None and name.endswith(suffix) and len(name) > len(suffix):
            return Factor((path[:-1], name.removesuffix(suffix)), role, stacked=0)
    return None


class _AdapterGroup(NamedTuple):
    """Flat indices of one adapter's gradient leaves (``mixer`` is None when the adapter has none), and how many
    leading axes stack adapters (None: all but the last two)."""

    lora_a: int
    lora_b: int
    mixer: int | None
    stacked: int | None


def _is_masked(leaf: Any) -> bool:
    return isinstance(leaf, optax.MaskedNode)


def _find_adapter_groups(
    paths: list[tuple], leaves: list[Any], factors: Callable[[jax.tree_util.KeyPath], Factor | None]
) -> list[_AdapterGroup]:
    """Pairs every ``lora_a`` gradient with the ``lora_b`` (and ``mixer``) of its adapter, or raises ValueError."""
    siblings: dict[Hashable, dict[str, int]] = {}
    stacking: dict[Hashable, int | None] = {}
    for index, path in enumerate(paths):
        factor = factors(path)
        if factor is not None:
            siblings.setdefault(factor.adapter, {})[factor.role] = index
            stacking[factor.adapter] = factor.stacked
    groups = []
    for adapter, members in siblings.items():
        present = {name for name, index in members.items() if not _is_masked(leaves[index])}
        if not present or not members.keys() & {"lora_a", "lora_b"}:
            continue  # masked out of this group, or a leaf that merely shares a name but has no factors
        where = jax.tree_util.keystr(paths[next(iter(members.values()))][:-1]) or "<root>"
        missing = [name for name in ("lora_a", "lora_b") if name not in present]
        if missing:
            raise ValueError(
                f"riemann_precond: the adapter at {where} has no {missing[0]} gradient beside its {sorted(present)}; "
                "keep lora_a, lora_b (and mixer) of one adapter together, in the same optax.partition group."
            )
        if "mixer" in members and "mixer" not in present:
            raise ValueError(
                f"riemann_precond: the adapter at {where} has a mixer outside this transformation's group; "
                "put the mixer in the same optax.partition group as lora_a and lora_b."
            )
        groups.append(_AdapterGroup(members["lora_a"], members["lora_b"], members.get("mixer"), stacking[adapter]))
    return groups


def _as_matrices(a: jax.Array, b: jax.Array, stacked: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes that make ``a: (*stacked, *contracted, r)`` and ``b: (*stacked, r, *remaining)`` stacks of
    matrices ``(*stacked, prod(contracted), r)`` and ``(*stacked, r, prod(remaining))``."""
    if stacked is None or a.ndim < stacked + 2 or b.ndim < stacked + 2:
        return a.shape, b.shape
    lead_a, lead_b = a.shape[:stacked], b.shape[:stacked]
    return (*lead_a, math.prod(a.shape[stacked:-1]), a.shape[-1]), (
        *lead_b,
        b.shape[stacked],
        math.prod(b.shape[stacked + 1 :]),
    )


def _check_shapes(where: str, a: jax.Array, b: jax.Array, m: jax.Array | None) -> None:
    if a.ndim < 2 or b.ndim != a.ndim:
        raise ValueError(
            f"riemann_precond: at {where}, lora_a {a.shape} and lora_b {b.shape} must be (..., d_in, r) and "
            "(..., r, d_out) with the same leading axes."
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"riemann_precond: at {where}, lora_a has rank {a.shape[-1]} but lora_b has rank {b.shape[-2]} "
            f"(shapes {a.shape} and {b.shape}); the factors of one adapter must share r."
        )
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"riemann_precond: at {where}, lora_a {a.shape} and lora_b {b.shape} differ in their leading "
            "(layer, expert) axes."
        )
    rank, d_in, d_out = a.shape[-1], a.shape[-2], b.shape[-1]
    if rank > min(d_in, d_out):
        raise ValueError(
            f"riemann_precond: at {where}, lora_a {a.shape} and lora_b {b.shape} give rank {rank} > "
            f"min(d_in, d_out) = {min(d_in, d_out)}; factors in PyTorch layout (r, d_in) / (d_out, r) must be "
            "transposed to (d_in, r) / (r, d_out)."
        )
    if m is not None and m.shape != (*a.shape[:-2], rank, rank):
        raise ValueError(f"riemann_precond: at {where}, mixer {m.shape} must be (..., {rank}, {rank}).")


def _gram(x: jax.Array, subscripts: str) -> jax.Array:
    """An ``(..., r, r)`` Gram matrix of a factor in float32.

    Under a mesh with Explicit axes the contracted ``d`` axis may be sharded, so the output sharding is stated:
    leading (layer, expert) axes as in ``x``, the ``r x r`` block replicated. Auto meshes need no annotation.
    """
    sharding = jax.typeof(x).sharding
    out_sharding = None
    if AxisType.Explicit in getattr(sharding.mesh, "axis_types", ()):
        leading = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
        out_sharding = NamedSharding(sharding.mesh, PartitionSpec(*leading[:-2], None, None))
    return jnp.einsum(subscripts, x, x, precision=_HIGHEST, out_sharding=out_sharding)


def _damped(gram: jax.Array, reg: float) -> jax.Array:
    return gram + reg * jnp.eye(gram.shape[-1], dtype=gram.dtype)


def _spd_solve(precond: jax.Array, rhs: jax.Array) -> jax.Array:
    """``inv(precond) @ rhs`` for symmetric positive definite ``precond: (..., r, r)``, ``rhs: (..., r, k)``.

    Gauss-Jordan elimination without pivoting (stable for SPD matrices), looping over the ``r`` pivots with
    elementwise array ops only. No LAPACK custom call: those deadlocked XLA's CPU runtime here when run beside
    multi-threaded matmuls (jaxlib 0.10.2, 2 cores), and the loop batches over all leading axes on any backend.
    """
    rank = precond.shape[-1]
    is_row = jnp.arange(rank)[:, None]

    def eliminate(k: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        p, x = carry
        pivot_p = jax.lax.dynamic_index_in_dim(p, k, axis=-2)  # (..., 1, r)
        pivot = jax.lax.dynamic_index_in_dim(pivot_p, k, axis=-1)  # (..., 1, 1)
        pivot_p, pivot_x = pivot_p / pivot, jax.lax.dynamic_index_in_dim(x, k, axis=-2) / pivot
        column = jax.lax.dynamic_index_in_dim(p, k, axis=-1)  # (..., r, 1)
        p = jnp.where(is_row == k, pivot_p, p - column * pivot_p)
        x = jnp.where(is_row == k, pivot_x, x - column * pivot_x)
        return p, x

    return jax.lax.fori_loop(0, rank, eliminate, (precond, rhs), unroll=rank <= 16)[1]


def _right_solve(grad: jax.Array, precond: jax.Array) -> jax.Array:
    """``grad @ inv(precond)`` for SPD ``precond``: ``(..., n, r) x (..., r, r)``."""
    return jnp.swapaxes(_spd_solve(precond, jnp.swapaxes(grad, -1, -2)), -1, -2)


def _precondition(
    a: jax.Array, b: jax.Array, m: jax.Array | None, grads: tuple[jax.Array, ...], reg: float
) -> tuple[jax.Array, ...]:
    """Preconditions ``(G_A, G_B[, G_M])`` in float32 from the current factors; returns them in their dtypes."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    gram_a = _gram(a, "...dr,...ds->...rs")  # A^T A
    gram_b = _gram(b, "...rd,...sd->...rs")  # B B^T
    g32 = [g.astype(jnp.float32) for g in grads]
    if m is None:
        new = [_right_solve(g32[0], _damped(gram_b, reg)), _spd_solve(_damped(gram_a, reg), g32[1])]
    else:
        m = m.astype(jnp.float32)
        mt = jnp.swapaxes(m, -1, -2)
        right_of_a = jnp.matmul(jnp.matmul(m, gram_b, precision=_HIGHEST), mt, precision=_HIGHEST)  # (MB)(MB)^T
        left_of_b = jnp.matmul(jnp.matmul(mt, gram_a, precision=_HIGHEST), m, precision=_HIGHEST)  # (AM)^T (AM)
        new = [
            _right_solve(g32[0], _damped(right_of_a, reg)),
            _spd_solve(_damped(left_of_b, reg), g32[1]),
            _right_solve(_spd_solve(_damped(gram_a, reg), g32[2]), _damped(gram_b, reg)),
        ]
    return tuple(n.astype(g.dtype) for n, g in zip(new, grads, strict=True))


def riemann_precond(
    reg: float = 1e-6, factors: Callable[[jax.tree_util.KeyPath], Factor | None] = lora_factors
) -> optax.GradientTransformationExtraArgs:
    """Riemannian preconditioning of LoRA factor gradients (Zhang & Pilanci, ICML 2024, arXiv:2402.02347).

    For every adapter in the gradient tree, i.e. sibling leaves named ``lora_a: (..., d_in, r)`` and
    ``lora_b: (..., r, d_out)`` (``y = x @ A @ B``, any leading layer/expert axes, each slice its own adapter)::

        G_A <- G_A @ inv(B @ B.T + reg * I_r)
        G_B <- inv(A.T @ A + reg * I_r) @ G_B

    with ``A`` and ``B`` read from the current ``params`` (Jacobi: both from before this step). This is the
    scaled gradient of the low-rank product ``A @ B`` in the quotient geometry of fixed-rank matrices.

    With a MoSLoRA mixer ``mixer: (..., r, r)`` beside the factors (``dW = A @ M @ B``), each factor is
    preconditioned by the Gram matrix of the rest of the product, and the mixer by both neighbours::

        G_A <- G_A @ inv((M B)(M B)^T + reg I)      G_B <- inv((A M)^T (A M) + reg I) @ G_B
        G_M <- inv(A^T A + reg I) @ G_M @ inv(B B^T + reg I)

    The ``r x r`` systems are solved (Gauss-Jordan on the SPD Grams, never an explicit inverse) in float32 and
    the results cast back to each gradient's dtype. Every leaf that is not a LoRA factor (base weights, gates,
    biases) passes through untouched, so this can sit first in any chain:
    ``optax.chain(riemann_precond(), optax.adamw(lr))``, also inside ``optax.partition``, as long as an adapter's
    factors share one group.

    Args:
      reg: damping ``lambda > 0`` added to the Gram matrices' diagonal, a static Python number (reference code
        1e-6; PEFT's default 1e-2).
      factors: which leaves are factors, of which adapter, with which axes (a leaf's key path -> :class:`Factor`
        or None). The default, :func:`lora_factors`, reads this library's and Flax NNX's ``lora_a`` / ``lora_b``
        and qwix's ``<weight>_lora_a`` / ``<weight>_lora_b``; give another for any other naming.

    Returns:
      A stateless ``GradientTransformationExtraArgs`` whose ``update`` requires ``params``.
    """
    if not reg > 0.0:
        raise ValueError(
            f"riemann_precond: reg={reg} must be > 0: it damps the r x r Gram matrices, which are singular while "
            "lora_b is still zero (its initial value)."
        )

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del extra_args
        if params is None:
            raise ValueError("riemann_precond needs the current parameters: call tx.update(grads, opt_state, params).")
        path_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked)
        paths = [path for path, _ in path_leaves]
        leaves = [leaf for _, leaf in path_leaves]
        groups = _find_adapter_groups(paths, leaves, factors)
        if not groups:
            if not any(getattr(factors(path), "role", None) in ("lora_a", "lora_b") for path in paths):
                raise ValueError(
                    "riemann_precond found no LoRA factors in the gradients: it reads leaves named lora_a / lora_b "
                    "(or qwix's <weight>_lora_a / <weight>_lora_b); for another naming (e.g. PyTorch-style lora_A "
                    "/ lora_B) pass factors=, a function from a leaf's path to a riemann.Factor."
                )
            return updates, state  # every adapter of this tree is masked out of this partition group
        param_by_path = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)[0])
        for group in groups:
            where = jax.tree_util.keystr(paths[group.lora_a][:-1]) or "<root>"
            members = (group.lora_a, group.lora_b, group.mixer)
            found = []
            for index in members:
                if index is None:
                    found.append(None)
                    continue
                param = param_by_path.get(paths[index])
                if param is None or _is_masked(param) or jnp.shape(param) != jnp.shape(leaves[index]):
                    raise ValueError(
                        f"riemann_precond: params has no {jax.tree_util.keystr(paths[index])} matching its gradient "
                        f"{jnp.shape(leaves[index])}; pass the same parameter tree the gradients were taken of."
                    )
                found.append(param)
            a_shape, b_shape = _as_matrices(*found[:2], group.stacked)
            shapes = [a_shape, b_shape, None if found[2] is None else jnp.shape(found[2])]
            matrices = [None if f is None else jnp.reshape(f, shape) for f, shape in zip(found, shapes, strict=True)]
            _check_shapes(where, *matrices)
            indices = [i for i in members if i is not None]
            grads = tuple(
                jnp.reshape(leaves[i], shape) for i, shape in zip(members, shapes, strict=True) if i is not None
            )
            new = _precondition(*matrices, grads, reg)
            for index, value in zip(indices, new, strict=True):
                leaves[index] = jnp.reshape(value, jnp.shape(leaves[index]))
        return jax.tree_util.tree_unflatten(treedef, leaves), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
