"""NF4 / double-quant / int8 kernels: parity with bitsandbytes 0.50.2 (CPU) and closed-form properties.

bitsandbytes quantizes a Hugging Face weight ``W = kernel^T: (d_out, d_in)`` in row-major order, so each of its
blocks is ``block_size`` consecutive ``d_in`` entries of one output column of our kernel. The bitsandbytes tests
quantize each layer's ``W`` and compare it entry by entry with our layer slice, read in that flat order
(``x[layer].T.reshape(-1)``). bitsandbytes' CPU ``dequantize_4bit`` is wrong on AVX-512 machines when ``d_in`` is a
multiple of 16 but not of the block size, so those tests keep ``d_in % 128 == 0``. The NumPy oracle tests need no
bitsandbytes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moelora_jax.adapters import quantize as quantize_module
from moelora_jax.adapters.quantize import (
    DYNAMIC_MAP,
    NESTED_BLOCK,
    NF4_CODE,
    Int8Kernel,
    NF4DoubleKernel,
    NF4Kernel,
    QuantConfig,
    block_absmax,
    dequantize,
    quantize,
    quantized_bytes,
)
from moelora_jax.errors import UserError

PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
"""NF4 as published: Dettmers et al. 2023, QLoRA (arXiv:2305.14314), Appendix E."""

LUT_RESOLUTION = 2 / 65535
"""bitsandbytes' CPU 8-bit quantizer rounds ``s`` to one of 65536 points on [-1, 1] (``|v - s| <= 1/65535``) and takes
the code nearest to ``v``; that code is then at most ``2/65535`` farther from ``s`` than the nearest one is."""


def _kernel(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A float32 kernel ``shape`` of N(0, 0.02^2) entries (LLaMA's init scale)."""
    return (np.random.default_rng(seed).normal(size=shape) * 0.02).astype(np.float32)


def _layers(x) -> np.ndarray:
    """``(..., a, b)`` -> float-or-integer host array ``(n_layers, a, b)``."""
    x = np.asarray(x)
    return x.reshape(-1, *x.shape[-2:])


def _hf_order(x) -> np.ndarray:
    """Layer slices ``(n_layers, a, b)`` -> ``(n_layers, a * b)`` in bitsandbytes' flat order of ``x[layer].T``."""
    return np.stack([layer.T.reshape(-1) for layer in _layers(x)])


def _bnb():
    """``(bitsandbytes.functional, torch)``, or skip the test."""
    functional = pytest.importorskip("bitsandbytes.functional")
    return functional, pytest.importorskip("torch")


def _hf_weight(torch, layer: np.ndarray, dtype):
    """Our float32 kernel layer ``(d_in, d_out)`` -> the torch Hugging Face weight ``(d_out, d_in)`` in ``dtype``."""
    return torch.from_numpy(np.ascontiguousarray(layer.T)).to(dtype)


def _oracle_nearest(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Nearest-code index by definition: the number of float32 midpoints strictly below ``scaled``."""
    midpoints = (code[:-1] + code[1:]) / np.float32(2)
    return (scaled[..., None] > midpoints).sum(-1)


def _oracle_blockwise(flat: np.ndarray, block: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' blockwise scheme on a flat float32 vector ``(n,)`` -> (indices ``(n,)``, absmax per block)."""
    n = flat.size
    blocks = np.concatenate([flat, np.zeros(-n % block, np.float32)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None], -1, 1)
    return _oracle_nearest(scaled, code).reshape(-1)[:n], absmax


def _oracle_nf4_double(layer: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Exact-nearest NF4 + double quantization of one kernel layer ``(d_in, d_out)``, on its flat HF weight."""
    flat = np.ascontiguousarray(layer.T).reshape(-1)
    idx, absmax = _oracle_blockwise(flat, block, NF4_CODE)
    offset = np.float32(absmax.mean(dtype=np.float64))
    absmax_codes, absmax_scale = _oracle_blockwise(absmax - offset, NESTED_BLOCK, DYNAMIC_MAP)
    restored = DYNAMIC_MAP[absmax_codes] * np.repeat(absmax_scale, NESTED_BLOCK)[: absmax.size] + offset
    return {
        "codes": ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8),
        "absmax_codes": absmax_codes,
        "absmax_scale": absmax_scale,
        "absmax_offset": offset,
        "weights_t": (NF4_CODE[idx] * np.repeat(restored, block)).reshape(layer.shape[::-1]),
    }


def test_nf4_code_is_the_published_one():
    assert NF4_CODE.dtype == np.float32
    np.testing.assert_array_equal(NF4_CODE, np.array(PUBLISHED_NF4, np.float32))


def test_dynamic_map_structure():
    """256 ascending distinct values: 0, 1, and 127 magnitudes in (0, 1) with both signs."""
    assert DYNAMIC_MAP.shape == (256,) and DYNAMIC_MAP.dtype == np.float32
    assert np.all(np.diff(DYNAMIC_MAP) > 0)
    assert DYNAMIC_MAP[127] == 0 and DYNAMIC_MAP[-1] == 1
    np.testing.assert_array_equal(-DYNAMIC_MAP[:127][::-1], DYNAMIC_MAP[128:-1])


def test_codes_match_bitsandbytes():
    functional, _ = _bnb()
    np.testing.assert_array_equal(NF4_CODE, functional.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(DYNAMIC_MAP, functional.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("shape", [(2, 128, 96), (256, 64)])
def test_nf4_matches_bitsandbytes(shape, block, dtype):
    """Packed codes, absmax and dequantized weights equal ``quantize_4bit`` / ``dequantize_4bit`` bit for bit."""
    functional, torch = _bnb()
    w = jnp.asarray(_kernel(shape, seed=block), dtype)  # a device array: quantize brings it to the host
    qk = quantize(w, QuantConfig("nf4", block))
    assert isinstance(qk, NF4Kernel)
    assert qk.codes.shape == (*shape[:-2], shape[-2] // 2, shape[-1]) and qk.codes.dtype == np.uint8
    assert qk.absmax.shape == (*shape[:-2], shape[-2] // block, shape[-1]) and qk.absmax.dtype == np.float32
    ours = np.asarray(dequantize(qk, dtype).astype(jnp.float32))
    codes, absmax, ours = _hf_order(qk.codes), _hf_order(qk.absmax), _hf_order(ours)
    for layer, kernel in enumerate(_layers(np.asarray(w, np.float32))):
        packed, state = functional.quantize_4bit(
            _hf_weight(torch, kernel, getattr(torch, dtype)), blocksize=block, quant_type="nf4"
        )
        np.testing.assert_array_equal(codes[layer], packed.numpy().reshape(-1))
        np.testing.assert_array_equal(absmax[layer], state.absmax.numpy())
        reference = functional.dequantize_4bit(packed, state, quant_type="nf4").float().numpy()
        np.testing.assert_array_equal(ours[layer], reference.reshape(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("shape", "block"), [((2, 512, 384), 64), ((512, 200), 128)])
def test_double_quant_matches_bitsandbytes(shape, block, dtype):
    """Same NF4 codes; the 8-bit absmax codes differ only where bitsandbytes' CPU lookup table is too coarse
    (mostly centred absmaxes near 0, where the dynamic map is denser than the table; 0.3% or fewer here).

    Where they differ, both codes must be equally near the scaled absmax ``s`` up to :data:`LUT_RESOLUTION`. A
    different code moves a restored absmax by at most ``scale * (max gap of the dynamic map + LUT_RESOLUTION)``
    (``scale`` the 256-block's float32 scale), and a weight (``|NF4| <= 1`` times its absmax) by at most that too.
    The offset is our float64 mean vs bitsandbytes' float32 one, so everything may also differ by float32 ulps.
    """
    functional, torch = _bnb()
    w = jnp.asarray(_kernel(shape, seed=3), dtype)
    qk = quantize(w, QuantConfig("nf4", block, double_quant=True))
    assert isinstance(qk, NF4DoubleKernel)
    n = shape[-2] // block * shape[-1]
    assert qk.absmax_codes.shape == (*shape[:-2], shape[-2] // block, shape[-1]) and qk.absmax_codes.dtype == np.uint8
    assert qk.absmax_scale.shape == (*shape[:-2], -(-n // NESTED_BLOCK)) and qk.absmax_offset.shape == shape[:-2]
    codes, absmax_codes = _hf_order(qk.codes), _hf_order(qk.absmax_codes)
    absmax, weights = _hf_order(block_absmax(qk)), _hf_order(dequantize(qk, jnp.float32))
    scales, offsets = np.asarray(qk.absmax_scale).reshape(-1, qk.absmax_scale.shape[-1]), qk.absmax_offset.reshape(-1)
    tolerance = scales.max() * (np.diff(DYNAMIC_MAP).max() + LUT_RESOLUTION)
    mismatches = 0
    for layer, kernel in enumerate(_layers(np.asarray(w, np.float32))):
        packed, state = functional.quantize_4bit(
            _hf_weight(torch, kernel, getattr(torch, dtype)),
            blocksize=block,
            quant_type="nf4",
            compress_statistics=True,
        )
        nested = state.state2
        np.testing.assert_array_equal(codes[layer], packed.numpy().reshape(-1))
        np.testing.assert_allclose(offsets[layer], state.offset.item(), rtol=1e-6)
        np.testing.assert_allclose(scales[layer], nested.absmax.numpy(), rtol=1e-6)
        bnb_codes = state.absmax.numpy()
        mismatches += int((absmax_codes[layer] != bnb_codes).sum())
        true_absmax = np.abs(kernel.T.reshape(-1, block)).max(axis=1)
        bnb_scale = np.repeat(nested.absmax.numpy(), NESTED_BLOCK)[:n]
        scaled = np.clip((true_absmax - state.offset.item()) * (np.float32(1) / bnb_scale), -1, 1)
        nearest = np.abs(DYNAMIC_MAP[_oracle_nearest(scaled, DYNAMIC_MAP)] - scaled)
        assert np.all(np.abs(DYNAMIC_MAP[bnb_codes] - scaled) <= nearest + LUT_RESOLUTION + 1e-6)
        bnb_absmax = functional.dequantize_blockwise(state.absmax, state.state2).numpy() + state.offset.item()
        np.testing.assert_allclose(absmax[layer], bnb_absmax, rtol=1e-6, atol=tolerance)
        reference = functional.dequantize_4bit(packed, state, quant_type="nf4").float().numpy()
        bound = tolerance if dtype == "float32" else tolerance + 2.0**-8 * np.abs(reference.reshape(-1))
        assert np.all(np.abs(weights[layer] - reference.reshape(-1)) <= bound + 1e-6 * np.abs(reference.reshape(-1)))
    assert mismatches <= 0.005 * absmax_codes.size, f"{mismatches} of {absmax_codes.size} absmax codes differ"


@pytest.mark.parametrize(("shape", "block"), [((2, 512, 384), 64), ((512, 200), 128), ((64, 8), 64)])
def test_double_quant_matches_exact_oracle(shape, block):
    """Every field and the dequantized weights equal an exact-nearest NumPy oracle on the HF weights, bit for bit."""
    w = _kernel(shape, seed=4)
    qk = quantize(w, QuantConfig("nf4", block, double_quant=True))
    weights = _hf_order(dequantize(qk, jnp.float32))
    fields = {name: _hf_order(getattr(qk, name)) for name in ("codes", "absmax_codes")}
    fields["absmax_scale"] = np.asarray(qk.absmax_scale).reshape(-1, qk.absmax_scale.shape[-1])
    fields["absmax_offset"] = qk.absmax_offset.reshape(-1)
    for layer, kernel in enumerate(_layers(w)):
        want = _oracle_nf4_double(kernel, block)
        for name, value in fields.items():
            np.testing.assert_array_equal(value[layer], want[name], err_msg=name)
        np.testing.assert_array_equal(weights[layer], want["weights_t"].reshape(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 128, 96), (256, 64)])
def test_int8_matches_bitsandbytes(shape, dtype):
    """``q`` is ``int8_vectorwise_quant``'s codes and ``scale`` its row stats / 127; dequantized equal to rounding."""
    functional, torch = _bnb()
    w = np.asarray(jnp.asarray(_kernel(shape, seed=5), dtype))
    qk = quantize(w, QuantConfig("int8"))
    assert isinstance(qk, Int8Kernel)
    assert qk.q.shape == shape and qk.q.dtype == np.int8
    assert qk.scale.shape == (*shape[:-2], 1, shape[-1]) and qk.scale.dtype == np.float32
    ours = _layers(dequantize(qk, jnp.float32))
    for layer, kernel in enumerate(_layers(w.astype(np.float32))):
        q, stats, _ = functional.int8_vectorwise_quant(_hf_weight(torch, kernel, getattr(torch, dtype)))
        np.testing.assert_array_equal(_layers(qk.q)[layer].T, q.numpy())
        np.testing.assert_array_equal(_layers(qk.scale)[layer][0], stats.numpy() / np.float32(127))
        reference = functional.int8_vectorwise_dequant(q, stats).numpy()
        np.testing.assert_allclose(ours[layer].T, reference, rtol=1e-6, atol=0)


def test_nf4_midpoint_ties_go_to_the_lower_code():
    """A value exactly at a float32 midpoint takes the lower code; its float32 successor the upper one."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    column = np.zeros(64, np.float32)
    column[:2] = -1, 1  # absmax 1, so the scaled values are the values
    column[2:17] = midpoints
    column[17:32] = np.nextafter(midpoints, np.float32(2))
    want = np.full(64, 7)
    want[:2] = 0, 15
    want[2:17] = np.arange(15)
    want[17:32] = np.arange(1, 16)
    qk = quantize(column[:, None], QuantConfig("nf4"))
    np.testing.assert_array_equal(np.asarray(dequantize(qk, jnp.float32))[:, 0], NF4_CODE[want])


@pytest.mark.parametrize(
    "config", [QuantConfig("nf4"), QuantConfig("nf4", double_quant=True), QuantConfig("int8")], ids=str
)
def test_zero_blocks_dequantize_to_zero(config):
    w = _kernel((128, 3), seed=6)
    w[:64, 0] = 0  # one NF4 block
    w[:, 1] = 0  # one int8 column (and two NF4 blocks)
    out = np.asarray(dequantize(quantize(w, config), jnp.float32))
    assert np.all(np.isfinite(out))
    assert np.all(out[:64, :2] == 0) and np.all(out[:, 1] == 0)


def test_round_trip_error_bounds():
    """NF4: ``|w' - w| <= absmax_block * max half gap of NF4_CODE``; int8: ``|w' - w| <= scale / 2``."""
    w = np.random.default_rng(7).standard_t(df=3, size=(2, 256, 48)).astype(np.float32)  # heavy tails
    absmax = np.abs(w.reshape(2, 4, 64, 48)).max(axis=2, keepdims=True)
    half_gap = np.diff(NF4_CODE).max() / 2
    nf4 = np.asarray(dequantize(quantize(w, QuantConfig("nf4")), jnp.float32)).reshape((*absmax.shape[:2], 64, 48))
    assert np.all(np.abs(nf4 - w.reshape(nf4.shape)) <= absmax * half_gap * (1 + 1e-6))
    int8 = quantize(w, QuantConfig("int8"))
    assert np.all(np.abs(np.asarray(dequantize(int8, jnp.float32)) - w) <= int8.scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize(
    "config", [QuantConfig("nf4"), QuantConfig("nf4", 128, double_quant=True), QuantConfig("int8")], ids=str
)
def test_dequantize_under_jit_equals_eager(config):
    """Bit for bit, except that XLA may fuse double quantization's ``code * scale + offset`` into an FMA.

    That changes the restored absmax by at most the product's rounding, ``2^-23 * scale``, and a weight
    (``|NF4| <= 1`` times it) by that plus its own float32 rounding; a bfloat16 weight then by one bfloat16 rounding.
    """
    qk = quantize(_kernel((2, 256, 80), seed=8), config)
    jitted = jax.jit(dequantize, static_argnums=1)
    for dtype, eps in ((jnp.float32, 2.0**-23), (jnp.bfloat16, 2.0**-8)):
        eager = dequantize(qk, dtype)
        assert eager.dtype == dtype and eager.shape == (2, 256, 80)
        got, want = np.asarray(jitted(qk, dtype), np.float32), np.asarray(eager, np.float32)
        if isinstance(qk, NF4DoubleKernel):
            np.testing.assert_allclose(got, want, rtol=eps, atol=2.0**-23 * float(qk.absmax_scale.max()))
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "config", [QuantConfig("nf4"), QuantConfig("nf4", double_quant=True), QuantConfig("int8")], ids=str
)
def test_chunked_quantize_equals_one_pass(config, monkeypatch):
    """Chunks of a few rows (:func:`quantize` converts a chunk at a time) or a transposed view change nothing."""
    w = _kernel((3, 128, 40), seed=9)
    whole = quantize(w, config)
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 100)
    transposed_view = np.swapaxes(np.ascontiguousarray(np.swapaxes(w, -1, -2)), -1, -2)
    for kernel in (w, transposed_view):
        for got, want in zip(quantize(kernel, config), whole, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", [QuantConfig("nf4", double_quant=True), QuantConfig("int8")], ids=str)
def test_quantize_host_memory(config, monkeypatch):
    """Beside its input (a transposed HF view here), :func:`quantize` allocates its output plus one chunk's work."""
    tracemalloc = pytest.importorskip("tracemalloc")
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 1 << 14)
    w = np.swapaxes(_kernel((4, 512, 512), seed=12), -1, -2)  # 4 MiB of float32
    tracemalloc.start()
    try:
        qk = quantize(w, config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < quantized_bytes(qk) + 64 * (1 << 14), (peak, quantized_bytes(qk))


def test_byte_accounting():
    """Bytes per bf16 byte on a (576, 1536) kernel: NF4 0.28, NF4 + double quant 0.26, int8 0.50."""
    shape = (576, 1536)
    w = _kernel(shape, seed=10)
    bf16_bytes = 2 * w.size
    ratios = {
        (mode, double): quantized_bytes(quantize(w, QuantConfig(mode, double_quant=double))) / bf16_bytes
        for mode, double in [("nf4", False), ("nf4", True), ("int8", False)]
    }
    assert ratios["nf4", False] == (0.5 + 4 / 64) / 2  # 0.28125
    assert ratios["nf4", True] == pytest.approx((0.5 + 1 / 64 + 4 / (64 * 256)) / 2, abs=1e-5)  # 0.258
    assert ratios["int8", False] == (1 + 4 / shape[0]) / 2  # 0.503
    assert quantized_bytes(w) == 4 * w.size


def test_mode_none_is_the_kernel():
    w = _kernel((64, 8), seed=11)
    assert quantize(w, QuantConfig()) is w
    np.testing.assert_array_equal(np.asarray(dequantize(w, jnp.bfloat16)), np.asarray(jnp.asarray(w, jnp.bfloat16)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "nf8"}, "mode"),
        ({"mode": "nf4", "block_size": 33}, "positive even"),
        ({"mode": "nf4", "block_size": 0}, "positive even"),
        ({"mode": "int8", "double_quant": True}, "double_quant"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        QuantConfig(**kwargs)


def test_block_size_must_divide_d_in():
    with pytest.raises(UserError, match=r"block_size=64 does not divide d_in=96 of a \(96, 8\) kernel"):
        quantize(np.zeros((2, 96, 8), np.float32), QuantConfig("nf4"))
