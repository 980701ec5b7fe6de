"""The Flax LLaMA against transformers' PyTorch LlamaForCausalLM, and its adapters, remat, cache and sharding."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moelora_jax import AdapterConfig, riemann_precond
from moelora_jax.models.llama import (
    REMAT_CHOICES,
    KVCache,
    Llama,
    Llama3RopeScaling,
    LlamaConfig,
    abstract_variables,
    init_variables,
    swiglu,
)
from moelora_jax.models.pretrained import load_config, load_params
from moelora_jax.parallel.sharding import DEFAULT_RULES, batch_sharding, logical_shardings, make_mesh

torch = pytest.importorskip("torch")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VARIANTS = {
    "gqa-untied": {},
    "llama3-rope-tied": {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True},
    "mha-theta1e5": {"num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
}


def _batch(seed=0, batch=3, length=40, vocab=96):
    """Tokens with a full row, a left-padded row and a right-padded row."""
    tokens = np.random.RandomState(seed).randint(3, vocab, (batch, length))
    mask = np.ones((batch, length), np.int32)
    mask[1, :9] = 0
    mask[2, -5:] = 0
    return tokens, mask


def _torch_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.float().numpy()


def _load(directory, **kwargs):
    config = load_config(directory)
    return config, load_params(directory, config, **kwargs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_transformers_on_padded_batches(tiny_llama, variant):
    hf, directory = tiny_llama(**VARIANTS[variant])
    config, params = _load(directory)
    tokens, mask = _batch()
    ours = np.asarray(jax.jit(Llama(config).apply)({"params": params}, tokens, mask))
    want = _torch_logits(hf, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(want[valid]).max() > 1.0  # logits large enough for 1e-4 to mean something
    np.testing.assert_allclose(ours[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_llama3_scaling_matters_in_that_test():
    """Guard: the llama3 variant above would fail if scaling were ignored (positions pass the original context)."""
    plain = LlamaConfig(96, 32, 64, 2, 4, 2, 8, rope_theta=500000.0)
    scaled = LlamaConfig(96, 32, 64, 2, 4, 2, 8, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16))
    tokens, mask = _batch()
    variables = init_variables(Llama(plain), jax.random.key(0))
    diff = jax.jit(Llama(plain).apply)(variables, tokens, mask) - jax.jit(Llama(scaled).apply)(variables, tokens, mask)
    assert np.abs(diff).max() > 1e-3


def test_padding_does_not_change_a_sequence(tiny_llama):
    _, directory = tiny_llama()
    config, params = _load(directory)
    tokens, mask = _batch()
    apply = jax.jit(Llama(config).apply)
    padded = np.asarray(apply({"params": params}, tokens, mask))[1, 9:]
    alone = np.asarray(apply({"params": params}, tokens[1:2, 9:]))[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("mixer", [False, True])
def test_fresh_adapters_leave_the_base_model_unchanged(tiny_llama, mixer):
    _, directory = tiny_llama()
    config, params = _load(directory)
    adapter = AdapterConfig(num_experts=4, rank=2, top_k=2, mixer=mixer)
    model = Llama(config, adapter=adapter, adapter_targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = init_variables(model, jax.random.key(1))["adapters"]
    tokens, mask = _batch()
    base = jax.jit(Llama(config).apply)({"params": params}, tokens, mask)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply({"params": params, "adapters": adapters}, tokens, mask), base, atol=1e-6)
    trained = jax.tree.map(lambda x: x + 0.05, adapters)
    assert np.abs(apply({"params": params, "adapters": trained}, tokens, mask) - base).max() > 1e-2


def test_adapter_tree_is_separate_and_preconditionable():
    """Only adapter leaves get gradients; every projection's stack pairs up under riemann_precond."""
    config = LlamaConfig(96, 32, 64, 3, 4, 2, 8)
    model = Llama(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2), adapter_targets=("q", "v", "down"))
    variables = init_variables(model, jax.random.key(0))
    adapters = variables["adapters"]
    assert jax.tree.map(jnp.shape, adapters["layers"]["attn"]["q_proj"]) == {
        "lora_a": (3, 4, 32, 2),
        "lora_b": (3, 4, 2, 32),
        "gate": (3, 32, 4),
    }
    assert set(adapters["layers"]["attn"]) == {"q_proj", "v_proj"} and set(adapters["layers"]["mlp"]) == {"down_proj"}
    tokens, mask = _batch(length=12)

    def loss(adapters):
        logits = model.apply({"params": variables["params"], "adapters": adapters}, tokens, mask)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    grads = jax.jit(jax.grad(loss))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    tx = optax.chain(riemann_precond(), optax.sgd(1e-2))
    updates, _ = jax.jit(tx.update)(grads, tx.init(adapters), adapters)
    assert not np.allclose(
        updates["layers"]["attn"]["q_proj"]["lora_a"], -1e-2 * grads["layers"]["attn"]["q_proj"]["lora_a"]
    )


@pytest.mark.parametrize("remat", [r for r in REMAT_CHOICES if r != "none"])
def test_remat_changes_neither_values_nor_gradients(remat):
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    adapter = AdapterConfig(num_experts=4, rank=2, top_k=2, strategy="sqrt_gate")
    plain, rematted = Llama(config, adapter=adapter), Llama(config, adapter=adapter, remat=remat)
    variables = init_variables(plain, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.02, variables["adapters"])
    tokens, mask = _batch(length=12)

    def loss(model):
        return lambda ad: jnp.mean(model.apply({"params": variables["params"], "adapters": ad}, tokens, mask) ** 2)

    want_loss, want = jax.jit(jax.value_and_grad(loss(plain)))(adapters)
    got_loss, got = jax.jit(jax.value_and_grad(loss(rematted)))(adapters)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize(
    "remat, per_layer",
    [
        ("full", ["f32[32]"]),  # the layer's input only
        ("save_qkv", ["f32[16]", "f32[16]", "f32[32]", "f32[32]"]),  # + q (4 heads x 8), k and v (2 heads x 8)
        ("save_attention", ["f32[32]", "f32[32]", "f32[32]"]),  # + the attention output and the MLP input
        ("offload_attention", ["f32<host>[32]", "f32<host>[32]", "f32[32]"]),  # the same two, in host memory
    ],
)
def test_named_remat_policies_keep_the_activations_they_name(remat, per_layer, capsys):
    """The residuals the backward pass keeps per layer of the scan, as ``jax.ad_checkpoint.print_saved_residuals``
    lists them: stacked ``(layers, B, T, features)``, here 2 layers of 3 rows of 12 tokens."""
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    model = Llama(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2), remat=remat)
    variables = init_variables(model, jax.random.key(0))
    tokens, mask = _batch(length=12)
    jax.ad_checkpoint.print_saved_residuals(
        lambda ad: jnp.mean(model.apply({"params": variables["params"], "adapters": ad}, tokens, mask)),
        variables["adapters"],
    )
    stacked = re.findall(r"(\w+(?:<host>)?)\[2,3,12,(\d+)\] output of scan", capsys.readouterr().out)
    assert sorted(f"{dtype}[{features}]" for dtype, features in stacked) == sorted(per_layer)


def test_kv_cache_decoding_equals_the_full_forward():
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    model = Llama(config, adapter=AdapterConfig(num_experts=3, rank=2, top_k=2))
    variables = init_variables(model, jax.random.key(0))
    variables["adapters"] = jax.tree.map(lambda x: x + 0.05, variables["adapters"])
    tokens, mask = _batch(length=16)
    mask[2] = 1  # decoding continues sequences: right padding is not a prompt layout
    apply = jax.jit(model.apply)
    full = np.asarray(apply(variables, tokens, mask))
    prefill = 10
    cache = KVCache.create(config, 3, 20)
    logits, cache = apply(variables, tokens[:, :prefill], mask[:, :prefill], cache=cache)
    np.testing.assert_allclose(logits[:, -1], full[:, prefill - 1], atol=1e-5)
    for t in range(prefill, 16):
        logits, cache = apply(variables, tokens[:, t : t + 1], mask[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache.index) == 16


def test_sharded_forward_equals_unsharded():
    """data x fsdp x tensor = 2 x 2 x 2 over 8 CPU devices, parameters placed by the logical rules."""
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    model = Llama(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2), adapter_targets=("q", "k", "v", "o"))
    variables = init_variables(model, jax.random.key(0))
    variables["adapters"] = jax.tree.map(lambda x: x + 0.05, variables["adapters"])
    tokens, mask = _batch(batch=4, length=16)
    want = np.asarray(jax.jit(model.apply)(variables, tokens, mask))

    mesh = make_mesh(2, 2, 2, devices=jax.devices("cpu")[:8])
    shardings = logical_shardings(abstract_variables(model), mesh)
    assert shardings["params"]["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["adapters"]["layers"]["attn"]["q_proj"]["lora_a"].spec == P(None, None, "fsdp", None)
    assert shardings["params"]["embedding"].spec == P("tensor", "fsdp")
    placed = jax.device_put(variables, shardings)
    batch = batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        forward = jax.jit(model.apply, out_shardings=jax.sharding.NamedSharding(mesh, P()))
        got = forward(placed, jax.device_put(tokens, batch), jax.device_put(mask, batch))
        hlo = forward.lower(placed, tokens, mask).compile().as_text()
    assert "all-gather" in hlo or "all-reduce" in hlo  # really partitioned
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_uneven_dimensions_stay_replicated():
    """A mesh axis that does not divide a dimension leaves it replicated on that axis (odd vocab and MLP here)."""
    config = LlamaConfig(95, 32, 63, 2, 4, 2, 8)
    mesh = make_mesh(2, 2, 2, devices=jax.devices("cpu")[:8])
    shardings = logical_shardings(abstract_variables(Llama(config)), mesh)["params"]
    assert shardings["embedding"].spec == P(None, "fsdp")
    assert shardings["layers"]["mlp"]["up_proj"]["kernel"].spec == P(None, "fsdp", None)
    assert shardings["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_compiled_size_does_not_grow_with_depth():
    sizes = {}
    for layers in (2, 12):
        model = Llama(LlamaConfig(96, 32, 64, layers, 4, 2, 8), adapter=AdapterConfig(num_experts=4, rank=2))
        variables = jax.eval_shape(lambda m=model: init_variables(m, jax.random.key(0)))
        sizes[layers] = len(jax.jit(model.apply).lower(variables, jnp.zeros((2, 8), jnp.int32)).as_text())
    assert sizes[12] < 1.05 * sizes[2]


def test_bfloat16_weights_and_activations_track_float32():
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    adapter = AdapterConfig(num_experts=4, rank=2, top_k=2)
    variables = init_variables(Llama(config, adapter=adapter), jax.random.key(0))
    low = Llama(config, adapter=adapter, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    low_vars = init_variables(low, jax.random.key(0))
    assert low_vars["params"]["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(low_vars["adapters"]))
    tokens, mask = _batch(length=12)
    want = jax.jit(Llama(config, adapter=adapter).apply)(variables, tokens, mask)
    got = jax.jit(low.apply)(
        {
            "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["params"]),
            "adapters": variables["adapters"],
        },
        tokens,
        mask,
    )
    assert got.dtype == jnp.float32
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_config_from_a_llama32_style_config_json():
    """Older files spell rope as rope_theta + rope_scaling; transformers normalises them, we read the result."""
    config = LlamaConfig.from_hf(
        {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 28,
            "num_attention_heads": 24,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
        }
    )
    assert config.rope_theta == 500000.0 and config.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert config.eos_token_ids == (128001, 128008, 128009) and config.num_kv_heads == 8
    assert LlamaConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor != 1 is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_configs_fail_clearly(overrides, message):
    good = LlamaConfig(96, 32, 64, 2, 4, 2, 8).to_hf().to_dict()
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({**good, **overrides})


def test_unknown_adapter_target_and_remat_fail_clearly():
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"adapter_targets='q,qkv' must be a non-empty subset of q, k"):
        Llama(config, adapter_targets=("q", "qkv"))
    with pytest.raises(ValueError, match="remat='some'"):
        Llama(config, remat="some")


def test_swiglu_backward_equals_autodiff_of_silu_times_up():
    rng = np.random.default_rng(3)
    gate, up = (jnp.asarray(rng.normal(size=(4, 9)) * 3, jnp.float32) for _ in range(2))

    def plain(g, u):
        return jnp.sum(jnp.sin(jax.nn.silu(g) * u))

    np.testing.assert_allclose(swiglu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6)
    got = jax.grad(lambda g, u: jnp.sum(jnp.sin(swiglu(g, u))), argnums=(0, 1))(gate, up)
    for g, w in zip(got, jax.grad(plain, argnums=(0, 1))(gate, up), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
