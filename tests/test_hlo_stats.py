"""Matmul FLOPs and collectives read from compiled HLO, every loop counted as often as it runs, against closed
forms of the programs compiled."""

import re
from importlib.util import find_spec

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moelora_jax.parallel.hlo_stats import collectives, matmul_flops
from moelora_jax.parallel.topologies import compile_devices, topology


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


@pytest.mark.parametrize(
    "window, stride, padding, lhs_dilation, rhs_dilation",
    [
        ((3, 3), (1, 1), "SAME", (1, 1), (1, 1)),
        ((3, 2), (2, 3), ((2, 1), (0, 3)), (1, 1), (1, 1)),
        ((3, 3), (1, 2), ((1, 1), (2, 0)), (2, 3), (1, 1)),  # transposed-convolution style: holes in the input
        ((2, 3), (1, 1), ((1, 2), (3, 3)), (1, 1), (2, 3)),
        ((4, 1), (3, 1), ((2, 2), (0, 0)), (3, 1), (2, 1)),
    ],
)
def test_a_convolution_counts_only_the_window_taps_that_meet_the_input(
    window, stride, padding, lhs_dilation, rhs_dilation
):
    """Convolving ones with ones puts at each output the number of input elements its window meets, times the
    input features: twice the sum over the output is the work, padding and dilation holes not included."""
    image, kernel = jnp.ones((2, 3, 7, 5)), jnp.ones((4, 3, *window))

    def conv(i, k):
        return jax.lax.conv_general_dilated(i, k, stride, padding, lhs_dilation, rhs_dilation)

    assert matmul_flops(_hlo(conv, image, kernel))[0] == 2 * float(conv(image, kernel).sum())


def _while_loop(start: int, bound: int, step: int, direction: str) -> str:
    """The compiled HLO of a loop of ``h @ w`` over a counter from ``start`` by ``step`` while ``counter direction
    bound``, as text."""
    test = {"LT": jnp.less, "LE": jnp.less_equal, "GT": jnp.greater, "GE": jnp.greater_equal}[direction]

    def f(x, w):
        return jax.lax.while_loop(
            lambda c: test(c[0], bound), lambda c: (c[0] + step, jnp.tanh(c[1] @ w)), (jnp.int32(start), x)
        )[1]

    return _hlo(f, jnp.ones((4, 8)), jnp.ones((8, 8)))


@pytest.mark.parametrize(
    "start, bound, step, direction",
    [(0, 4, 2, "LT"), (2, 9, 2, "LT"), (1, 10, 3, "LE"), (12, 0, -5, "GT"), (7, 3, -2, "GE")],
)
def test_a_loop_without_xla_s_trip_count_is_counted_from_its_induction_variable(start, bound, step, direction):
    """TPU's windowed matmul loops step their counter by 2 and carry no ``known_trip_count``: with XLA's annotation
    cut from a CPU program, the count read from the loop's counter is the one XLA annotated."""
    text = _while_loop(start, bound, step, direction)
    trips = int(re.search(r'"known_trip_count":\{"n":"(\d+)"', text).group(1))
    stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\}', '"stripped":{}', text)
    assert matmul_flops(stripped) == matmul_flops(text) == (trips * 2 * 4 * 8 * 8, 0)


@pytest.mark.skipif(find_spec("libtpu") is None, reason="needs libtpu: pip install 'moelora_jax[tpu]'")
def test_a_tpu_layer_stack_under_fsdp_gathers_each_layer_once_per_pass():
    """Compiled for a v5e-4 (libtpu, no TPU): the gradient of a stack of ``L`` fsdp-sharded layers gathers each
    layer's weight twice (forward and backward), though TPU's async collective fusions repeat a gather in the
    fusions that carry it on; and computes three matmuls per layer."""
    mesh = jax.sharding.Mesh(compile_devices(topology("v5e-4")), ("x",))
    layers, width, rows = 6, 1024, 64

    def loss(w, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0].sum()

    w = jax.ShapeDtypeStruct(
        (layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "x"))
    )
    x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("x")))
    text = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
    assert '"async_collective_fusion_config":{"flag_start":"2"' in text  # what this test is about is there
    assert collectives(text)["all-gather"] == {"count": 2 * layers, "bytes": 2 * layers * width * width * 2}
    assert matmul_flops(text) == (3 * layers * 2 * (rows // 4) * width * width, 0)


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
