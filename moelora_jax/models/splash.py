"""Causal self-attention by TPU's splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``).

The kernel never forms the ``(T, S)`` score matrix in HBM: it walks ``block x block`` tiles of a causal mask
(skipping the tiles above the diagonal) with an online softmax, and keeps a ``(T,)`` log-sum-exp for the backward
pass. Instead of a dense ``(B, T, S)`` mask it takes per-token segment ids: a token attends to the tokens at or
before it with its own id. Real tokens carry their packed segment (1 for an unpacked row) and padding the id 0, so
real tokens never see padding and a padding token sees only padding (itself at least, so no softmax row is empty);
that is the XLA path's mask on every real token. Rows are padded to a multiple of the block with id -1.

Grouped-query attention runs the kernel's multi-query form once per key/value head, over the query heads that share
it. Under a mesh (``jax.set_mesh``) the kernel runs per device in a ``shard_map``, each on its own rows and heads,
as the logical-axis rules place them. On a TPU the kernel is compiled by Mosaic; elsewhere (the CPU tests) Pallas
interprets it, through ``jax.lax.platform_dependent``, so both compute the same function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from moelora_jax.errors import UserError
from moelora_jax.parallel.sharding import logical_spec

BLOCK = 512
"""The kernel's tile along both sequences (MaxText's default); rows shorter than it use one tile of their length,
rounded up to a multiple of 128 (the TPU's lane width)."""
LANES = 128


def _block(length: int) -> int:
    return min(BLOCK, -(-length // LANES) * LANES)


def _kernel(length: int, group: int, block: int, interpret: bool) -> splash.SplashAttentionKernel:
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(group)])
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, interpret: bool) -> jax.Array:
    """One device's rows and heads: ``q: (B, T, H, D)``, ``k, v: (B, T, K, D)``, ``segments: (B, T)``."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise UserError(
            f"model.attention=splash: {heads} query heads per device do not group over {kv_heads} key/value heads; "
            "shard mesh.tensor over a divisor of the key/value heads"
        )
    block = _block(length)
    padded = -(-length // block) * block
    pad = ((0, 0), (0, padded - length))
    segments = jnp.pad(segments, pad, constant_values=-1)
    q, k, v = (jnp.pad(x, (*pad, (0, 0), (0, 0))) for x in (q, k, v))
    # (B, K, G, T, D) queries against (B, K, T, D) keys and values
    q = (q * (dim**-0.5)).reshape(batch, padded, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    kernel = _kernel(padded, heads // kv_heads, block, interpret)

    def one_head(q, k, v, ids):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))

    per_kv_head = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head)(q, k, v, segments)  # (B, K, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, heads, dim)[:, :length]


def _on_this_platform(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        segments,
        tpu=functools.partial(_local, interpret=False),
        default=functools.partial(_local, interpret=True),
    )


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """Causal attention within segments: ``q: (B, T, H, D)``, ``k, v: (B, T, K, D)`` (``K`` divides ``H``),
    ``segments: (B, T)`` int (0: padding) -> ``(B, T, H, D)`` in ``q``'s dtype, ``softmax(q k^T / sqrt(D)) v`` over
    the keys at or before each query in its segment."""
    q_spec = logical_spec(("batch", "length", "act_heads", "head_dim"), q.shape)
    if q_spec is None:
        return _on_this_platform(q, k, v, segments)
    kv_spec = logical_spec(("batch", "length", "act_kv_heads", "head_dim"), k.shape)
    if q_spec[1] is not None or q_spec[2] != kv_spec[2]:
        raise UserError(
            f"model.attention=splash runs on whole rows and on query heads grouped with their key/value heads, but "
            f"the mesh places queries as {q_spec} and keys as {kv_spec}: give mesh.tensor a size that divides the "
            "key/value heads, or use model.attention=xla"
        )
    return jax.shard_map(
        _on_this_platform,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segments)
