"""``model.attention=splash``: TPU's splash kernel, run here by Pallas' interpreter, against a NumPy softmax and
against the model's XLA attention on causal, left/right-padded and packed batches, alone and under an 8-device
mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moelora_jax import AdapterConfig
from moelora_jax.errors import UserError
from moelora_jax.models.llama import Llama, LlamaConfig, abstract_variables, init_variables
from moelora_jax.models.splash import splash_attention
from moelora_jax.parallel.sharding import DEFAULT_RULES, batch_sharding, logical_shardings, make_mesh

CONFIG = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
ADAPTER = AdapterConfig(num_experts=4, rank=2, top_k=2, strategy="sqrt_gate")


def numpy_attention(q, k, v, segments):
    """``softmax(q k^T / sqrt(D)) v`` over the keys at or before each query with its segment id, in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    heads, kv_heads, length = q.shape[2], k.shape[2], q.shape[1]
    k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    allowed = np.tril(np.ones((length, length), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("length", [40, 130, 520])  # one tile of 128, one of 256, 2 x 2 tiles of 512 (padded)
def test_the_kernel_is_causal_attention_within_segments(length):
    rng = np.random.default_rng(length)
    q = rng.normal(size=(2, length, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, length, 2, 8)).astype(np.float32) for _ in range(2))
    segments = np.zeros((2, length), np.int32)
    segments[0, :] = np.repeat([1, 2, 3], -(-length // 3))[:length]  # three packed examples
    segments[1, 7:] = 1  # left padding
    got = jax.jit(splash_attention)(q, k, v, segments)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, segments), atol=2e-6)


def _batch(kind: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Tokens, the model's keyword arguments and which tokens are real, for a batch of ``kind``."""
    tokens = np.random.RandomState(0).randint(3, 96, (3, 40))
    if kind == "causal":
        mask = np.ones((3, 40), np.int32)
        return tokens, {"attention_mask": mask}, mask > 0
    if kind == "padded":  # a full row, a left-padded one, a right-padded one
        mask = np.ones((3, 40), np.int32)
        mask[1, :9] = mask[2, -5:] = 0
        return tokens, {"attention_mask": mask}, mask > 0
    segments = np.zeros((3, 40), np.int32)  # packed rows, ending in padding
    segments[0, :15], segments[0, 15:33] = 1, 2
    segments[1, 4:] = 1
    segments[2, :20], segments[2, 20:36] = 1, 3
    return tokens, {"segment_ids": segments}, segments > 0


@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
def test_splash_gives_the_xla_paths_outputs_loss_and_gradients(kind):
    tokens, kwargs, real = _batch(kind)
    variables = init_variables(Llama(CONFIG, adapter=ADAPTER), jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.02, variables["adapters"])

    def loss(attention_impl):
        model = Llama(CONFIG, adapter=ADAPTER, attention_impl=attention_impl)

        def of(ad):
            logits = model.apply({"params": variables["params"], "adapters": ad}, tokens, **kwargs)
            return jnp.mean(jnp.where(real[..., None], logits, 0.0) ** 2), logits

        return jax.jit(jax.value_and_grad(of, has_aux=True))(adapters)

    (want_loss, want_logits), want = loss("xla")
    (got_loss, got_logits), got = loss("splash")
    np.testing.assert_allclose(np.asarray(got_logits)[real], np.asarray(want_logits)[real], atol=1e-5)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), got, want)


def test_splash_under_a_mesh_runs_per_device_and_equals_one_device():
    """data x fsdp x tensor = 2 x 2 x 2: the kernel runs in a shard_map on each device's rows and heads."""
    tokens, kwargs, _ = _batch("packed")
    tokens, segments = np.concatenate([tokens, tokens[:1]]), np.concatenate([kwargs["segment_ids"]] * 2)[:4]
    model = Llama(CONFIG, adapter=ADAPTER, attention_impl="splash")
    variables = init_variables(model, jax.random.key(0))
    want = np.asarray(jax.jit(Llama(CONFIG, adapter=ADAPTER).apply)(variables, tokens, segment_ids=segments))

    mesh = make_mesh(2, 2, 2, devices=jax.devices("cpu")[:8])
    placed = jax.device_put(variables, logical_shardings(abstract_variables(model), mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        forward = jax.jit(lambda v, t, s: model.apply(v, t, segment_ids=s), out_shardings=NamedSharding(mesh, P()))
        args = placed, jax.device_put(tokens, batch_sharding(mesh)), jax.device_put(segments, batch_sharding(mesh))
        got = forward(*args)
        assert "shard_map" in str(forward.trace(*args).jaxpr)
    np.testing.assert_allclose(np.asarray(got)[segments > 0], want[segments > 0], atol=1e-5)


def test_a_mesh_that_splits_a_query_group_from_its_key_value_head_is_refused():
    one_kv_head = LlamaConfig(96, 32, 64, 2, 4, 1, 8)  # tensor=2 shards the 4 query heads, not the 1 kv head
    model = Llama(one_kv_head, attention_impl="splash")
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    mesh = make_mesh(4, 1, 2, devices=jax.devices("cpu")[:8])
    refused = pytest.raises(UserError, match=r"model.attention=splash runs on whole rows .* mesh.tensor")
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES), refused:
        jax.eval_shape(model.apply, variables, jnp.ones((4, 16), jnp.int32))
