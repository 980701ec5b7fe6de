"""MoE-LoRA delta and module, checked against an explicit per-expert loop (NumPy and plain JAX autodiff)."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moelora_jax import AdaptedDense, AdapterConfig, MoleConfig, moe_lora_delta, topk_softmax_gate
from moelora_jax.adapters.layers import MoleGate, dropout_mask, lora_mixture
from moelora_jax.adapters.leaves import FACTOR_LEAVES, GATE_LEAVES
from moelora_jax.errors import UserError
from moelora_jax.parallel.sharding import DEFAULT_RULES, logical_shardings, make_mesh

E, D_IN, R, D_OUT = 5, 12, 3, 7


def _random_adapter(seed: int, num_experts: int = E, mixer: bool = False, batch: tuple[int, ...] = (2, 4)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*batch, D_IN)).astype(np.float32)
    a = rng.normal(size=(num_experts, D_IN, R)).astype(np.float32) / math.sqrt(D_IN)
    b = rng.normal(size=(num_experts, R, D_OUT)).astype(np.float32)
    gate = rng.normal(size=(D_IN, num_experts)).astype(np.float32)
    m = rng.normal(size=(num_experts, R, R)).astype(np.float32) if mixer else None
    return x, a, b, gate, m


def _topk_mask(logits: np.ndarray, top_k: int) -> np.ndarray:
    order = np.argsort(-logits, axis=-1)[..., :top_k]
    mask = np.zeros_like(logits, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def numpy_moe_delta(x, a, b, gate, top_k, scale, mixer=None):
    """Explicit loop over experts in float64: s * sum_i g_i (x A_i [M_i]) B_i."""
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    out = np.zeros((*x.shape[:-1], b.shape[-1]))
    if gate is None:
        g = np.ones((*x.shape[:-1], 1))
    else:
        logits = x @ np.asarray(gate, np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        p = np.where(_topk_mask(logits, top_k), p, 0.0)
        g = p / p.sum(-1, keepdims=True)
    for i in range(a.shape[0]):
        h = x @ a[i]
        if mixer is not None:
            h = h @ np.asarray(mixer[i], np.float64)
        out += g[..., i : i + 1] * (h @ b[i])
    return scale * out


def loop_delta_autodiff(x, a, b, gate, mask, scale, mixer=None, sqrt_gate=False):
    """Per-expert loop in JAX, differentiated by plain autodiff; sqrt_gate via the stop-gradient formula."""
    sg = jax.lax.stop_gradient
    p = jax.nn.softmax(x @ gate, axis=-1) * mask
    g = p / jnp.sum(p, axis=-1, keepdims=True)
    out = 0.0
    for i in range(a.shape[0]):
        h = x @ a[i]
        if mixer is not None:
            h = h @ mixer[i]
        expert = h @ b[i]
        gi = g[..., i : i + 1]
        # sqrt_gate: the stop-gradient formula (Sun et al. 2025); standard: plain g_i * E_i(x).
        term = sg(jnp.sqrt(gi)) * expert + (gi - sg(jnp.sqrt(gi))) * sg(expert) if sqrt_gate else gi * expert
        out = out + term
    return scale * out


@pytest.mark.parametrize("top_k", [1, 2, E])
@pytest.mark.parametrize("mixer", [False, True])
def test_fused_delta_equals_per_expert_loop(top_k, mixer):
    x, a, b, gate, m = _random_adapter(0, mixer=mixer)
    got = moe_lora_delta(x, a, b, gate, top_k=top_k, scale=1.7, mixer=m)
    np.testing.assert_allclose(got, numpy_moe_delta(x, a, b, gate, top_k, 1.7, m), rtol=2e-5, atol=2e-5)


def test_single_expert_is_lora():
    x, a, b, gate, _ = _random_adapter(1, num_experts=1)
    lora = 2.0 * (x.astype(np.float64) @ a[0] @ b[0])
    np.testing.assert_allclose(moe_lora_delta(x, a, b, None, scale=2.0), lora, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(moe_lora_delta(x, a, b, gate, scale=2.0), lora, rtol=2e-5, atol=2e-5)


def test_topk_gate_renormalises_over_kept_experts():
    logits = jnp.array([[2.0, 0.0, 1.0, -1.0]])
    p = np.exp([2.0, 0.0, 1.0, -1.0])
    expected = np.array([p[0], 0.0, p[2], 0.0]) / (p[0] + p[2])
    np.testing.assert_allclose(topk_softmax_gate(logits, 2)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(topk_softmax_gate(logits, 4)[0], p / p.sum(), rtol=1e-6)


@pytest.mark.parametrize("strategy", ["standard", "sqrt_gate"])
@pytest.mark.parametrize("mixer", [False, True])
def test_gradients_equal_autodiff_of_the_formula(strategy, mixer):
    x, a, b, gate, m = _random_adapter(2, mixer=mixer)
    top_k, scale = 2, 0.8
    mask = jnp.asarray(_topk_mask(x @ gate, top_k), jnp.float32)
    target = np.random.default_rng(3).normal(size=(*x.shape[:-1], D_OUT)).astype(np.float32)
    m = jnp.zeros((E, R, R)) if m is None else m

    def loss_fused(x, a, b, gate, m):
        mixer_arg = m if mixer else None
        out = moe_lora_delta(x, a, b, gate, top_k=top_k, scale=scale, strategy=strategy, mixer=mixer_arg)
        return jnp.sum(jnp.tanh(out) * target)

    def loss_loop(x, a, b, gate, m):
        out = loop_delta_autodiff(x, a, b, gate, mask, scale, m if mixer else None, strategy == "sqrt_gate")
        return jnp.sum(jnp.tanh(out) * target)

    args = tuple(jnp.asarray(v) for v in (x, a, b, gate, m))
    got = jax.grad(loss_fused, argnums=range(5))(*args)
    want = jax.grad(loss_loop, argnums=range(5))(*args)
    for name, g1, g2 in zip(["x", "lora_a", "lora_b", "gate", "mixer"], got, want, strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5, err_msg=name)


def test_sqrt_gate_changes_only_the_expert_backward():
    x, a, b, gate, _ = _random_adapter(4)
    target = np.random.default_rng(5).normal(size=(*x.shape[:-1], D_OUT)).astype(np.float32)

    def run(strategy):
        def loss(a, b, gate):
            return jnp.sum(moe_lora_delta(x, a, b, gate, top_k=3, scale=2.0, strategy=strategy) ** 2 * target)

        return loss(a, b, gate), jax.grad(loss, argnums=(0, 1, 2))(a, b, gate)

    (loss_std, (ga_std, gb_std, gg_std)), (loss_sqrt, (ga_sqrt, gb_sqrt, gg_sqrt)) = run("standard"), run("sqrt_gate")
    np.testing.assert_allclose(loss_std, loss_sqrt, rtol=1e-6)
    np.testing.assert_allclose(gg_std, gg_sqrt, rtol=1e-5, atol=1e-6)
    # sqrt(g) > g for 0 < g < 1: the experts get larger gradients under sqrt_gate.
    assert np.linalg.norm(ga_sqrt) > 1.05 * np.linalg.norm(ga_std)
    assert np.linalg.norm(gb_sqrt) > 1.05 * np.linalg.norm(gb_std)


def _count_dots(closed_jaxpr) -> int:
    """Matmuls in a traced program, nested sub-programs (custom_vjp, pjit) included."""
    return str(closed_jaxpr).count("dot_general[")


@pytest.mark.parametrize("num_experts", [1, 4, 20])
def test_experts_are_fused_not_looped(num_experts):
    """Forward: one matmul into E*r + E columns, one out; backward: the same matmul count for both strategies."""
    x, a, b, gate, _ = _random_adapter(6, num_experts=num_experts)
    fwd = jax.make_jaxpr(lambda x: moe_lora_delta(x, a, b, gate, top_k=1, scale=1.0))(x)
    assert _count_dots(fwd) == 2
    counts = set()
    for strategy in ("standard", "sqrt_gate"):

        def loss(a, b, g, x, s=strategy):
            return jnp.sum(moe_lora_delta(x, a, b, g, top_k=1, scale=1.0, strategy=s))

        counts.add(_count_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(a, b, gate, x)))
    assert counts == {6}


def test_bfloat16_activations_under_jit():
    x, a, b, gate, _ = _random_adapter(7)
    fn = jax.jit(lambda x: moe_lora_delta(x, a, b, gate, top_k=2, scale=1.0))
    out16 = fn(jnp.asarray(x, jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out16), fn(x), rtol=0.05, atol=0.05)


def test_dropout_hits_experts_only():
    x, a, b, gate, _ = _random_adapter(8)
    rng, rate = jax.random.key(0), 0.3
    got = moe_lora_delta(x, a, b, gate, top_k=2, scale=1.0, dropout_rng=rng, dropout_rate=rate)
    keep, keep_prob = dropout_mask(rng, rate, x.shape)
    assert abs(keep_prob - (1.0 - rate)) <= 2**-17
    x_dropped = np.where(keep, x / keep_prob, 0.0)
    # Experts see the dropped input; the gate the clean one.
    logits = x @ gate
    p = np.exp(logits - logits.max(-1, keepdims=True)) * _topk_mask(logits, 2)
    g = p / p.sum(-1, keepdims=True)
    want = sum(g[..., i : i + 1] * (x_dropped @ a[i] @ b[i]) for i in range(E))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, moe_lora_delta(x, a, b, gate, top_k=2, scale=1.0), atol=1e-3)


def test_dropout_gradients_equal_autodiff_of_the_written_out_mixture():
    """The dropped down-projection's backward (which recomputes the dropped input from the mask) against plain
    autodiff of the formula with the same mask, for every input."""
    x, a, b, gate, _ = _random_adapter(9)
    rng, rate = jax.random.key(3), 0.3
    keep, keep_prob = dropout_mask(rng, rate, x.shape)

    def reference(x, a, b, gate):
        x_dropped = jnp.where(keep, x / keep_prob, 0.0)
        g = topk_softmax_gate(x @ gate, 2)
        return sum(g[..., i : i + 1] * (x_dropped @ a[i] @ b[i]) for i in range(E))

    def ours(x, a, b, gate):
        return moe_lora_delta(x, a, b, gate, top_k=2, scale=1.0, dropout_rng=rng, dropout_rate=rate)

    def objective(fn):
        return lambda *args: jnp.sum(jnp.sin(fn(*args)))

    got = jax.grad(objective(ours), argnums=(0, 1, 2, 3))(x, a, b, gate)
    want = jax.grad(objective(reference), argnums=(0, 1, 2, 3))(x, a, b, gate)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_dropout_mask_keeps_at_its_rate_from_the_key_alone(rate):
    shape = (64, 37, 33)  # an odd last axis: the 16-bit words are cut from 32-bit draws
    keep, keep_prob = dropout_mask(jax.random.key(1), rate, shape)
    assert keep.shape == shape and keep.dtype == jnp.bool_
    n = math.prod(shape)  # kept count is Binomial(n, q): 5 standard deviations
    assert abs(float(keep.mean()) - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)
    np.testing.assert_array_equal(keep, dropout_mask(jax.random.key(1), rate, shape)[0])
    assert float(jnp.mean(keep != dropout_mask(jax.random.key(2), rate, shape)[0])) > rate


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 6}, "top_k=6 must lie in"),
        ({"top_k": 0}, "top_k=0 must lie in"),
        ({"strategy": "sqrt"}, "Unknown gradient strategy"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
    ],
)
def test_delta_rejects_bad_options(kwargs, message):
    x, a, b, gate, _ = _random_adapter(9)
    with pytest.raises(ValueError, match=message):
        moe_lora_delta(x, a, b, gate, scale=1.0, **kwargs)


def test_empty_batch_and_unbatched_input():
    x, a, b, gate, _ = _random_adapter(14)

    def loss(a, x):
        return jnp.sum(moe_lora_delta(x, a, b, gate, top_k=2, scale=1.0))

    assert jax.grad(loss)(a, jnp.zeros((0, D_IN))).shape == a.shape
    single = x[0, 0]  # (d_in,)
    np.testing.assert_allclose(
        moe_lora_delta(single, a, b, gate, top_k=2, scale=1.0), numpy_moe_delta(single, a, b, gate, 2, 1.0), rtol=2e-5
    )


def test_bfloat16_gradients_follow_float32():
    x, a, b, gate, _ = _random_adapter(15)

    def grads(x):
        def loss(a, b, gate):
            out = moe_lora_delta(x, a, b, gate, top_k=2, scale=1.0, strategy="sqrt_gate")
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(a, b, gate)

    for g16, g32 in zip(grads(jnp.asarray(x, jnp.bfloat16)), grads(x), strict=True):
        assert g16.dtype == jnp.float32  # parameter gradients in the parameters' dtype
        np.testing.assert_allclose(g16, g32, rtol=0.05, atol=0.05 * np.abs(g32).max())


class DeltaShapesTest(chex.TestCase):
    """Shapes and dtypes are chex assertions, checked while tracing: under ``jax.jit`` as eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_delta_asserts_shapes_and_dtype(self):
        x, a, b, gate, _ = _random_adapter(10)
        delta = self.variant(lambda x, a, b, gate, mixer: moe_lora_delta(x, a, b, gate, scale=1.0, mixer=mixer))
        bad = [
            ((x, a[0], b, gate, None), r"lora_a must be \(E, d_in, r\)"),
            ((x, a, b[:, :2], gate, None), r"shape \(5, 2, 7\) but expected \(5, 3, None\)"),
            ((x[..., :11], a, b, gate, None), r"shape \(2, 4, 11\) but expected \(\.\.\., 12\)"),
            ((x, a, b, gate.T, None), r"shape \(5, 12\) but expected \(12, 5\)"),
            ((x, a, b, gate, jnp.zeros((E, R, R + 1))), r"expected \(5, 3, 3\)"),
            ((x.astype(np.int32), a, b, gate, None), "type int32 but expected"),
        ]
        for args, message in bad:
            with self.assertRaisesRegex(AssertionError, message):
                delta(*args)


def test_delta_rejects_a_missing_gate_and_a_traced_scale():
    x, a, b, gate, _ = _random_adapter(10)
    with pytest.raises(ValueError, match="need a gate"):
        moe_lora_delta(x, a, b, None, scale=1.0)
    with pytest.raises(TypeError, match="scale must be a static Python number"):
        jax.jit(lambda s: moe_lora_delta(x, a, b, gate, scale=s))(1.0)


def test_mole_mixture_asserts_shapes():
    x, a, b, _, _ = _random_adapter(10)
    weights = jnp.full((*x.shape[:-1], E), 1.0 / E)
    want = sum(x @ a[i] @ b[i] for i in range(E)) / E
    np.testing.assert_allclose(lora_mixture(x, a, b, weights), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match=r"expected \(2, 4, 5\)"):
        lora_mixture(x, a, b, weights[..., :-1])
    with pytest.raises(AssertionError, match="has type bfloat16 but expected"):
        lora_mixture(x, a, b, weights.astype(jnp.bfloat16))


def test_trainable_leaves_are_the_contracts_names():
    """Every trainable leaf a module creates is named in ``adapter_leaves`` (the optimizer and export read them)."""
    x = jnp.ones((2, D_IN))
    moe = AdaptedDense(D_OUT, adapter=AdapterConfig(num_experts=E, rank=R, mixer=True)).init(jax.random.key(0), x)
    mole = MoleGate(MoleConfig(num_loras=3, rank=R)).init(jax.random.key(0), x)
    assert set(moe["adapters"]) == {*FACTOR_LEAVES, "gate"}
    assert set(mole["adapters"]) == set(GATE_LEAVES)


def test_module_init_matches_reference_and_starts_at_base():
    cfg = AdapterConfig(num_experts=E, rank=R, top_k=2, alpha=8.0, mixer=True)
    x = jnp.asarray(_random_adapter(11)[0])
    module = AdaptedDense(D_OUT, adapter=cfg)
    variables = module.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == {
        "params": {"kernel": (D_IN, D_OUT)},
        "adapters": {"lora_a": (E, D_IN, R), "lora_b": (E, R, D_OUT), "gate": (D_IN, E), "mixer": (E, R, R)},
    }
    adapters = variables["adapters"]
    assert all(leaf.dtype == jnp.float32 for leaf in adapters.values())
    assert not np.any(adapters["lora_b"])
    for name, fan_in in (("lora_a", D_IN), ("gate", D_IN), ("mixer", R)):
        assert np.max(np.abs(adapters[name])) <= 1 / math.sqrt(fan_in)
        assert np.std(adapters[name]) > 0.3 / math.sqrt(fan_in)  # uniform: std = bound / sqrt(3)
    np.testing.assert_allclose(module.apply(variables, x), x @ variables["params"]["kernel"], rtol=1e-6)


def test_module_matches_functional_delta_and_plain_lora_has_no_gate():
    x = jnp.asarray(_random_adapter(12)[0])
    lora = AdaptedDense(D_OUT, adapter=AdapterConfig(rank=R))
    variables = lora.init(jax.random.key(0), x)
    adapters = variables["adapters"]
    assert set(adapters) == {"lora_a", "lora_b"}
    adapters = {**adapters, "lora_b": jnp.ones_like(adapters["lora_b"])}
    kernel = variables["params"]["kernel"]
    want = x @ kernel + (16.0 / R) * (x @ adapters["lora_a"][0] @ adapters["lora_b"][0])
    got = lora.apply({"params": variables["params"], "adapters": adapters}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_module_dropout_uses_the_dropout_stream():
    cfg = AdapterConfig(num_experts=E, rank=R, top_k=2, dropout=0.5)
    x = jnp.asarray(_random_adapter(13)[0])
    module = AdaptedDense(D_OUT, adapter=cfg)
    variables = module.init(jax.random.key(0), x, deterministic=True)
    ad = {**variables["adapters"], "lora_b": jnp.ones_like(variables["adapters"]["lora_b"])}
    variables = {"params": variables["params"], "adapters": ad}

    def run(seed):
        return module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_allclose(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    np.testing.assert_allclose(
        module.apply(variables, x, deterministic=True),
        x @ variables["params"]["kernel"]
        + moe_lora_delta(x, ad["lora_a"], ad["lora_b"], ad["gate"], top_k=2, scale=cfg.scale),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="deterministic"):
        module.apply(variables, x)


def test_module_under_nn_vmap_over_layers_keeps_leaf_names():
    """Stacked layers: a leading layer axis on every leaf, as nn.scan/nn.vmap produce."""
    stacked = nn.vmap(
        AdaptedDense,
        variable_axes={"params": 0, "adapters": 0},
        split_rngs={"params": True},
        in_axes=None,
        axis_size=3,
    )(D_OUT, adapter=AdapterConfig(num_experts=E, rank=R, top_k=2))
    adapters = stacked.init(jax.random.key(0), jnp.ones((2, D_IN)))["adapters"]
    assert adapters["lora_a"].shape == (3, E, D_IN, R)
    assert adapters["gate"].shape == (3, D_IN, E)
    assert not np.allclose(adapters["lora_a"][0], adapters["lora_a"][1])


def test_module_kernel_axes_box_every_leaf_with_logical_names():
    module = AdaptedDense(D_OUT, adapter=AdapterConfig(num_experts=E, rank=R, mixer=True), kernel_axes=("embed", "mlp"))
    boxed = module.init(jax.random.key(0), jnp.ones((2, D_IN)))
    names = jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    assert names == {
        "params": {"kernel": ("embed", "mlp")},
        "adapters": {
            "lora_a": ("expert", "embed", "rank"),
            "lora_b": ("expert", "rank", "mlp"),
            "gate": ("embed", "expert"),
            "mixer": ("expert", "rank", None),  # a logical name may appear once per array
        },
    }
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    logical_shardings(boxed, mesh, DEFAULT_RULES)  # every leaf's names map to a sharding (a repeated name raises)
    plain = AdaptedDense(D_OUT, adapter=AdapterConfig(num_experts=E, rank=R, mixer=True))
    x = jnp.asarray(_random_adapter(14)[0])
    variables = nn.unbox(boxed)
    np.testing.assert_allclose(module.apply(variables, x), plain.apply(variables, x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank=0"),
        ({"num_experts": 4, "top_k": 5}, "top_k=5"),
        ({"strategy": "plain"}, "strategy"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_experts": 0}, "num_experts=0"),
    ],
)
def test_adapter_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        AdapterConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_loras": 1, "rank": 2}, "at least 2 LoRAs"),
        ({"num_loras": 2, "rank": 2, "gate": "model"}, "gate='model' must be 'layer' or 'block'"),
        ({"num_loras": 2, "rank": 2, "tau": 0.0}, "tau=0.0 must be > 0"),
        ({"num_loras": 2, "rank": 2, "masked": (0, 1)}, r"must name some \(not all\)"),
    ],
)
def test_mole_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        MoleConfig(**kwargs)
