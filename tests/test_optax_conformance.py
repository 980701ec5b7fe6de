"""Our three custom Optax transforms held to what Optax's own transforms do (the shape of optax's
``_common_test.py``): one list of them, each checked under jit, ``inject_hyperparams``, ``MultiSteps``, ``masked`` /
``partition``, ``tree_map_params``, bfloat16 parameters, 8-device sharding, a small convergence check on a
LoRA-shaped problem, and Flax NNX's ``nnx.LoRA`` through ``nnx.Optimizer``.

``riemann_precond``'s ``reg`` is a static Python number (it is not a hyperparameter to inject); the injected
hyperparameter is the learning rate of the optimizer that follows it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moelora_jax import riemann_precond
from moelora_jax.optim.optimizer import gauss_seidel_precond, scale_by_reference_adam

L, D_IN, R, D_OUT = 2, 16, 4, 8
LR = 0.05


# name -> (the transform given the optimizer that follows it, which optimizer follows it); a follower takes
# ``learning_rate`` (so that inject_hyperparams can inject it)
TRANSFORMS = {
    "riemann_precond": (lambda follow: optax.chain(riemann_precond(1e-3), follow), optax.sgd),
    "gauss_seidel": (lambda follow: gauss_seidel_precond(follow, 1e-3), optax.sgd),
    "reference_adam": (lambda follow: optax.chain(scale_by_reference_adam(), follow), optax.scale_by_learning_rate),
}


def _plain(name):
    build, follower = TRANSFORMS[name]
    return build(follower(learning_rate=LR))


def _injected(name):
    build, follower = TRANSFORMS[name]
    return build(optax.inject_hyperparams(follower)(learning_rate=LR))


def _problem(seed=0, dtype=jnp.float32):
    """LoRA factors of ``L`` layers and a regression whose target is a rank-``R`` product per layer."""
    rng = np.random.default_rng(seed)
    params = {
        "lora_a": jnp.asarray(rng.normal(size=(L, D_IN, R)) / 4, dtype),
        "lora_b": jnp.asarray(rng.normal(size=(L, R, D_OUT)) / 4, dtype),
    }
    x = jnp.asarray(rng.normal(size=(L, 32, D_IN)), dtype)
    target = jnp.asarray(rng.normal(size=(L, D_IN, R)) @ rng.normal(size=(L, R, D_OUT)) / 4, dtype)

    def loss(p):
        product = p["lora_a"].astype(jnp.float32) @ p["lora_b"].astype(jnp.float32)
        return jnp.mean((x.astype(jnp.float32) @ (product - target.astype(jnp.float32))) ** 2)

    return params, loss


def _run(tx, params, loss, steps, update=None):
    update = update or tx.update
    state = tx.init(params)
    for _ in range(steps):
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_jit_equals_eager(name):
    params, loss = _problem()
    tx = _plain(name)
    eager, _ = _run(tx, params, loss, 3)
    jitted, _ = _run(tx, params, loss, 3, jax.jit(tx.update))
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_inject_hyperparams_over_the_following_optimizer(name):
    """The injected learning rate equals the fixed one, and setting it to 0 in the state stops the steps."""
    params, loss = _problem()
    plain, _ = _run(_plain(name), params, loss, 3)
    injected, _ = _run(_injected(name), params, loss, 3)
    chex.assert_trees_all_close(injected, plain, rtol=1e-6, atol=1e-7)

    tx = _injected(name)
    state = tx.init(params)
    hyper = [
        s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "hyperparams")) if hasattr(s, "hyperparams")
    ]
    assert len(hyper) >= 1
    state = jax.tree.map(
        lambda s: (
            s._replace(hyperparams={**s.hyperparams, "learning_rate": jnp.zeros(())})
            if hasattr(s, "hyperparams")
            else s
        ),
        state,
        is_leaf=lambda s: hasattr(s, "hyperparams"),
    )
    updates, _ = tx.update(jax.grad(loss)(params), state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_multi_steps_accumulates_then_steps_once(name):
    """``MultiSteps(every_k_schedule=2)``: nothing moves on the first call; the second steps with the mean of the
    two gradients, exactly as the plain transform does with it."""
    params, loss = _problem()
    other, _ = _problem(seed=1)
    g1, g2 = jax.grad(loss)(params), jax.grad(loss)(other)  # two different gradients at the same params
    tx = optax.MultiSteps(_plain(name), every_k_schedule=2)
    state = tx.init(params)
    first, state = tx.update(g1, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(first))
    second, _ = tx.update(g2, state, params)
    plain = _plain(name)
    want, _ = plain.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), plain.init(params), params)
    chex.assert_trees_all_close(second, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_masked_and_partition_leave_other_leaves_alone(name):
    """Beside a frozen kernel: ``masked`` passes its gradient through untouched, ``partition`` gives it its own
    transform (here zero), and the factors step exactly as the transform alone steps them."""
    params, loss = _problem()
    kernel = jnp.ones((D_IN, D_OUT))
    tree = {"adapter": params, "kernel": kernel}
    grads = {"adapter": jax.grad(loss)(params), "kernel": 0.5 * kernel}
    plain = _plain(name)
    want, _ = plain.update(grads["adapter"], plain.init(params), params)

    masked = optax.masked(_plain(name), {"adapter": {"lora_a": True, "lora_b": True}, "kernel": False})
    got, _ = masked.update(grads, masked.init(tree), tree)
    chex.assert_trees_all_close(got["adapter"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["kernel"], grads["kernel"])

    labels = {"adapter": {"lora_a": "adapter", "lora_b": "adapter"}, "kernel": "frozen"}
    partition = optax.partition({"adapter": _plain(name), "frozen": optax.set_to_zero()}, labels)
    got, _ = partition.update(grads, partition.init(tree), tree)
    chex.assert_trees_all_close(got["adapter"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["kernel"], jnp.zeros_like(kernel))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_tree_map_params_maps_the_parameter_shaped_state(name):
    """``optax.tree_map_params`` reaches every parameter-shaped leaf of the state (e.g. to give it a sharding) and
    leaves the rest, so the mapped state still updates."""
    params, loss = _problem()
    tx = _plain(name)
    _, state = _run(tx, params, loss, 2)
    doubled = optax.tree_map_params(tx, lambda p: 2.0 * p, state)
    assert jax.tree.structure(doubled) == jax.tree.structure(state)
    param_shaped = [
        (a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(doubled), strict=True) if a.ndim == 3
    ]
    if name == "reference_adam":  # its moments; the preconditioners and SGD keep no parameter-shaped state
        assert param_shaped and all(np.allclose(2.0 * a, b) for a, b in param_shaped)
    tx.update(jax.grad(loss)(params), doubled, params)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_bfloat16_parameters_give_bfloat16_updates_close_to_float32(name):
    params, loss = _problem()
    low, low_loss = _problem(dtype=jnp.bfloat16)
    tx = _plain(name)
    want, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    got, _ = tx.update(jax.grad(low_loss)(low), tx.init(low), low)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(got))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.1, atol=0.05 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_sharded_over_8_devices_equals_unsharded_and_keeps_shardings(name):
    """The factors' feature axes split over 8 CPU devices (4 x 2): the same steps, the same shardings out."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices("cpu")[:8])
    params, loss = _problem()
    specs = {"lora_a": P(None, "fsdp", None), "lora_b": P(None, None, "tensor")}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    tx = _plain(name)
    update = jax.jit(tx.update)
    want, _ = _run(tx, params, loss, 2, update)
    got, _ = _run(tx, sharded, loss, 2, update)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    assert {k: v.sharding.spec for k, v in got.items()} == specs


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_converges_on_a_lora_shaped_regression(name):
    params, loss = _problem()
    trained, _ = _run(_plain(name), params, loss, 400, jax.jit(_plain(name).update))
    assert float(loss(trained)) < 0.1 * float(loss(params))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nnx_lora_trains_through_nnx_optimizer(name):
    """Flax NNX's own LoRA layer, only its ``nnx.LoRAParam`` leaves given to the optimizer."""
    from flax import nnx

    layer = nnx.LoRA(D_IN, R, D_OUT, rngs=nnx.Rngs(0), b_initializer=nnx.initializers.normal(0.1))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(64, D_IN)), jnp.float32)
    y = x @ jnp.asarray(rng.normal(size=(D_IN, R)) @ rng.normal(size=(R, D_OUT)) / 4, jnp.float32)
    optimizer = nnx.Optimizer(layer, _plain(name), wrt=nnx.LoRAParam)

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, opt):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)

    start = float(loss(layer))
    for _ in range(150):
        step(layer, optimizer)
    assert float(loss(layer)) < 0.1 * start
