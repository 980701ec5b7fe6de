"""The adapter optimizer built from OptimConfig: groups, schedules, the reference AdamW."""

import dataclasses
from typing import NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moelora_jax import riemann_precond
from moelora_jax.adapters.leaves import leaf_name
from moelora_jax.errors import UserError
from moelora_jax.optim.optimizer import (
    OptimConfig,
    adapter_labels,
    build_optimizer,
    lr_schedule,
    scale_by_reference_adam,
)


def _adapters(seed=0):
    rng = np.random.RandomState(seed)
    layer = {
        "lora_a": rng.randn(2, 3, 8, 2).astype(np.float32),
        "lora_b": rng.randn(2, 3, 2, 6).astype(np.float32),
        "gate": rng.randn(2, 8, 3).astype(np.float32),
    }
    return {"layers": {"attn": {"q_proj": layer}}}


def _grads(seed=1):
    return jax.tree.map(lambda x: jnp.asarray(np.random.RandomState(seed).randn(*x.shape), jnp.float32), _adapters())


def test_reference_adam_has_no_bias_correction_and_eps_outside_the_sqrt():
    b1, b2, eps = 0.9, 0.999, 1e-6
    tx = scale_by_reference_adam(b1, b2, eps)
    params = {"w": jnp.zeros(5)}
    state = tx.init(params)
    m = v = np.zeros(5)
    for seed in range(3):
        g = np.random.RandomState(seed).randn(5)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        np.testing.assert_allclose(updates["w"], m / (np.sqrt(v) + eps), rtol=1e-5)
    first = scale_by_reference_adam().update({"w": jnp.ones(5)}, scale_by_reference_adam().init(params))[0]["w"]
    assert np.allclose(first, 0.1 / (np.sqrt(0.001) + 1e-6))  # bias-corrected Adam would give ~1.0


def test_leaf_name_of_a_key_path():
    tu = jax.tree_util
    assert leaf_name((tu.DictKey("layers"), tu.DictKey("lora_a"))) == "lora_a"
    assert leaf_name((tu.DictKey("layers"), tu.GetAttrKey("gate"))) == "gate"
    for nameless in ((), (tu.DictKey("lora_a"), tu.SequenceKey(0)), (tu.DictKey(3),), (tu.FlattenedIndexKey(0),)):
        assert leaf_name(nameless) is None


def test_labels_by_leaf_name():
    labels = adapter_labels(_adapters())["layers"]["attn"]["q_proj"]
    assert labels == {"lora_a": "experts", "lora_b": "experts", "gate": "gate"}
    assert adapter_labels(_adapters(), frozen=("gate",))["layers"]["attn"]["q_proj"]["gate"] == "frozen"
    with pytest.raises(ValueError, match="kernel"):
        adapter_labels({"q": {"kernel": jnp.zeros(2)}})
    with pytest.raises(ValueError, match=r"\['lora_a'\]\[0\] is not"):
        adapter_labels({"lora_a": [jnp.zeros(2)]})


class LayerTuple(NamedTuple):
    lora_a: jax.Array
    lora_b: jax.Array
    gate: jax.Array


@flax.struct.dataclass
class LayerStruct:
    lora_a: jax.Array
    lora_b: jax.Array
    gate: jax.Array


@pytest.mark.parametrize("container", [LayerTuple, LayerStruct], ids=["namedtuple", "flax_struct"])
@pytest.mark.parametrize(
    "config",
    [
        OptimConfig(family="adamw", lr=0.1, gate_lr=0.01, gate_clip_norm=0.5, riemann_reg=1e-3, weight_decay=0.1),
        OptimConfig(family="reference_adamw", lr=0.05, gate_lr=0.01, riemann_reg=1e-2, gauss_seidel=True),
        OptimConfig(family="sgd", lr=0.1, momentum=0.9, riemann=False, frozen=("gate",)),
    ],
    ids=["adamw", "gauss_seidel", "sgd_frozen_gate"],
)
def test_attribute_trees_are_labelled_and_optimized_like_dicts(container, config):
    """Leaves named by attribute (NamedTuple, flax.struct: GetAttrKey) get the labels and the updates of the
    equivalent dict tree, over steps of the whole optimizer."""

    def as_attributes(tree):
        return {"layers": {"attn": {"q_proj": container(**tree["layers"]["attn"]["q_proj"])}}}

    adapters = _adapters()
    assert adapter_labels(as_attributes(adapters), config.frozen) == as_attributes(
        adapter_labels(adapters, config.frozen)
    )
    tx, tx_attr = build_optimizer(config, adapters), build_optimizer(config, as_attributes(adapters))
    state, state_attr, attr = tx.init(adapters), tx_attr.init(as_attributes(adapters)), as_attributes(adapters)
    step, step_attr = jax.jit(tx.update), jax.jit(tx_attr.update)
    for seed in (1, 2):
        grads = _grads(seed)
        updates, state = step(grads, state, adapters)
        updates_attr, state_attr = step_attr(as_attributes(grads), state_attr, attr)
        chex.assert_trees_all_close(updates_attr, as_attributes(updates), rtol=1e-6, atol=1e-7)
        adapters, attr = optax.apply_updates(adapters, updates), optax.apply_updates(attr, updates_attr)


def test_groups_get_their_own_chains():
    """SGD: experts move by -lr * riemann(g); the gate by -gate_lr * clip(g); frozen leaves not at all."""
    config = OptimConfig(family="sgd", lr=0.1, gate_lr=0.01, gate_clip_norm=0.5, riemann_reg=1e-3)
    adapters, grads = _adapters(), _grads()
    tx = build_optimizer(config, adapters)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    got = updates["layers"]["attn"]["q_proj"]
    pair = ("lora_a", "lora_b")
    expert_grads = {k: grads["layers"]["attn"]["q_proj"][k] for k in pair}
    expert_params = {k: adapters["layers"]["attn"]["q_proj"][k] for k in pair}
    pre, _ = riemann_precond(1e-3).update(expert_grads, optax.EmptyState(), expert_params)
    for name in pair:
        np.testing.assert_allclose(got[name], -0.1 * pre[name], rtol=1e-5)
    gate_grad = grads["layers"]["attn"]["q_proj"]["gate"]
    clipped = gate_grad * 0.5 / np.linalg.norm(gate_grad)
    np.testing.assert_allclose(got["gate"], -0.01 * clipped, rtol=1e-5)

    frozen = build_optimizer(dataclasses.replace(config, frozen=("gate",)), adapters)
    updates, _ = frozen.update(grads, frozen.init(adapters), adapters)
    assert not np.any(updates["layers"]["attn"]["q_proj"]["gate"])


def test_schedule_warms_up_then_decays_like_the_reference():
    """The reference decays linearly to 0 over 2222 steps and stops at 2000: about 0.1x there."""
    sched = lr_schedule(1e-5, OptimConfig(warmup_steps=100, decay_steps=2222, end_factor=0.0))
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(50)), 0.5e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(2000)), 1e-5 * 222 / 2122, rtol=1e-5)
    assert float(sched(5000)) == 0.0
    assert float(lr_schedule(3e-4, OptimConfig())(10**6)) == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "lion"}, "family='lion'"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"riemann_reg": 0.0}, "riemann_reg=0.0"),
        ({"warmup_steps": 10, "decay_steps": 5}, "decay_steps=5"),
        ({"gate_clip_norm": 0.0}, "gate_clip_norm=0.0"),
        ({"gauss_seidel": True, "riemann": False}, "needs riemann=True"),
    ],
)
def test_bad_optim_config_fails_clearly(kwargs, message):
    with pytest.raises(UserError, match=message):
        OptimConfig(**kwargs)


def test_riemann_refuses_frozen_leaves_that_split_the_factors():
    """``riemann_precond`` needs an adapter's factors in one group: freezing some of them fails at build time."""
    plain = _adapters()
    moslora = {"q": {"lora_a": jnp.ones((2, 8, 2)), "lora_b": jnp.ones((2, 2, 6)), "mixer": jnp.ones((2, 2, 2))}}
    for adapters, frozen in ((plain, ("lora_b",)), (moslora, ("mixer",)), (moslora, ("lora_a", "lora_b"))):
        with pytest.raises(UserError, match=r"splits the adapters' lora_a / lora_b.* freeze all of them or none"):
            build_optimizer(OptimConfig(frozen=frozen), adapters)
        build_optimizer(OptimConfig(frozen=frozen, riemann=False), adapters)
    build_optimizer(OptimConfig(frozen=("lora_a", "lora_b", "mixer")), plain)  # frozen names absent from a tree


def test_gauss_seidel_refuses_a_mixer():
    adapters = {"q": {"lora_a": jnp.ones((2, 8, 2)), "lora_b": jnp.ones((2, 2, 6)), "mixer": jnp.ones((2, 2, 2))}}
    tx = build_optimizer(OptimConfig(gauss_seidel=True), adapters)
    with pytest.raises(UserError, match=r"supports lora_a / lora_b experts only, not \['mixer'\]"):
        tx.init(adapters)


def test_gauss_seidel_mode_follows_the_reference_scaled_adamw():
    """Reference order per step: A's gradient by the old B, A updated, then B's gradient by the updated A."""
    lr, reg, b1, b2, eps = 0.05, 1e-2, 0.9, 0.999, 1e-6
    config = OptimConfig(
        family="reference_adamw", lr=lr, gate_lr=0.0, riemann_reg=reg, gauss_seidel=True, gate_clip_norm=None
    )
    adapters = _adapters()
    tx = build_optimizer(config, adapters)
    state = tx.init(adapters)
    a = np.asarray(adapters["layers"]["attn"]["q_proj"]["lora_a"], np.float64)
    b = np.asarray(adapters["layers"]["attn"]["q_proj"]["lora_b"], np.float64)
    moments = {name: [np.zeros_like(x), np.zeros_like(x)] for name, x in (("a", a), ("b", b))}

    def adam(name, g):
        m, v = moments[name]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g**2
        return -lr * m / (np.sqrt(v) + eps)

    eye = np.eye(a.shape[-1])
    for seed in (1, 2):
        grads = _grads(seed)
        updates, state = tx.update(grads, state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        ga = np.asarray(grads["layers"]["attn"]["q_proj"]["lora_a"], np.float64)
        gb = np.asarray(grads["layers"]["attn"]["q_proj"]["lora_b"], np.float64)
        a = a + adam("a", ga @ np.linalg.inv(b @ np.swapaxes(b, -1, -2) + reg * eye))
        b = b + adam("b", np.linalg.inv(np.swapaxes(a, -1, -2) @ a + reg * eye) @ gb)  # the *updated* a
    np.testing.assert_allclose(adapters["layers"]["attn"]["q_proj"]["lora_a"], a, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(adapters["layers"]["attn"]["q_proj"]["lora_b"], b, rtol=2e-4, atol=1e-6)
