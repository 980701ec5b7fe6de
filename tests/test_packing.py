"""Packed rows: the layout, attention that never crosses examples, and losses and gradients equal to unpacked rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moelora_jax import AdapterConfig
from moelora_jax.data.encoding import Encoded, Layout, collate, first_fit_decreasing, pack, targets_bound
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables, segment_positions
from moelora_jax.training.trainer import batch_loss

CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
ADAPTER = AdapterConfig(num_experts=4, rank=2, top_k=2, alpha=4.0)


def _examples(lengths, seed=0, targets=3):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        loss_mask = np.zeros(n, bool)
        loss_mask[-targets:] = True
        out.append(Encoded(rng.integers(3, 64, n).astype(np.int32), loss_mask))
    return out


def test_first_fit_decreasing_fills_the_first_row_with_room():
    assert first_fit_decreasing([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]  # 5, then 4 (new row), 3 -> row 0, 2 -> row 1
    assert first_fit_decreasing([2, 2, 2], 8) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="an example of 9 tokens does not fit a packed row of 8"):
        first_fit_decreasing([9], 8)


def test_pack_keeps_each_example_whole_with_its_own_positions_and_targets():
    examples = _examples([5, 3, 4, 2])
    batch = pack(examples, 8, pad_id=0, length_bucket=4, rows_multiple=4, targets_width=6)
    assert batch["tokens"].shape == (4, 8)  # 2 rows of up to 8 tokens, rounded up to 4 rows
    np.testing.assert_array_equal(
        batch["segment_ids"], [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2, *[[0] * 8] * 2]
    )
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(batch["tokens"][0], np.concatenate([examples[0].tokens, examples[1].tokens]))
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
    # Example 1 (3 tokens, all targets) loses its first target: nothing of its own precedes it.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(batch["targets"][0], [1, 2, 3, 5, 6, -1])
    np.testing.assert_array_equal(batch["targets"][2], [-1] * 6)
    assert pack(_examples([3, 2]), 16, 0, length_bucket=4)["tokens"].shape == (1, 8)  # 5 tokens -> a row of 8


def test_targets_bound_counts_the_examples_a_row_can_hold():
    examples = _examples([4, 4, 10], targets=2) + _examples([6], targets=5)
    assert targets_bound(examples, 7) == 5  # one example per row at most: the most targets of one
    assert targets_bound(examples, 10) == 7  # the two 4-token examples fit together: the two most, 5 + 2
    assert Layout.fitted(examples, 10, pack_length=10).targets_width == 8  # rounded up to a multiple of 8


def test_segment_positions_restart_at_each_example():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]])


def _reference_attention(q, k, v, mask):
    """Grouped-query attention written out: ``q: (B, T, N, H)``, ``k, v: (B, S, K, H)``, ``mask: (B, T, S)``."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def test_attention_matches_a_written_out_reference_with_its_gradients():
    """The model's attention call (``jax.nn.dot_product_attention``, xla), on a segment mask, against the formula."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 7, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    mask = (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((7, 7), bool))
    mask &= (segments > 0)[:, None, :]

    def ours(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")

    real = (segments > 0)[:, :, None, None]  # padding queries attend to nothing; their output is never used
    np.testing.assert_allclose(ours(q, k, v) * real, _reference_attention(q, k, v, mask) * real, atol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum((ours(*a) * real) ** 2), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum((_reference_attention(*a, mask) * real) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def _model_and_variables():
    model = Llama(CONFIG, adapter=ADAPTER)
    variables = init_variables(model, jax.random.key(0))
    variables["params"]["lm_head"] = variables["params"]["lm_head"] * 25.0
    variables["adapters"] = jax.tree.map(lambda x: x + 0.05, variables["adapters"])  # B != 0: adapters matter
    return model, variables


def test_packed_rows_give_each_example_its_own_logits():
    model, variables = _model_and_variables()
    examples = _examples([5, 3, 4, 2], seed=1)
    packed = pack(examples, 8, pad_id=0)
    logits = model.apply(variables, packed["tokens"], segment_ids=jnp.asarray(packed["segment_ids"]))
    for row, members in enumerate(first_fit_decreasing([5, 3, 4, 2], 8)):
        start = 0
        for i in members:
            alone = model.apply(variables, examples[i].tokens[None])[0]
            n = len(examples[i].tokens)
            np.testing.assert_allclose(logits[row, start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_packed_batch_equals_unpacked_per_example_losses_and_adapter_gradients():
    model, variables = _model_and_variables()
    examples = _examples([9, 6, 7, 4, 5], seed=2)
    layouts = {
        "unpacked": Layout.fitted(examples, 12),
        "packed": Layout.fitted(examples, 12, pack_length=16, length_bucket=4, rows_multiple=2),
    }

    def per_example(layout):
        """Each example's summed NLL, from the whole batch with every other example's loss mask cleared."""
        out = []
        for i in range(len(examples)):
            alone = [e if j == i else Encoded(e.tokens, np.zeros_like(e.loss_mask)) for j, e in enumerate(examples)]
            out.append(float(batch_loss(model, variables, layout(alone, 0))[0]))
        return out

    def grads(layout):
        batch = layout(examples, 0)
        return jax.grad(lambda ad: batch_loss(model, {**variables, "adapters": ad}, batch)[0])(variables["adapters"])

    assert layouts["packed"](examples, 0)["tokens"].shape[0] < len(examples)  # rows really hold several examples
    np.testing.assert_allclose(per_example(layouts["packed"]), per_example(layouts["unpacked"]), rtol=1e-5)
    jax.tree.map(  # gradients of size ~1 summed in another order
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        grads(layouts["packed"]),
        grads(layouts["unpacked"]),
    )
    np.testing.assert_array_equal(collate(examples, 12, 0)["tokens"], layouts["unpacked"](examples, 0)["tokens"])
