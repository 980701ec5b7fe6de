"""Next-token cross-entropy with the output head applied only where the loss is, in chunks, with a fused backward.

For final hidden states ``h: (B, T, d)``, the head ``W: (d, V)`` and, per row, the ``K`` positions ``t`` whose next
token ``y = tokens[t + 1]`` is a target (weight ``w = 1``; ``w = 0`` on padding slots)::

    L = sum_{b,k} w_bk * (logsumexp(z_bk) - z_bk[y_bk]),      z_bk = h[b, t_bk] @ W        (float32)
    dL/dh[b, t_bk] = w_bk * (softmax(z_bk) - onehot(y_bk)) @ W^T

(with Gemma 2's soft cap, ``z = cap tanh(h W / cap)`` and the bracket is also scaled by ``1 - (z / cap)^2``).

Only the ``B x K`` target rows of ``h`` are gathered and projected, ``chunk`` positions per row at a time, so the
``(targets x vocab)`` logits never exist whole. Under differentiation the forward pass computes ``dL/dh`` as it goes
(a ``custom_vjp``): the backward only scales it, so no logits are kept for it nor recomputed. The frozen head gets no
gradient. Targets are typically 4-8% of positions (a short answer after a long prompt); without ``targets`` every
position is one (weighted by the loss mask), which is the full head, computed the same way.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

from moelora_jax.data.encoding import round_up
from moelora_jax.models.llama import lm_head
from moelora_jax.parallel.sharding import constrain

MAX_CHUNK_LOGITS = 2**23  # float32 logits materialised per chunk (32 MiB)


def _chunk_nll(h: jax.Array, head: jax.Array, labels: jax.Array, weights: jax.Array, grad: bool, cap: float | None):
    """Summed weighted NLL of one chunk (``h: (B, c, d)``), and ``dL/dh`` of that sum when ``grad``. Logits
    soft-capped at ``cap``, ``z = cap tanh(r / cap)``, pass ``dL/dr = dL/dz (1 - (z / cap)^2)`` back."""
    logits = lm_head(h, head, cap)  # (B, c, V)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    total = jnp.sum(weights * (lse - picked))
    if not grad:
        return total, None
    probs = jnp.exp(logits - lse[..., None])
    dlogits = (probs - jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)) * weights[..., None]
    if cap is not None:
        dlogits = dlogits * (1 - jnp.square(logits / cap))
    return total, jnp.dot(dlogits.astype(h.dtype), head.astype(h.dtype).T, preferred_element_type=jnp.float32)


def _chunked(h, head, labels, weights, chunk: int, grad: bool, cap: float | None):
    """``_chunk_nll`` scanned over ``K / chunk`` chunks of ``h: (B, K, d)`` (``K`` a multiple of ``chunk``)."""
    batch, width, dim = h.shape
    n = width // chunk

    def split(x):
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)

    def body(total, xs):
        h_chunk, labels_chunk, weights_chunk = xs
        part, dh = _chunk_nll(h_chunk, head, labels_chunk, weights_chunk, grad, cap)
        return total + part, dh

    total, dh = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(h), split(labels), split(weights)))
    if grad:
        dh = jnp.moveaxis(dh, 0, 1).reshape(batch, width, dim)
    return total, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_nll(h, head, labels, weights, chunk, cap):
    return _chunked(h, head, labels, weights, chunk, False, cap)[0]


def _fused_nll_fwd(h, head, labels, weights, chunk, cap):
    total, dh = _chunked(h, head, labels, weights, chunk, True, cap)
    return total, dh.astype(h.dtype)


def _fused_nll_bwd(chunk, cap, dh, g):
    return g.astype(dh.dtype) * dh, None, None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def chunk_size(rows: int, width: int, vocab: int, max_logits: int = MAX_CHUNK_LOGITS) -> int:
    """Positions per row per chunk: as few equal chunks of ``width`` as keep ``rows x chunk x vocab`` within
    ``max_logits`` (or one position per row, if even that is more)."""
    most = max(1, max_logits // (rows * vocab))
    return math.ceil(width / math.ceil(width / most))


def head_loss(
    hidden: jax.Array,
    head: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    targets: jax.Array | None = None,
    max_logits: int = MAX_CHUNK_LOGITS,
    cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL over the targets, and their count.

    Args:
      hidden: ``(B, T, d)`` final-normed hidden states (``Llama(..., output="hidden")``).
      head: ``(d, V)`` output projection (:func:`~moelora_jax.models.llama.output_head`).
      tokens, loss_mask: ``(B, T)``; ``loss_mask[b, t]`` marks ``tokens[b, t]`` as a target of position ``t - 1``.
      targets: ``(B, K)`` int positions ``t`` whose next token is a target, ``-1`` for unused slots
        (:func:`~moelora_jax.data.encoding.target_positions`); None: every position (the full head).
      max_logits: float32 logits per chunk.
      cap: the logits' soft cap (a config's ``final_logit_softcap``; Gemma 2), or None.

    Shapes and integer dtypes are asserted (chex, at trace time).
    """
    chex.assert_rank(hidden, 3)
    batch, length, dim = hidden.shape
    chex.assert_shape(head, (dim, None))
    chex.assert_shape([tokens, loss_mask], (batch, length))
    chex.assert_type(tokens, int)
    if targets is None:
        targets = jnp.broadcast_to(jnp.arange(length - 1, dtype=jnp.int32), (batch, length - 1))
    else:
        chex.assert_shape(targets, (batch, None))
        chex.assert_type(targets, int)
    width = targets.shape[1]
    chunk = chunk_size(batch, width, head.shape[1], max_logits)
    targets = jnp.pad(targets, ((0, 0), (0, round_up(width, chunk) - width)), constant_values=-1)
    position = jnp.clip(targets, 0, length - 2)
    labels = jnp.take_along_axis(tokens, position + 1, axis=1)
    weights = ((targets >= 0) & jnp.take_along_axis(loss_mask.astype(bool), position + 1, axis=1)).astype(jnp.float32)
    gathered = constrain(jnp.take_along_axis(hidden, position[..., None], axis=1), ("batch", "length", "act_embed"))
    # the head whole on each chip (vocabulary split only by tensor parallelism) before the chunk loop: left to the
    # partitioner, it is gathered in every chunk, or each chunk's logits are
    head = constrain(head, ("act_embed", "act_vocab"))
    return _fused_nll(gathered, head, labels, weights, chunk, cap), jnp.sum(weights)
