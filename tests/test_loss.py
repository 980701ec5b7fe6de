"""The output head at the loss targets only, chunked, with a fused backward, against the full-logits loss."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from moelora_jax import AdapterConfig
from moelora_jax.data.encoding import target_positions
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables, output_head
from moelora_jax.models.loss import chunk_size, head_loss
from moelora_jax.parallel.hlo_stats import collectives
from moelora_jax.parallel.sharding import DEFAULT_RULES, logical_shardings, make_mesh
from moelora_jax.training.trainer import batch_loss


def full_logits_loss(logits, tokens, loss_mask):
    """The plain formula: log-softmax over every position's logits, NLL of each next token where it is a target."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _problem(seed=0, batch=3, length=13, dim=8, vocab=50):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    loss_mask = rng.random((batch, length)) < 0.4
    loss_mask[0] = False  # a row without targets
    return hidden, head, tokens, jnp.asarray(loss_mask)


class HeadLossTest(chex.TestCase):
    """``head_loss`` under ``jax.jit`` and eagerly (``chex.variants``)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        gathered=(True, False),
        max_logits=(2**30, 2 * 3 * 50, 3 * 50),  # chunks of 9, 2, 1
        cap=(None, 2.0),  # Gemma 2's soft-capped logits (2: binding on these, of scale ~3)
    )
    def test_equals_the_full_logits_loss_with_its_gradient(self, gathered, max_logits, cap):
        hidden, head, tokens, loss_mask = _problem()
        targets = jnp.asarray(target_positions(np.asarray(loss_mask), 9)) if gathered else None
        loss = self.variant(functools.partial(head_loss, max_logits=max_logits, cap=cap))

        def ours(h):
            return loss(h, head, tokens, loss_mask, targets)[0]

        def reference(h):
            logits = h @ head
            return full_logits_loss(logits if cap is None else cap * jnp.tanh(logits / cap), tokens, loss_mask)[0]

        np.testing.assert_allclose(ours(hidden), reference(hidden), rtol=1e-6)
        np.testing.assert_allclose(jax.grad(ours)(hidden), jax.grad(reference)(hidden), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(  # a cotangent other than 1 scales the fused gradient
            jax.grad(lambda h: 2.5 * ours(h))(hidden), 2.5 * jax.grad(reference)(hidden), rtol=1e-5, atol=1e-6
        )
        count = loss(hidden, head, tokens, loss_mask, targets)[1]
        want = float(full_logits_loss(hidden @ head, tokens, loss_mask)[1])
        assert float(count) == want == float(loss_mask[:, 1:].sum())

    @chex.variants(with_jit=True, without_jit=True)
    def test_asserts_shapes_and_integer_tokens(self):
        hidden, head, tokens, loss_mask = _problem()
        targets = jnp.asarray(target_positions(np.asarray(loss_mask), 9))
        loss = self.variant(head_loss)
        bad = [
            ((hidden[0], head, tokens, loss_mask, targets), r"rank 2 \(shape \(13, 8\)\) but expected 3"),
            ((hidden, head.T, tokens, loss_mask, targets), r"shape \(50, 8\) but expected \(8, None\)"),
            ((hidden, head, tokens[:, 1:], loss_mask, targets), r"shape \(3, 12\) but expected \(3, 13\)"),
            ((hidden, head, tokens, loss_mask[:2], targets), r"shape \(2, 13\) but expected \(3, 13\)"),
            ((hidden, head, tokens, loss_mask, targets[0]), r"shape \(9,\) but expected \(3, None\)"),
            ((hidden, head, tokens.astype(jnp.float32), loss_mask, targets), "type float32 but expected"),
        ]
        for args, message in bad:
            with self.assertRaisesRegex(AssertionError, message):
                loss(*args)


def test_under_fsdp_the_head_is_gathered_once_not_per_chunk_and_the_loss_is_unchanged():
    """8 chips, the head's embedding axis sharded over all of them (fsdp) and the batch too: the loss and its
    gradient equal the unsharded ones, and the step all-gathers the head once, not once per chunk (32 here)."""
    hidden, head, tokens, loss_mask = _problem(batch=8, length=33, dim=16, vocab=4096)
    max_logits = 8 * 1 * 4096  # one position per row per chunk: 32 chunks

    def loss(h, w):
        return head_loss(h, w, tokens, loss_mask, max_logits=max_logits)[0]

    step = jax.jit(jax.value_and_grad(loss))
    want, want_grad = step(hidden, head)
    mesh = make_mesh(1, 8, 1, devices=jax.devices("cpu")[:8])
    boxed = nn.LogicallyPartitioned(head, ("embed", "vocab"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded_head = jax.device_put(head, logical_shardings(boxed, mesh))
        sharded_hidden = jax.device_put(hidden, jax.sharding.NamedSharding(mesh, jax.P("fsdp")))
        got, got_grad = step(sharded_hidden, sharded_head)
        text = step.lower(sharded_hidden, sharded_head).compile().as_text()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    head_bytes = head.size * head.dtype.itemsize
    assert 0 < collectives(text)["all-gather"]["bytes"] < 2 * head_bytes


def test_uniform_logits_cost_log_vocab_per_target_only():
    hidden, head, tokens, _ = _problem(batch=1, length=3)
    loss_mask = jnp.array([[True, False, True]])  # the first token has no predecessor: never a target
    total, count = head_loss(jnp.zeros_like(hidden), head, tokens, loss_mask)
    assert float(count) == 1.0 and float(total) == pytest.approx(np.log(50.0))


def test_chunks_are_equal_and_bounded():
    assert chunk_size(4, 127, 49152, 2**23) == 32  # 4 chunks of 32 cover 127 with one padded slot
    assert chunk_size(4, 8, 49152, 2**23) == 8  # a few targets: one chunk
    assert 4 * chunk_size(4, 1000, 49152, 2**23) * 49152 <= 2**23


def test_targets_that_do_not_fit_their_width_fail():
    with pytest.raises(ValueError, match="row 0 has 2 loss targets, more than the batch's width of 1"):
        target_positions(np.array([[False, True, True]]), 1)


def test_model_outputs_agree_and_batch_loss_matches_full_logits():
    config = LlamaConfig(64, 32, 64, 2, 4, 2, 8, tie_word_embeddings=True)
    model = Llama(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2, alpha=4.0))
    variables = init_variables(model, jax.random.key(0))
    variables["adapters"] = jax.tree.map(lambda x: x + 0.05, variables["adapters"])  # B != 0
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 10)), jnp.int32)
    mask = jnp.asarray([[0, 0] + [1] * 8, [1] * 10], jnp.int32)
    loss_mask = np.zeros((2, 10), bool)
    loss_mask[:, -3:] = True
    logits = model.apply(variables, tokens, mask)
    hidden = model.apply(variables, tokens, mask, output="hidden")
    np.testing.assert_allclose(hidden @ output_head(variables["params"], config), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply(variables, tokens, mask, output="last_logits"), logits[:, -1:], atol=1e-5)
    with pytest.raises(ValueError, match="output='probs' must be"):
        model.apply(variables, tokens, mask, output="probs")

    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": jnp.asarray(loss_mask)}
    gathered = {**batch, "targets": jnp.asarray(target_positions(loss_mask, 8))}

    def ours(adapters, b):
        return batch_loss(model, {"params": variables["params"], "adapters": adapters}, b)[0]

    def reference(adapters):
        out = model.apply({"params": variables["params"], "adapters": adapters}, tokens, mask)
        return full_logits_loss(out, tokens, batch["loss_mask"])[0]

    want, want_grads = jax.value_and_grad(reference)(variables["adapters"])
    for b in (batch, gathered):
        got, grads = jax.value_and_grad(ours)(variables["adapters"], b)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)
