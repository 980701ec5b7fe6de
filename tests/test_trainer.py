"""The jitted train step on a tiny random model: learning, sharding, accumulation and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moelora_jax import AdapterConfig
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.optim.optimizer import OptimConfig, build_optimizer
from moelora_jax.parallel.sharding import make_mesh
from moelora_jax.training.trainer import Trainer

CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
ADAPTER = AdapterConfig(num_experts=4, rank=2, top_k=2, alpha=4.0, dropout=0.0)


def _setup(devices, optim=None):
    model = Llama(CONFIG, adapter=ADAPTER)
    params = init_variables(model, jax.random.key(0), ("params",))["params"]
    # With the 0.02-scale random head, no hidden state can move a logit by more than ~0.6; widen its range.
    params["lm_head"] = params["lm_head"] * 25.0
    adapters = init_variables(model, jax.random.key(1), ("adapters",))["adapters"]
    optimizer = build_optimizer(optim or OptimConfig(family="adamw", lr=3e-2, gate_lr=1e-2), adapters)
    trainer = Trainer(model, optimizer, make_mesh(*devices, devices=jax.devices("cpu")[: int(np.prod(devices))]))
    return trainer, trainer.place_params(params)


def _batch(seed, n_micro=1, batch=4, length=12):
    """Random prompts, each answered by the same three tokens; target counts vary per row and micro-batch."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, 64, (n_micro, batch, length)).astype(np.int32)
    tokens[..., -3:] = [5, 6, 7]
    loss_mask = np.zeros_like(tokens, bool)
    loss_mask[..., -3:] = True
    loss_mask[..., 0, -3] = False  # unequal target counts across rows and micro-batches
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": loss_mask}


def test_training_loss_falls_and_only_adapters_move():
    trainer, params = _setup((1, 1, 1))
    state = trainer.init(jax.random.key(0))
    before = jax.tree.map(np.asarray, params)
    losses = []
    for step in range(40):
        state, metrics = trainer.train_step(state, params, _batch(step % 4))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert int(state.step) == 40 and int(state.skipped) == 0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))


def test_eight_device_mesh_matches_one_device():
    """SGD (updates linear in the gradients; Adam would amplify float-order noise in near-zero gradients)."""
    runs = {}
    for devices in ((1, 1, 1), (2, 2, 2)):
        trainer, params = _setup(devices, OptimConfig(family="sgd", lr=0.1, gate_lr=0.1, riemann_reg=1e-2))
        state = trainer.init(jax.random.key(0))
        losses = []
        for step in range(3):
            state, metrics = trainer.train_step(state, params, _batch(step, batch=4))
            losses.append(float(metrics["loss"]))
        runs[devices] = (losses, jax.tree.map(np.asarray, state.adapters))
    np.testing.assert_allclose(runs[(2, 2, 2)][0], runs[(1, 1, 1)][0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), runs[(2, 2, 2)][1], runs[(1, 1, 1)][1]
    )


def test_optimizer_state_shardings_are_declared_from_the_adapters():
    """Adam's moments are sharded like the adapter leaf they track, the counts replicated, before anything runs;
    ``init`` and the step produce exactly those shardings."""
    trainer, params = _setup((1, 4, 2), OptimConfig(family="adamw", lr=1e-2, gate_lr=1e-2))
    adapters = jax.tree_util.tree_flatten_with_path(trainer.shardings["adapters"])[0]
    by_path = {tuple(k.key for k in path): sharding for path, sharding in adapters}
    assert any(not s.is_fully_replicated for s in by_path.values())  # the fsdp x tensor mesh splits some factors
    declared = jax.tree_util.tree_flatten_with_path(trainer.state_shardings.opt_state)[0]
    matched = 0
    for path, sharding in declared:
        keys = tuple(getattr(k, "key", None) for k in path)
        owner = next((keys[i:] for i in range(len(keys)) if keys[i:] in by_path), None)
        if owner is None:
            assert sharding.is_fully_replicated, jax.tree_util.keystr(path)  # counts
        else:
            matched += 1
            assert sharding == by_path[owner], jax.tree_util.keystr(path)
    assert matched == 2 * len(by_path)  # mu and nu of every adapter leaf
    state = trainer.init(jax.random.key(0))
    for _ in range(2):
        shardings = jax.tree.map(lambda x: x.sharding, state)
        assert shardings == trainer.state_shardings
        state, _ = trainer.train_step(state, params, _batch(0, batch=4))


def test_accumulated_micro_batches_equal_one_large_batch():
    big = _batch(7, n_micro=1, batch=4)
    micro = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[2:]), big)
    results = []
    for batch in (big, micro):
        trainer, params = _setup((1, 1, 1), OptimConfig(family="sgd", lr=0.5, gate_lr=0.5, riemann=True))
        state = trainer.init(jax.random.key(0))
        state, _ = trainer.train_step(state, params, _batch(1))  # move B off zero first
        state, metrics = trainer.train_step(state, params, batch)
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.adapters)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), results[0][1], results[1][1])


def test_non_finite_updates_are_skipped_and_counted():
    trainer, params = _setup((1, 1, 1))
    state = trainer.init(jax.random.key(0))
    state, _ = trainer.train_step(state, params, _batch(0))
    before = jax.tree.map(np.asarray, state.adapters)
    poisoned = {**params, "final_norm": {"scale": params["final_norm"]["scale"].at[0].set(jnp.nan)}}
    state, metrics = trainer.train_step(state, poisoned, _batch(1))
    assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.adapters))
    state, metrics = trainer.train_step(state, params, _batch(2))
    assert bool(metrics["finite"]) and int(state.skipped) == 1
