"""Batched autoregressive decoding with a KV cache: greedy, or temperature with nucleus (top-p) sampling.

Prompts are left-padded so that every row's next token goes into the same cache slot; the whole loop (prefill,
which projects only the last position to the vocabulary, then one token per step until ``max_new_tokens`` or every
row has emitted an end-of-sequence token) is one ``jax.jit`` program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moelora_jax.models.llama import KVCache, Llama, LlamaConfig


def end_ids(config: LlamaConfig, tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end a generated row: the model's end ids (``config.json`` and ``generation_config.json``)
    and the tokenizer's end token, the one training appends to each response (Qwen2.5-Instruct: ``<|im_end|>``)."""
    ends = [*config.eos_token_ids, tokenizer.eos_token_id]
    return tuple(dict.fromkeys(i for i in ends if i is not None))


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Next tokens ``(B,)`` from ``logits: (B, V)``.

    ``temperature == 0`` is greedy (argmax). Otherwise tokens are drawn from ``softmax(logits / temperature)``
    restricted to the smallest set of most likely tokens whose probability reaches ``top_p`` (the top token always
    stays), renormalised.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1].")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key.")
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_ids", "temperature", "top_p"))
def generate(
    model: Llama,
    variables: dict[str, Any],
    prompt: jax.Array,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continue left-padded prompts.

    Args:
      model, variables: the model and its ``{"params", "adapters"?}``.
      prompt: ``(B, P)`` token ids, left-padded; ``prompt_mask: (B, P)`` 1 on real tokens.
      max_new_tokens: length of the output; eos_ids: tokens that end a row; pad_id fills a row after its end.
      temperature, top_p, rng: see ``sample_logits`` (greedy by default).

    Returns:
      ``(B, max_new_tokens)`` int32: each row's new tokens up to and including its first end token, then ``pad_id``.
    """
    batch, prompt_len = prompt.shape
    cache = KVCache.create(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    rng = jax.random.key(0) if rng is None else rng
    eos = jnp.asarray(eos_ids, jnp.int32)

    def step(logits, rng):
        return sample_logits(logits[:, -1], rng, temperature, top_p)

    logits, cache = model.apply(variables, prompt, prompt_mask, cache=cache, output="last_logits")
    rng, sub = jax.random.split(rng)
    token = step(logits, sub)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)

    def cond(state):
        i, *_, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, token, cache, rng, done = state
        logits, cache = model.apply(variables, token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
        rng, sub = jax.random.split(rng)
        token = jnp.where(done, pad_id, step(logits, sub))
        return i + 1, out.at[:, i].set(token), token, cache, rng, done | jnp.isin(token, eos)

    _, out, *_ = jax.lax.while_loop(cond, body, (jnp.asarray(1), out, token, cache, rng, done))
    return out
