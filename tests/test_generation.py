"""Decoding: the sampler's distributions, and batched cached generation against transformers' ``generate``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moelora_jax import AdapterConfig
from moelora_jax.models.generation import generate, sample_logits
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.models.pretrained import load_config, load_params

torch = pytest.importorskip("torch")


def test_greedy_and_tiny_top_p_take_the_argmax():
    logits = jax.random.normal(jax.random.key(0), (16, 50))
    want = np.argmax(logits, -1)
    np.testing.assert_array_equal(sample_logits(logits, None), want)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1), temperature=1.0, top_p=1e-6), want)


def test_temperature_and_top_p_sample_the_right_distribution():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)

    def freqs(temperature, top_p):
        tokens = jax.vmap(lambda k: sample_logits(logits[None], k, temperature, top_p)[0])(keys)
        return np.bincount(np.asarray(tokens), minlength=4) / draws

    np.testing.assert_allclose(freqs(1.0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    hot = np.exp(np.log([0.5, 0.3, 0.15, 0.05]) / 2.0)
    np.testing.assert_allclose(freqs(2.0, 1.0), hot / hot.sum(), atol=0.015)
    # nucleus 0.7: {0.5, 0.3} reaches it; renormalised to 5/8, 3/8, the tail never drawn
    np.testing.assert_allclose(freqs(1.0, 0.7), [0.625, 0.375, 0.0, 0.0], atol=0.015)


def test_bad_sampling_options_fail_clearly():
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(jnp.zeros((1, 4)), jax.random.key(0), 1.0, 0.0)
    with pytest.raises(ValueError, match="needs an rng"):
        sample_logits(jnp.zeros((1, 4)), None, 1.0)


def _prompts():
    tokens = np.random.RandomState(3).randint(3, 96, (3, 9))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return tokens * mask, mask


def test_greedy_generation_equals_transformers_generate_with_eos_stops(tiny_llama):
    hf, directory = tiny_llama(seed=1)
    config = load_config(directory)
    params = load_params(directory, config)
    tokens, mask = _prompts()
    with torch.no_grad():
        free = hf.generate(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=12, do_sample=False
        ).numpy()[:, 9:]
    eos = int(free[0, 4])  # a token row 0 emits mid-way, so that at least one row stops early
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        ).numpy()[:, 9:]
    got = np.asarray(
        generate(Llama(config), {"params": params}, tokens, mask, max_new_tokens=12, eos_ids=(eos,), pad_id=0)
    )
    assert eos in got[0] and got[0, -1] == 0
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert np.all(got[:, want.shape[1] :] == 0)


def test_generation_with_adapters_equals_uncached_greedy_decoding():
    config = LlamaConfig(96, 32, 64, 2, 4, 2, 8)
    model = Llama(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2))
    variables = init_variables(model, jax.random.key(0))
    variables["adapters"] = jax.tree.map(lambda x: x + 0.1, variables["adapters"])
    tokens, mask = _prompts()
    got = np.asarray(generate(model, variables, tokens, mask, max_new_tokens=4, eos_ids=(), pad_id=0))
    apply = jax.jit(model.apply)
    seq, seq_mask = tokens, mask
    for step in range(4):
        next_token = np.argmax(apply(variables, seq, seq_mask)[:, -1], -1)
        np.testing.assert_array_equal(got[:, step], next_token)
        seq = np.concatenate([seq, next_token[:, None]], 1)
        seq_mask = np.concatenate([seq_mask, np.ones((3, 1), mask.dtype)], 1)
