"""riemann_precond against the per-expert closed form, through Optax chains, partitions, jit and a device mesh."""

from typing import NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moelora_jax import riemann_precond
from moelora_jax.optim.riemann import Factor, _spd_solve

L, E, D_IN, R, D_OUT = 2, 3, 16, 4, 8


def _adapter_tree(seed: int, mixer: bool = False, dtype=jnp.float32) -> dict:
    """A two-projection tree with stacked (layer, expert) axes, a gate and a frozen kernel beside the factors."""
    rng = np.random.default_rng(seed)

    def proj(d_out):
        leaves = {
            "kernel": rng.normal(size=(L, D_IN, d_out)),
            "lora_a": rng.normal(size=(L, E, D_IN, R)) / 4,
            "lora_b": rng.normal(size=(L, E, R, d_out)),
            "gate": rng.normal(size=(L, D_IN, E)),
        }
        if mixer:
            # Well conditioned (cond(M)^2 enters the Gram), so the float32 solve can be held to a tight tolerance.
            leaves["mixer"] = np.eye(R) + 0.3 * rng.normal(size=(L, E, R, R))
        return {k: jnp.asarray(v, dtype) for k, v in leaves.items()}

    return {"attn": {"q": proj(D_OUT), "k": proj(D_OUT // 2)}, "norm": jnp.asarray(rng.normal(size=(D_IN,)), dtype)}


def _closed_form(params: dict, grads: dict, reg: float, mixer: bool) -> dict:
    """Per layer, per expert loop in float64 with explicit inverses (the oracle)."""
    a, b = np.asarray(params["lora_a"], np.float64), np.asarray(params["lora_b"], np.float64)
    ga, gb = np.asarray(grads["lora_a"], np.float64), np.asarray(grads["lora_b"], np.float64)
    out = {"lora_a": np.empty_like(ga), "lora_b": np.empty_like(gb)}
    if mixer:
        m, gm = np.asarray(params["mixer"], np.float64), np.asarray(grads["mixer"], np.float64)
        out["mixer"] = np.empty_like(gm)
    eye = np.eye(R)
    for layer in range(L):
        for e in range(E):
            A, B = a[layer, e], b[layer, e]
            if mixer:
                M = m[layer, e]
                right, left = M @ B, A @ M
                inv_a, inv_b = np.linalg.inv(A.T @ A + reg * eye), np.linalg.inv(B @ B.T + reg * eye)
                out["mixer"][layer, e] = inv_a @ gm[layer, e] @ inv_b
            else:
                right, left = B, A
            out["lora_a"][layer, e] = ga[layer, e] @ np.linalg.inv(right @ right.T + reg * eye)
            out["lora_b"][layer, e] = np.linalg.inv(left.T @ left + reg * eye) @ gb[layer, e]
    return out


class ProjTuple(NamedTuple):
    """One projection's leaves as attributes (``GetAttrKey`` paths) instead of dict keys."""

    kernel: jax.Array
    lora_a: jax.Array
    lora_b: jax.Array
    gate: jax.Array
    mixer: jax.Array


@flax.struct.dataclass
class ProjStruct:
    kernel: jax.Array
    lora_a: jax.Array
    lora_b: jax.Array
    gate: jax.Array
    mixer: jax.Array


def _as_attributes(tree: dict, container: type) -> dict:
    """``tree`` with each projection's dict of leaves replaced by a ``container`` of the same leaves."""
    return {**tree, "attn": {proj: container(**leaves) for proj, leaves in tree["attn"].items()}}


class RiemannPrecondTest(chex.TestCase):
    """The update traced under ``jax.jit`` and run eagerly (``chex.variants``)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(mixer=(False, True), reg=(1e-6, 1e-2))
    def test_matches_per_expert_closed_form(self, mixer, reg):
        params, grads = _adapter_tree(0, mixer), _adapter_tree(1, mixer)
        tx = riemann_precond(reg)
        updates, _ = self.variant(tx.update)(grads, tx.init(params), params)
        for proj in ("q", "k"):
            want = _closed_form(params["attn"][proj], grads["attn"][proj], reg, mixer)
            for name, value in want.items():
                # float32 solves of damped Grams: error relative to the array's scale, not each entry's.
                atol = 1e-5 * np.abs(value).max()
                np.testing.assert_allclose(updates["attn"][proj][name], value, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.parametrize("container", [ProjTuple, ProjStruct], ids=["namedtuple", "flax_struct"])
def test_attribute_trees_are_preconditioned_like_dicts(container):
    """Factors found by attribute name (GetAttrKey paths) exactly as by dict key."""
    params, grads = _adapter_tree(0, mixer=True), _adapter_tree(1, mixer=True)
    update = jax.jit(riemann_precond(1e-3).update)
    want, _ = update(grads, optax.EmptyState(), params)
    got, _ = update(_as_attributes(grads, container), optax.EmptyState(), _as_attributes(params, container))
    chex.assert_trees_all_close(got, _as_attributes(want, container), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 16, 33])
def test_spd_solve_matches_numpy_at_any_rank(rank):
    """The Gauss-Jordan solve behind the preconditioner, unrolled (r <= 16) and looped (r > 16)."""
    rng = np.random.default_rng(rank)
    m = rng.normal(size=(3, rank, rank))
    precond = m @ np.swapaxes(m, -1, -2) + 0.1 * np.eye(rank)
    rhs = rng.normal(size=(3, rank, 5))
    want = np.linalg.solve(precond, rhs)
    got = jax.jit(_spd_solve)(jnp.asarray(precond, jnp.float32), jnp.asarray(rhs, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_update_lowers_to_plain_ops_without_custom_calls():
    """LAPACK custom calls deadlocked XLA's CPU runtime beside threaded matmuls; the update must not use them."""
    params, grads = _adapter_tree(0, mixer=True), _adapter_tree(1, mixer=True)
    tx = riemann_precond()
    hlo = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()
    assert "custom_call" not in hlo


def test_non_lora_leaves_pass_through_untouched():
    params, grads = _adapter_tree(0), _adapter_tree(1)
    tx = riemann_precond()
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["norm"] is grads["norm"]
    for proj in ("q", "k"):
        assert updates["attn"][proj]["kernel"] is grads["attn"][proj]["kernel"]
        assert updates["attn"][proj]["gate"] is grads["attn"][proj]["gate"]
        assert not np.allclose(updates["attn"][proj]["lora_a"], grads["attn"][proj]["lora_a"])


def test_returns_gradient_dtype_and_solves_in_float32():
    params, grads = _adapter_tree(0, dtype=jnp.bfloat16), _adapter_tree(1, dtype=jnp.bfloat16)
    tx = riemann_precond(1e-3)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    grads32, params32 = jax.tree.map(lambda v: v.astype(jnp.float32), (grads, params))
    ref, _ = tx.update(grads32, tx.init(params32), params32)
    for proj in ("q", "k"):
        got = updates["attn"][proj]["lora_a"]
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, ref["attn"][proj]["lora_a"].astype(jnp.bfloat16))


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.sgd(0.1),
        optax.sgd(0.1, momentum=0.9),
        optax.adam(1e-2),
        optax.adamw(1e-2, weight_decay=0.1),
        optax.lion(1e-3),
    ],
    ids=["sgd", "momentum", "adam", "adamw", "lion"],
)
def test_first_in_a_chain_equals_preconditioning_by_hand(optimizer):
    params = _adapter_tree(0)
    chained = optax.chain(riemann_precond(1e-3), optimizer)
    state_c, state_o = chained.init(params), optimizer.init(params)
    precondition, step_o, step_c = (
        jax.jit(riemann_precond(1e-3).update),
        jax.jit(optimizer.update),
        jax.jit(chained.update),
    )
    for seed in range(3):
        grads = _adapter_tree(10 + seed)
        pre, _ = precondition(grads, optax.EmptyState(), params)
        want, state_o = step_o(pre, state_o, params)
        got, state_c = step_c(grads, state_c, params)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, got)


def _labels(params):
    def label(path, _):
        name = path[-1].key
        return {"lora_a": "experts", "lora_b": "experts", "mixer": "experts", "gate": "gate"}.get(name, "frozen")

    return jax.tree_util.tree_map_with_path(label, params)


def test_inside_optax_partition():
    params, grads = _adapter_tree(0, mixer=True), _adapter_tree(1, mixer=True)
    tx = optax.partition(
        {
            "experts": optax.chain(riemann_precond(1e-3), optax.sgd(0.5)),
            "gate": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
            "frozen": optax.set_to_zero(),
        },
        _labels,
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    precond, _ = jax.jit(riemann_precond(1e-3).update)(grads, optax.EmptyState(), params)
    for proj in ("q", "k"):
        for name in ("lora_a", "lora_b", "mixer"):
            np.testing.assert_allclose(updates["attn"][proj][name], -0.5 * precond["attn"][proj][name], rtol=1e-5)
        assert not np.any(updates["attn"][proj]["kernel"])
    assert not np.any(updates["norm"])


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_update_equals_unsharded_and_keeps_shardings(axis_type):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type), devices=jax.devices("cpu")[:8])
    params, grads = _adapter_tree(0), _adapter_tree(1)
    specs = {
        "lora_a": P(None, None, "model", None),  # d_in over the mesh; the rank axis replicated
        "lora_b": P(None, None, None, "model"),
        "kernel": P(None, "data", "model"),
        "gate": P(None, "model", None),
    }
    shardings = {
        "attn": {proj: {k: NamedSharding(mesh, specs[k]) for k in params["attn"][proj]} for proj in ("q", "k")},
        "norm": NamedSharding(mesh, P()),
    }
    tx = optax.chain(riemann_precond(1e-3), optax.adamw(1e-2))
    state = tx.init(params)
    want, _ = jax.jit(tx.update)(grads, state, params)
    with jax.set_mesh(mesh):
        sharded_params, sharded_grads = jax.device_put(params, shardings), jax.device_put(grads, shardings)
        got, _ = jax.jit(tx.update)(sharded_grads, tx.init(sharded_params), sharded_params)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    for proj in ("q", "k"):
        for name, value in got["attn"][proj].items():
            assert value.sharding.is_equivalent_to(shardings["attn"][proj][name], value.ndim), (proj, name)


def test_unstacked_factors_in_a_namedtuple():
    """No leading (layer, expert) axes: one ``(d_in, r)`` / ``(r, d_out)`` adapter, found by attribute name."""

    class Lora(NamedTuple):
        lora_a: jax.Array
        lora_b: jax.Array

    rng = np.random.default_rng(0)
    params = Lora(jnp.asarray(rng.normal(size=(D_IN, R))), jnp.asarray(rng.normal(size=(R, D_OUT))))
    grads = Lora(jnp.ones((D_IN, R)), jnp.ones((R, D_OUT)))
    updates, _ = riemann_precond(1e-3).update(grads, optax.EmptyState(), params)
    B = np.asarray(params.lora_b, np.float64)
    np.testing.assert_allclose(
        updates.lora_a, np.ones((D_IN, R)) @ np.linalg.inv(B @ B.T + 1e-3 * np.eye(R)), rtol=1e-4
    )


def test_bad_input_fails_loudly():
    params, grads = _adapter_tree(0), _adapter_tree(1)
    for reg in (-0.1, 0.0):
        with pytest.raises(ValueError, match=f"reg={reg} must be > 0"):
            riemann_precond(reg)
    tx = riemann_precond()
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(grads, tx.init(params), None)
    lonely = {"layer": {"lora_a": grads["attn"]["q"]["lora_a"]}}
    with pytest.raises(ValueError, match=r"\['layer'\] has no lora_b"):
        tx.update(lonely, optax.EmptyState(), {"layer": {"lora_a": params["attn"]["q"]["lora_a"]}})
    bad = {"lora_a": jnp.ones((E, D_IN, R)), "lora_b": jnp.ones((E, R + 1, D_OUT))}
    with pytest.raises(ValueError, match="rank 4 but lora_b has rank 5"):
        tx.update(bad, optax.EmptyState(), bad)
    torch_layout = {"lora_a": jnp.ones((R, D_IN)), "lora_b": jnp.ones((D_IN, R))}  # a square layer, transposed
    with pytest.raises(ValueError, match="PyTorch layout"):
        tx.update(torch_layout, optax.EmptyState(), torch_layout)
    with pytest.raises(ValueError, match="found no LoRA factors in the gradients"):
        tx.update({"lora_A": jnp.ones((4, 2))}, optax.EmptyState(), {"lora_A": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match="params has no"):
        tx.update(grads, optax.EmptyState(), {"attn": {}, "norm": params["norm"]})


def test_zero_lora_b_at_init_gives_finite_updates():
    """B starts at zero, so B B^T is singular: the damping must keep the first update finite."""
    params = {"lora_a": jnp.ones((E, D_IN, R)), "lora_b": jnp.zeros((E, R, D_OUT))}
    updates, _ = riemann_precond(1e-6).update(params, optax.EmptyState(), params)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(updates))
    np.testing.assert_allclose(updates["lora_a"], params["lora_a"] / 1e-6, rtol=1e-5)


def test_a_lone_leaf_named_mixer_is_not_an_adapter():
    params = {"mixer": jnp.ones((4, 4)), "proj": {"lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 3))}}
    updates, _ = riemann_precond().update(params, optax.EmptyState(), params)
    assert updates["mixer"] is params["mixer"]


def test_factors_split_across_partition_groups_are_refused():
    params = _adapter_tree(0, mixer=True)
    for moved in ("lora_b", "mixer", "lora_a|lora_b"):
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _, moved=moved: "other" if path[-1].key in moved.split("|") else "experts", params
        )
        tx = optax.partition({"experts": riemann_precond(), "other": optax.identity()}, labels)
        with pytest.raises(ValueError, match=r"same optax\.partition group"):
            tx.update(params, tx.init(params), params)


def _flattened_step(a, b, grad_a, grad_b, stacked: int, reg: float):
    """NumPy's preconditioned gradients of ``a: (*S, *C, r)`` and ``b: (*S, r, *R)``, each stacked slice the
    matrices ``(prod(C), r)`` and ``(r, prod(R))``, reshaped back."""
    a, b, grad_a, grad_b = (np.asarray(x, np.float64) for x in (a, b, grad_a, grad_b))
    lead, r = a.shape[:stacked], a.shape[-1]
    a2, b2 = a.reshape(*lead, -1, r), b.reshape(*lead, r, -1)
    ga2, gb2 = grad_a.reshape(a2.shape), grad_b.reshape(b2.shape)
    eye = reg * np.eye(r)
    new_a = ga2 @ np.linalg.inv(b2 @ np.swapaxes(b2, -1, -2) + eye)
    new_b = np.linalg.inv(np.swapaxes(a2, -1, -2) @ a2 + eye) @ gb2
    return new_a.reshape(a.shape), new_b.reshape(b.shape)


def test_factors_under_another_naming_with_stacked_and_several_contracted_axes():
    """``factors=`` maps a tree of its own naming (``down`` / ``up`` per expert, an attention output's two
    contracted axes) to factors: each expert's step is that of its flattened product."""
    rng = np.random.default_rng(3)
    params = {"experts": {"down": rng.normal(size=(E, 3, 4, R)), "up": rng.normal(size=(E, R, D_OUT))}}
    grads = {"experts": {"down": rng.normal(size=(E, 3, 4, R)), "up": rng.normal(size=(E, R, D_OUT))}}
    params, grads = jax.tree.map(jnp.asarray, (params, grads))

    def factors(path):
        name = path[-1].key
        roles = {"down": "lora_a", "up": "lora_b"}
        return Factor(path[:-1], roles[name], stacked=1) if name in roles else None

    tx = riemann_precond(1e-3, factors=factors)
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want = _flattened_step(*params["experts"].values(), *grads["experts"].values(), stacked=1, reg=1e-3)
    for value, expected in zip(got["experts"].values(), want, strict=True):
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="found no LoRA factors"):
        riemann_precond().update(grads, optax.EmptyState(), params)


def _qwix_model(seed: int = 0):
    """A block with a dense layer and two attention einsums (into heads, and out of them), qwix's LoRA on each,
    its B factors random so that the step depends on them."""
    qwix = pytest.importorskip("qwix")
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.dense = nnx.Linear(12, 10, rngs=rngs)
            self.q = nnx.Einsum("BTD,DNH->BTNH", (12, 3, 4), rngs=rngs)
            self.o = nnx.Einsum("BTNH,NHD->BTD", (3, 4, 12), rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.dense(jnp.tanh(self.o(self.q(x))) + x)

    rule = qwix.LoraRule(module_path=".*", rank=2, alpha=2.0, lora_b_initializer=nnx.initializers.normal(0.5))
    x = jax.random.normal(jax.random.key(seed), (2, 5, 12))
    model = qwix.apply_lora_to_model(Block(nnx.Rngs(0)), qwix.LoraProvider([rule]), x, rngs=nnx.Rngs(1))
    return model, x


def test_qwix_lora_trees_step_as_their_flattened_products_through_nnx_optimizer():
    """qwix's ``<weight>_lora_a`` / ``_lora_b`` (a dense kernel's and two einsum weights', stacking nothing) read
    by the default ``factors``: one SGD step through ``nnx.Optimizer`` equals the closed form of each flattened
    product's preconditioned gradient."""
    from flax import nnx

    model, x = _qwix_model()
    lr, reg = 0.1, 1e-3
    optimizer = nnx.Optimizer(model, optax.chain(riemann_precond(reg), optax.sgd(lr)), wrt=nnx.LoRAParam)
    before = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

    def loss(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    grads, after = nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    assert set(before) == {"dense", "q", "o"}  # A contracts (d_in,), (D,) and (N, H) of their weights
    for layer in before:
        a, b = before[layer]["kernel_lora_a"], before[layer]["kernel_lora_b"]
        want_a, want_b = _flattened_step(a, b, grads[layer]["kernel_lora_a"], grads[layer]["kernel_lora_b"], 0, reg)
        for leaf, want in (("kernel_lora_a", want_a), ("kernel_lora_b", want_b)):
            step = (np.asarray(before[layer][leaf]) - np.asarray(after[layer][leaf])) / lr
            np.testing.assert_allclose(step, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=layer + leaf)


def test_nnx_lora_steps_as_its_closed_form_through_nnx_optimizer():
    """Flax NNX's own ``nnx.LoRA`` (``lora_a (d_in, r)``, ``lora_b (r, d_out)``): one SGD step through
    ``nnx.Optimizer`` equals the closed form."""
    from flax import nnx

    layer = nnx.LoRA(12, 3, 8, rngs=nnx.Rngs(0), b_initializer=nnx.initializers.normal(0.5))
    x = jax.random.normal(jax.random.key(1), (4, 12))
    lr, reg = 0.1, 1e-3
    optimizer = nnx.Optimizer(layer, optax.chain(riemann_precond(reg), optax.sgd(lr)), wrt=nnx.LoRAParam)
    before = nnx.to_pure_dict(nnx.state(layer, nnx.LoRAParam))

    def loss(m):
        return jnp.mean(jnp.sin(m(x)))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    optimizer.update(layer, grads)
    grads, after = nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(layer, nnx.LoRAParam))
    want = _flattened_step(before["lora_a"], before["lora_b"], grads["lora_a"], grads["lora_b"], 0, reg)
    for leaf, expected in zip(("lora_a", "lora_b"), want, strict=True):
        step = (np.asarray(before[leaf]) - np.asarray(after[leaf])) / lr
        np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=leaf)
