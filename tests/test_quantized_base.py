"""A quantized frozen base (``Llama(..., quant=...)``): its train step is the float model's on the dequantized
kernels, on one device and on the 8-device mesh, and the loader quantizes exactly as ``quantize`` does."""

import jax
import numpy as np
import pytest

from moelora_jax import AdapterConfig
from moelora_jax.adapters.quantize import QuantConfig, dequantize_params, quantize_params
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.models.pretrained import load_config, load_params
from moelora_jax.optim.optimizer import OptimConfig, build_optimizer
from moelora_jax.parallel.sharding import make_mesh
from moelora_jax.training.trainer import Trainer

CONFIG = LlamaConfig(64, 64, 128, 2, 4, 2, 16)
NF4 = QuantConfig("nf4", block_size=32)
NF4_DOUBLE = QuantConfig("nf4", block_size=32, double_quant=True)
INT8 = QuantConfig("int8")
LORA = AdapterConfig(rank=4, alpha=8.0)
MOE = AdapterConfig(num_experts=4, rank=2, top_k=2, alpha=4.0, strategy="standard")
MOE_SQRT = AdapterConfig(num_experts=4, rank=2, top_k=2, alpha=4.0, strategy="sqrt_gate")
MOSLORA = AdapterConfig(rank=4, alpha=8.0, mixer=True)


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, 64, (1, 4, 12)).astype(np.int32)
    loss_mask = np.zeros_like(tokens, bool)
    loss_mask[..., -4:] = True
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": loss_mask}


def _steps(model: Llama, params: dict, optim: OptimConfig, devices: tuple[int, int, int]) -> tuple[list, dict]:
    adapters = init_variables(model, jax.random.key(1), ("adapters",))["adapters"]
    mesh = make_mesh(*devices, devices=jax.devices("cpu")[: int(np.prod(devices))])
    trainer = Trainer(model, build_optimizer(optim, adapters), mesh)
    state, params, losses = trainer.init(jax.random.key(0)), trainer.place_params(params), []
    for step in range(2):
        state, metrics = trainer.train_step(state, params, _batch(step))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.adapters)


@pytest.mark.parametrize(
    ("quant", "adapter", "riemann", "devices"),
    [
        (NF4, LORA, True, (1, 1, 1)),
        (NF4, MOE, True, (1, 1, 1)),
        (NF4, MOE_SQRT, False, (1, 1, 1)),
        (NF4, MOE, False, (1, 1, 1)),
        (NF4, MOSLORA, True, (1, 1, 1)),
        (INT8, MOE_SQRT, True, (1, 1, 1)),
        (NF4_DOUBLE, MOE_SQRT, True, (2, 2, 2)),
        (INT8, MOSLORA, False, (2, 2, 2)),
        (NF4, LORA, False, (1, 4, 2)),
    ],
)
def test_a_step_on_a_quantized_base_equals_the_step_on_its_dequantized_kernels(quant, adapter, riemann, devices):
    float_params = init_variables(Llama(CONFIG), jax.random.key(0), ("params",))["params"]
    float_params["lm_head"] = float_params["lm_head"] * 25.0  # logits that move
    quantized = quantize_params(jax.tree.map(np.asarray, float_params), quant)
    dequantized = dequantize_params(quantized, quant, np.float32)
    assert not np.allclose(
        dequantized["layers"]["attn"]["q_proj"]["kernel"], float_params["layers"]["attn"]["q_proj"]["kernel"]
    )
    # SGD, whose step is linear in the gradient: Adam divides each gradient by its own scale, so where one is near
    # zero its last bits (which an 8-device reduction orders differently on each CPU) become a share of a whole step
    optim = OptimConfig(family="sgd", lr=1e-2, gate_lr=1e-2, riemann=riemann)
    ours = _steps(Llama(CONFIG, adapter=adapter, quant=quant), quantized, optim, devices)
    oracle = _steps(Llama(CONFIG, adapter=adapter), dequantized, optim, devices)
    np.testing.assert_allclose(ours[0], oracle[0], rtol=1e-6)
    initial = init_variables(Llama(CONFIG, adapter=adapter), jax.random.key(1), ("adapters",))["adapters"]

    def same_steps(a, b, start):
        # float32 sums reassociated across devices differ by a few ulps of the gradient's largest terms: the two
        # steps must agree to 1e-4 of the largest change of each leaf, and every leaf must have changed
        moved = np.abs(b - start).max()
        assert moved > 0
        np.testing.assert_allclose(a - start, b - start, rtol=0, atol=1e-4 * moved)

    jax.tree.map(same_steps, ours[1], oracle[1], jax.tree.map(np.asarray, initial))


@pytest.mark.parametrize("quant", [NF4, NF4_DOUBLE, INT8])
def test_the_loader_quantizes_each_tensor_as_quantize_does(tiny_llama, quant):
    _, directory = tiny_llama()
    config = load_config(directory)
    loaded = load_params(directory, config, quant=quant)
    expected = quantize_params(jax.tree.map(np.asarray, load_params(directory, config)), quant)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), expected)
    assert "kernel" not in loaded["layers"]["mlp"]["down_proj"] and loaded["embedding"].dtype == np.float32
