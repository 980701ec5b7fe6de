"""Expert load and routing losses: closed forms, padding, finite-difference gradients, and their effect in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moelora_jax import AdapterConfig, GateRouting
from moelora_jax.adapters.layers import topk_mask
from moelora_jax.adapters.routing import RouterLosses, balance_loss, load_metrics, router_stats, sown_routing, z_loss
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.optim.optimizer import OptimConfig, build_optimizer
from moelora_jax.parallel.sharding import make_mesh
from moelora_jax.training.trainer import Trainer


def _stats(logits: jax.Array, weights: jax.Array, top_k: int):
    """``router_stats`` of one group of routers whose choice is the top-k of ``logits``."""
    return router_stats([GateRouting(logits, topk_mask(logits, top_k))], weights)


def _numpy_stats(logits: np.ndarray, weights: np.ndarray, top_k: int):
    """Load, importance and z of one router, token by token in numpy."""
    experts = logits.shape[-1]
    load, importance, z, n = np.zeros(experts), np.zeros(experts), 0.0, weights.sum()
    for token, w in zip(logits.reshape(-1, experts), weights.reshape(-1), strict=True):
        p = np.exp(token - token.max())
        p /= p.sum()
        load[np.argsort(-token)[:top_k]] += w
        importance += w * p
        z += w * np.log(np.exp(token).sum()) ** 2
    return load / (top_k * n), importance / n, z / n


def test_stats_match_a_token_by_token_count_and_skip_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 5, 6)).astype(np.float32)  # 3 layers, batch 2, 5 tokens, 6 experts
    weights = np.ones((2, 5), np.float32)
    weights[1, 3:] = 0  # padding
    stats = _stats(jnp.asarray(logits), jnp.asarray(weights), 2)
    for layer in range(3):
        real = logits[layer][weights.astype(bool)]
        load, importance, z = _numpy_stats(real, np.ones(len(real)), 2)
        np.testing.assert_allclose(stats.load[layer], load, rtol=1e-6)
        np.testing.assert_allclose(stats.importance[layer], importance, rtol=1e-6)
        np.testing.assert_allclose(stats.z[layer], z, rtol=1e-5)
    np.testing.assert_allclose(jnp.sum(stats.load, -1), 1.0, rtol=1e-6)


def test_balance_loss_is_one_when_even_and_e_over_k_when_collapsed():
    experts, top_k = 8, 2
    # even: token t prefers experts t and t+1 (mod E) by a wide margin, so each expert gets 2 of 2E slots
    tokens = jnp.arange(experts)
    even = 30.0 * (jax.nn.one_hot(tokens, experts) + jax.nn.one_hot((tokens + 1) % experts, experts))
    stats = _stats(even[None, None], jnp.ones((1, experts)), top_k)
    assert float(balance_loss(stats)) == pytest.approx(1.0, abs=1e-6)
    assert float(load_metrics(stats)["load_cv"]) == pytest.approx(0.0, abs=1e-6)
    collapsed = jnp.tile(30.0 * (jnp.arange(experts) < top_k), (1, 1, 16, 1)).astype(jnp.float32)
    stats = _stats(collapsed, jnp.ones((1, 16)), top_k)
    assert float(balance_loss(stats)) == pytest.approx(experts / top_k, rel=1e-6)
    assert float(load_metrics(stats)["load_cv"]) == pytest.approx(np.sqrt(experts / top_k - 1), rel=1e-6)
    np.testing.assert_allclose(load_metrics(stats)["expert_load"], [0.5, 0.5] + [0.0] * 6, atol=1e-7)


def test_stats_assert_their_shapes():
    logits, weights = jnp.zeros((2, 3, 4, 5)), jnp.ones((3, 4))
    bad = [
        ([GateRouting(logits[0], None)], weights, r"shape \(3, 4, 5\) but expected \(None, 3, 4, None\)"),
        ([GateRouting(logits, None)], weights[:, :2], r"shape \(2, 3, 4, 5\) but expected \(None, 3, 2, None\)"),
        ([GateRouting(logits, logits)], weights, "type float32 but expected bool"),
        ([GateRouting(logits, logits[..., :2] > 0)], weights, "different shapes"),
        ([GateRouting(logits, None), GateRouting(logits[..., :3], None)], weights, r"at dims -1: \[5, 3\]"),
    ]
    for routings, token_weights, message in bad:
        with pytest.raises(AssertionError, match=message):
            jax.jit(router_stats)(routings, token_weights)


@pytest.mark.parametrize("loss", [balance_loss, z_loss])
def test_gradients_match_finite_differences(loss):
    logits = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))  # no near-ties: the top-k sets stay put
    weights = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    check_grads(lambda z: loss(_stats(z, weights, 2)), (logits,), order=1, modes=["rev"], atol=1e-3, rtol=1e-3)


CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)


def test_a_model_sows_each_gates_own_top_k_choice():
    model = Llama(CONFIG, adapter=AdapterConfig(num_experts=6, rank=2, top_k=2), adapter_targets=("q", "up"))
    variables = init_variables(model, jax.random.key(0), ("params", "adapters"))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    _, sown = model.apply(variables, tokens, mutable=["router"])
    routings = sown_routing(sown)
    assert len(routings) == 2  # q and up, each (layers, B, T, E)
    for logits, routed in routings:
        assert logits.shape == routed.shape == (CONFIG.num_layers, 2, 5, 6)
        ranks = np.argsort(np.argsort(-np.asarray(logits), axis=-1, kind="stable"), axis=-1)
        np.testing.assert_array_equal(routed, ranks < 2)


def _load_cv_after_training(balance: float) -> tuple[float, float]:
    """Load CV at the first and the 30th step of a tiny MoE-LoRA (E=8, top-2) whose gate learns fast."""
    model = Llama(CONFIG, adapter=AdapterConfig(num_experts=8, rank=2, top_k=2, alpha=4.0))
    params = init_variables(model, jax.random.key(0), ("params",))["params"]
    adapters = init_variables(model, jax.random.key(1), ("adapters",))["adapters"]
    optimizer = build_optimizer(OptimConfig(family="adamw", lr=1e-2, gate_lr=3e-2, gate_clip_norm=None), adapters)
    mesh = make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    trainer = Trainer(model, optimizer, mesh, router_losses=RouterLosses(balance=balance))
    state, params = trainer.init(jax.random.key(0)), trainer.place_params(params)
    rng, cvs = np.random.RandomState(0), []
    for _ in range(30):
        tokens = rng.randint(3, 64, (1, 8, 12)).astype(np.int32)
        tokens[..., -3:] = [5, 6, 7]
        loss_mask = np.zeros_like(tokens, bool)
        loss_mask[..., -3:] = True
        batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": loss_mask}
        state, metrics = trainer.train_step(state, params, batch)
        cvs.append(float(metrics["load_cv"]))
        assert set(metrics) >= {"balance_loss", "z_loss", "load_cv", "expert_load"}
    return cvs[0], float(np.mean(cvs[-5:]))


def test_the_balance_loss_evens_out_expert_load():
    start_off, end_off = _load_cv_after_training(0.0)
    start_on, end_on = _load_cv_after_training(1.0)
    assert start_on == pytest.approx(start_off, rel=1e-5)  # same start: the loss acts only through training
    assert end_on < 0.5 * end_off, (end_on, end_off)
