"""Matmul FLOPs and collectives read from compiled HLO, every loop counted as often as it runs, against closed
forms of the programs compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moelora_jax.hlo_stats import collectives, matmul_flops


def _hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


@pytest.mark.parametrize("unroll", [1, 2])
def test_the_flops_of_nested_scans_count_every_iteration(unroll):
    micro, layers, rows, width = 3, 4, 5, 8

    def loss(w, x):  # micro-batches around a layer stack, as the train step nests them
        def micro_batch(total, xs):
            def layer(h, wi):
                return jnp.tanh(h @ wi), None

            h, _ = jax.lax.scan(layer, xs, w, unroll=unroll)
            return total + h.sum(), None

        return jax.lax.scan(micro_batch, 0.0, x)[0]

    w, x = jnp.ones((layers, width, width)) / width, jnp.ones((micro, rows, width))
    one_matmul = 2 * rows * width * width
    flops, unknown = matmul_flops(_hlo(jax.grad(loss), w, x))
    # forward h @ w, then the gradients of h and of w: three matmuls per layer and micro-batch
    assert (flops, unknown) == (3 * micro * layers * one_matmul, 0)
    assert jax.jit(jax.grad(loss)).lower(w, x).compile().cost_analysis()["flops"] < flops  # XLA's counts bodies once


def test_the_flops_of_a_batched_dot_and_a_convolution_are_their_closed_forms():
    a, b = jnp.ones((6, 5, 7)), jnp.ones((6, 7, 3))
    assert matmul_flops(_hlo(jnp.matmul, a, b))[0] == 2 * 6 * 5 * 3 * 7
    image, kernel = jnp.ones((2, 4, 9, 9)), jnp.ones((8, 4, 3, 3))  # NCHW, OIHW
    conv = jax.lax.conv(image, kernel, (1, 1), "VALID")  # (2, 8, 7, 7)
    assert matmul_flops(_hlo(lambda i, k: jax.lax.conv(i, k, (1, 1), "VALID"), image, kernel))[0] == (
        2 * conv.size * 4 * 3 * 3
    )


def test_collectives_inside_a_loop_are_counted_per_iteration_with_their_bytes():
    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices("cpu")[:8])
    steps, width = 5, 16

    def summed(x):
        def body(carry, _):
            return jax.lax.psum(carry * 2.0, "x"), None

        return jax.lax.scan(body, x, None, length=steps)[0]

    f = jax.shard_map(summed, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"), check_vma=False)
    x = jax.device_put(np.ones((8, width), np.float32), NamedSharding(mesh, PartitionSpec("x")))
    found = collectives(_hlo(f, x))
    assert found == {"all-reduce": {"count": steps, "bytes": steps * width * 4}}
    replicated = NamedSharding(mesh, PartitionSpec())
    gathered = collectives(jax.jit(lambda v: v * 2, out_shardings=replicated).lower(x).compile().as_text())
    assert gathered == {"all-gather": {"count": 1, "bytes": 8 * width * 4}}
