"""Weight-only quantization of the frozen base kernels: NF4 (QLoRA), NF4 with double quantization, and int8.

Our kernels are ``w: (..., d_in, d_out)`` (stacked over layers: ``(L, d_in, d_out)``); a Hugging Face weight is
``w^T: (d_out, d_in)``. Every format here is the one bitsandbytes 0.50.2 gives that Hugging Face weight, laid out in
our orientation, so one layer's slice holds exactly bitsandbytes' numbers for that layer.

**NF4** (Dettmers et al. 2023, QLoRA, arXiv:2305.14314): the ``d_in`` axis of each output column is cut into blocks
of ``B = block_size`` consecutive entries (bitsandbytes' row-major blocks of ``w^T``). Per block ``b``:

- ``absmax_b = max_{i in b} |w_i|`` (float32),
- ``s_i = clip(w_i * (1 / max(absmax_b, 1e-38)), -1, 1)`` (a float32 multiply by the reciprocal),
- ``idx_i = #{k : m_k < s_i}``, the nearest of the 16 values :data:`NF4_CODE` with an exact tie at a float32
  midpoint ``m_k = (c_k + c_{k+1}) / 2`` going to the lower code ``k``,
- two indices per byte: ``d_in`` entries ``2j`` (high nibble) and ``2j + 1`` (low nibble),
- ``dequant_i = NF4_CODE[idx_i] * absmax_b`` (float32),
  so ``|dequant_i - w_i| <= absmax_b * max_k (c_{k+1} - c_k) / 2``.

**Double quantization** (QLoRA section 3): one layer's ``n = (d_in / B) * d_out`` absmaxes, in bitsandbytes' flat
order (output channel major, i.e. ``absmax^T`` flattened), are centred on their mean ``mu`` and stored as 8-bit codes
of the signed dynamic map (:func:`dynamic_map`, Dettmers 2015, arXiv:1511.04561) in blocks of 256 with one float32
scale per block, by the same absmax / reciprocal / nearest-midpoint rule:
``absmax ~= DYNAMIC_MAP[q] * scale_{block of 256} + mu``. The nearest code is exact (as bitsandbytes' CUDA kernel);
its CPU kernel looks codes up in a 65536-bin table, which picks another code for a few absmaxes in 1000 (mostly
centred ones near 0, where the map is denser than the table).
``mu`` is the float64 mean rounded to float32 (bitsandbytes sums in float32; the two may differ by an ulp).

**int8** (bitsandbytes' ``LLM.int8()`` weight format, ``load_in_8bit``): one scale per output channel,
``a_c = max_i |w_ic|``, ``q_ic = round_half_even(w_ic * ((1 / a_c) * 127))`` (0 for a zero column; float32, rounded
like torch's ``127.0 / a``, which is ``reciprocal(a) * 127``), ``dequant = q * (a_c / 127)``.

Bytes per parameter (bf16 = 2), for a layer of ``d_in * d_out`` parameters:

- NF4: ``1/2 + 4/B`` = 0.5625 at ``B = 64`` (0.28x bf16),
- NF4 + double quantization: ``1/2 + 1/B + 4/(256 B) + 4/(d_in d_out)`` ~= 0.516 at ``B = 64`` (0.258x),
- int8: ``1 + 4/d_in`` (~0.50x).

:func:`quantize` runs in NumPy on the host, one tensor at a time, a chunk at a time, so it needs about the tensor
(any strides: a transposed view is not copied) plus its quantized form. :func:`dequantize` is pure ``jax.numpy``
(shifts, masks, a 16- or 256-entry table gather and broadcast multiplies) and fuses into the matmul that consumes it
under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.typing import DTypeLike

from moelora_jax.errors import UserError, check_choice

Array = np.ndarray | jax.Array

QUANT_MODES = ("none", "int8", "nf4")
NESTED_BLOCK = 256
"""Absmaxes per float32 scale in double quantization (bitsandbytes' fixed nested block size)."""

_CHUNK_ELEMENTS = 1 << 21
"""Kernel entries :func:`quantize` converts at once: its temporaries stay near 25 bytes each, about 50 MiB."""
_TINY = np.float32(1e-38)
"""Floor of a block's absmax before its reciprocal: an all-zero block scales to zeros, not NaN."""

NF4_CODE = np.array(
    [
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
    ],
    np.float32,
)
"""The 16 NormalFloat4 values (QLoRA, arXiv:2305.14314, Appendix E), ascending; index 7 is exactly 0."""
NF4_CODE.setflags(write=False)


def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic quantization map (Dettmers 2015, arXiv:1511.04561): 256 ascending float32 values.

    A code is a sign, a decimal exponent ``e in {0, ..., 6}`` and a linear fraction that gets the bits the exponent
    leaves free: exponent ``e`` has ``2^e`` fractions, the midpoints of ``2^e + 1`` points evenly spaced on
    ``[0.1, 1]``, each times ``10^(e - 6)``. Both signs give ``2 * (1 + 2 + ... + 64) = 254`` values; ``0`` and ``1``
    complete the 256. The float32 arithmetic follows ``torch.linspace`` (``start + i * step`` for the first half of
    the points, ``end - (steps - 1 - i) * step`` for the rest, each rounded once; the float64 products and sums
    below are exact, so one rounding to float32 reproduces it), then ``(p_j + p_{j+1}) / 2`` and the times
    ``float32(10^(e - 6))``, each in float32: the values of ``bitsandbytes.functional.create_dynamic_map()``.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        steps = 2**e + 1
        start, end = np.float32(0.1), np.float32(1.0)
        step = np.float64((end - start) / np.float32(steps - 1))
        i = np.arange(steps)
        points = np.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i)).astype(np.float32)
        means = (points[:-1] + points[1:]) / np.float32(2)
        magnitudes = np.float32(10.0 ** (e - 6)) * means
        values += [*magnitudes, *(-magnitudes)]
    return np.sort(np.array(values, np.float32))


DYNAMIC_MAP = dynamic_map()
DYNAMIC_MAP.setflags(write=False)


def _midpoints(code: np.ndarray) -> np.ndarray:
    """``(K,)`` ascending code -> ``(K - 1,)`` float32 decision thresholds ``(c_k + c_{k+1}) / 2``."""
    return (code[:-1] + code[1:]) / np.float32(2)


_NF4_MIDPOINTS = _midpoints(NF4_CODE)
_DYNAMIC_MIDPOINTS = _midpoints(DYNAMIC_MAP)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to store the frozen base kernels.

    ``mode``: ``"none"`` (as loaded), ``"int8"`` (per output channel) or ``"nf4"`` (per block of ``block_size``
    consecutive ``d_in`` entries of an output column). ``double_quant`` (NF4 only) stores NF4's absmaxes in 8 bits.
    ``block_size`` is NF4's; it must be even (two 4-bit codes share a byte) and divide every kernel's ``d_in``.
    """

    mode: Literal["none", "int8", "nf4"] = "none"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        check_choice("quantization mode", self.mode, QUANT_MODES)
        if self.block_size <= 0 or self.block_size % 2:
            raise UserError(
                f"quantization block_size={self.block_size} must be a positive even number (two 4-bit codes share "
                "a byte); use e.g. 64."
            )
        if self.double_quant and self.mode != "nf4":
            raise UserError(
                f"double_quant=True compresses NF4's block absmaxes but mode={self.mode!r}; set mode='nf4' or "
                "double_quant=False."
            )


class NF4Kernel(NamedTuple):
    """An NF4 kernel ``w: (..., d_in, d_out)`` with blocks of ``B`` ``d_in`` entries (``B`` = ``d_in / n_blocks``).

    ``codes``: uint8 ``(..., d_in // 2, d_out)``, byte ``[j, c]`` = ``idx[2j, c] << 4 | idx[2j + 1, c]``.
    ``absmax``: float32 ``(..., d_in // B, d_out)``.
    """

    codes: Array
    absmax: Array


class NF4DoubleKernel(NamedTuple):
    """An NF4 kernel whose absmaxes are themselves 8-bit (double quantization), per leading index (layer).

    ``codes``: uint8 ``(..., d_in // 2, d_out)`` as in :class:`NF4Kernel`.
    ``absmax_codes``: uint8 ``(..., d_in // B, d_out)``, indices into :data:`DYNAMIC_MAP`.
    ``absmax_scale``: float32 ``(..., ceil(d_in // B * d_out / 256))``, one per 256 absmaxes in ``absmax^T`` order.
    ``absmax_offset``: float32 ``(...,)``, the layer's mean absmax.

    Under ``jax.jit`` XLA may fuse the restore's multiply-add into one FMA, so a jitted :func:`dequantize` can differ
    from the eager one by float32 rounding (below ``2^-23 * absmax_scale``).
    """

    codes: Array
    absmax_codes: Array
    absmax_scale: Array
    absmax_offset: Array


class Int8Kernel(NamedTuple):
    """An int8 kernel: ``q`` int8 ``(..., d_in, d_out)``, ``scale`` float32 ``(..., 1, d_out)``: column absmax / 127."""

    q: Array
    scale: Array


QuantizedKernel = NF4Kernel | NF4DoubleKernel | Int8Kernel
_F32 = np.dtype(np.float32)


def _pieces(shape: tuple[int, ...], unit: int) -> Iterator[tuple[tuple[int, ...], slice]]:
    """``(layer index, d_in rows)`` pieces of a kernel ``shape = (..., d_in, d_out)`` that cover it once.

    Each ``w[(*index, rows)]`` is a ``(rows, d_out)`` view (whatever ``w``'s strides) of about
    :data:`_CHUNK_ELEMENTS` entries; ``rows`` is a multiple of ``unit``, which divides ``d_in``.
    """
    *lead, d_in, d_out = shape
    rows = max(unit, _CHUNK_ELEMENTS // (d_out * unit) * unit)
    for index in np.ndindex(*lead):
        for start in range(0, d_in, rows):
            yield index, slice(start, min(start + rows, d_in))


def _divided(rows: slice, factor: int) -> slice:
    """The slice of a ``d_in // factor`` axis that ``rows`` (multiples of ``factor``) of the ``d_in`` axis map to."""
    return slice(rows.start // factor, rows.stop // factor)


def _absmax_scaled(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``x`` -> (``absmax = max |x|`` over ``axis``, removed; ``clip(x * (1 / max(absmax, 1e-38)), -1, 1)``)."""
    absmax = np.abs(x).max(axis=axis, keepdims=True)
    scaled = np.clip(x * (np.float32(1) / np.maximum(absmax, _TINY)), -1, 1)
    return absmax.squeeze(axis), scaled


def _nearest(scaled: np.ndarray, midpoints: np.ndarray) -> np.ndarray:
    """Index of the nearest code: ``#{k : midpoints[k] < scaled}`` (an exact tie goes to the lower code), uint8."""
    return np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)


def _nested_blocks(x: Array, xp: ModuleType) -> Array:
    """Per-block values ``(..., n_blocks, d_out)`` -> ``(..., ceil(n / 256), 256)`` in bitsandbytes' flat order.

    ``n = n_blocks * d_out``; the flat order is output channel major (``x^T`` flattened); the tail is zero-padded.
    ``xp`` is ``numpy`` or ``jax.numpy``.
    """
    *lead, n_blocks, d_out = x.shape
    n = n_blocks * d_out
    flat = xp.swapaxes(x, -1, -2).reshape(*lead, n)
    padded = math.ceil(n / NESTED_BLOCK) * NESTED_BLOCK
    flat = xp.pad(flat, [(0, 0)] * len(lead) + [(0, padded - n)])
    return flat.reshape(*lead, padded // NESTED_BLOCK, NESTED_BLOCK)


def _unnest(blocks: Array, n_blocks: int, d_out: int, xp: ModuleType) -> Array:
    """Inverse of :func:`_nested_blocks`: ``(..., ceil(n / 256), 256)`` -> ``(..., n_blocks, d_out)``."""
    lead = blocks.shape[:-2]
    flat = blocks.reshape(*lead, -1)[..., : n_blocks * d_out]
    return xp.swapaxes(flat.reshape(*lead, d_out, n_blocks), -1, -2)


def _quantize_nf4(w: np.ndarray, block: int) -> NF4Kernel:
    """``w: (..., d_in, d_out)`` -> :class:`NF4Kernel`, converting one piece (:func:`_pieces`) at a time."""
    *lead, d_in, d_out = w.shape
    codes = np.empty((*lead, d_in // 2, d_out), np.uint8)
    absmax = np.empty((*lead, d_in // block, d_out), np.float32)
    for index, rows in _pieces(w.shape, block):
        x = w[(*index, rows)].astype(np.float32)  # (rows, d_out)
        absmax[(*index, _divided(rows, block))], scaled = _absmax_scaled(x.reshape(-1, block, d_out), axis=1)
        idx = _nearest(scaled, _NF4_MIDPOINTS).reshape(x.shape)
        codes[(*index, _divided(rows, 2))] = (idx[0::2] << 4) | idx[1::2]
    return NF4Kernel(codes, absmax)


def _double_quantize(kernel: NF4Kernel) -> NF4DoubleKernel:
    """Store an :class:`NF4Kernel`'s absmaxes ``(..., n_blocks, d_out)`` as 8-bit codes, per leading index."""
    absmax = kernel.absmax
    offset = np.asarray(absmax.mean(axis=(-2, -1), dtype=np.float64), np.float32)
    scale, scaled = _absmax_scaled(_nested_blocks(absmax - offset[..., None, None], np), axis=-1)
    codes = _unnest(_nearest(scaled, _DYNAMIC_MIDPOINTS), *absmax.shape[-2:], np)
    return NF4DoubleKernel(kernel.codes, np.ascontiguousarray(codes), scale, offset)


def _quantize_int8(w: np.ndarray) -> Int8Kernel:
    """``w: (..., d_in, d_out)`` -> :class:`Int8Kernel`, converting one piece (:func:`_pieces`) at a time."""
    absmax = np.maximum(w.max(axis=-2, keepdims=True), -w.min(axis=-2, keepdims=True)).astype(np.float32)  # no |w|
    inverse = (np.float32(1) / np.where(absmax > 0, absmax, np.float32(1))) * np.float32(127)  # torch's 127 / a
    q = np.empty(w.shape, np.int8)
    for index, rows in _pieces(w.shape, 1):
        q[(*index, rows)] = np.rint(w[(*index, rows)].astype(np.float32) * inverse[index]).astype(np.int8)
    return Int8Kernel(q, absmax / np.float32(127))


def quantize(w: Array, config: QuantConfig) -> QuantizedKernel | Array:
    """One kernel ``w: (..., d_in, d_out)`` (any float dtype, host or device) -> host NumPy arrays of ``config``'s
    format (``w`` itself for mode ``"none"``). See the module docstring for the math and the layouts.
    """
    if config.mode == "none":
        return w
    w = np.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a kernel (..., d_in, d_out), got shape {w.shape}.")
    if config.mode == "int8":
        return _quantize_int8(w)
    kernel_leaves(config, *w.shape[-2:])  # the block size must divide d_in
    kernel = _quantize_nf4(w, config.block_size)
    return _double_quantize(kernel) if config.double_quant else kernel


KERNEL_TYPES: dict[tuple[str, bool], type] = {
    ("nf4", False): NF4Kernel,
    ("nf4", True): NF4DoubleKernel,
    ("int8", False): Int8Kernel,
}
"""``(mode, double_quant)`` -> the kernel's NamedTuple; its fields are the leaves a model stores."""


def kernel_leaves(
    config: QuantConfig, d_in: int, d_out: int
) -> dict[str, tuple[tuple[int, ...], np.dtype, tuple[str | None, ...]]]:
    """The leaves of one ``(d_in, d_out)`` kernel in ``config``'s format: field -> ``(shape, dtype, axes)``, where
    ``axes`` says which kernel axis (``"in"``, ``"out"``) each array axis follows, for sharding (None: none)."""
    if config.mode == "int8":
        return {"q": ((d_in, d_out), np.dtype(np.int8), ("in", "out")), "scale": ((1, d_out), _F32, (None, "out"))}
    if d_in % config.block_size:
        raise UserError(
            f"quantization block_size={config.block_size} does not divide d_in={d_in} of a ({d_in}, {d_out}) kernel; "
            "pick a block_size that divides every kernel's d_in (e.g. 64)."
        )
    blocks = (d_in // config.block_size, d_out)
    leaves = {"codes": ((d_in // 2, d_out), np.dtype(np.uint8), ("in", "out"))}
    if not config.double_quant:
        return leaves | {"absmax": (blocks, _F32, ("in", "out"))}
    nested = (math.ceil(blocks[0] * d_out / NESTED_BLOCK),)
    return leaves | {
        "absmax_codes": (blocks, np.dtype(np.uint8), ("in", "out")),
        "absmax_scale": (nested, _F32, (None,)),
        "absmax_offset": ((), _F32, ()),
    }


def block_absmax(qk: NF4Kernel | NF4DoubleKernel) -> jax.Array:
    """An NF4 kernel's per-block absmax, float32 ``(..., d_in // B, d_out)``.

    Double quantization restores it as ``DYNAMIC_MAP[absmax_codes] * absmax_scale[its 256-block] + absmax_offset``.
    """
    if isinstance(qk, NF4Kernel):
        return jnp.asarray(qk.absmax)
    codes = jnp.asarray(qk.absmax_codes)
    values = jnp.asarray(DYNAMIC_MAP)[_nested_blocks(codes, jnp)] * jnp.asarray(qk.absmax_scale)[..., None]
    return _unnest(values, *codes.shape[-2:], jnp) + jnp.asarray(qk.absmax_offset)[..., None, None]


def _nf4_weights(qk: NF4Kernel | NF4DoubleKernel) -> jax.Array:
    """``NF4_CODE[idx] * absmax``, float32 ``(..., d_in, d_out)``: unpack the nibbles, gather, scale each block."""
    codes = jnp.asarray(qk.codes)
    *lead, half, d_out = codes.shape
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(*lead, 2 * half, d_out)  # (..., d_in, d_out)
    absmax = block_absmax(qk)  # (..., n_blocks, d_out)
    blocks = jnp.asarray(NF4_CODE)[idx].reshape(*lead, absmax.shape[-2], -1, d_out) * absmax[..., :, None, :]
    return blocks.reshape(*lead, 2 * half, d_out)


def dequantize(qk: QuantizedKernel | Array, dtype: DTypeLike) -> jax.Array:
    """The kernel ``(..., d_in, d_out)`` in ``dtype``, computed in float32 and cast once (a plain array: cast)."""
    if isinstance(qk, Int8Kernel):
        w = jnp.asarray(qk.q).astype(jnp.float32) * jnp.asarray(qk.scale)
    elif isinstance(qk, NF4Kernel | NF4DoubleKernel):
        w = _nf4_weights(qk)
    else:
        w = jnp.asarray(qk)
    return w.astype(dtype)


def quantized_bytes(qk: QuantizedKernel | Array) -> int:
    """Bytes of all arrays of a (quantized) kernel."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(qk))


def quantize_params(params: dict, config: QuantConfig) -> dict:
    """A float ``"params"`` tree (held in memory) with every leaf named ``kernel`` (the q/k/v/o and MLP projections)
    replaced by its quantized ``kernel_<field>`` leaves, host NumPy arrays; the loader does the same per tensor."""
    if config.mode == "none":
        return params
    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel":
            out[path] = leaf
            continue
        for field, value in quantize(leaf, config)._asdict().items():
            out[(*path[:-1], f"kernel_{field}")] = value
    return traverse_util.unflatten_dict(out)


def dequantize_params(params: dict, config: QuantConfig, dtype: DTypeLike) -> dict:
    """A ``"params"`` tree with each projection's ``kernel_<field>`` leaves (:func:`kernel_leaves`) replaced by its
    dequantized ``kernel`` in ``dtype``: the float model a quantized one computes with (e.g. for a merged export)."""
    if config.mode == "none":
        return params
    kind = KERNEL_TYPES[config.mode, config.double_quant]
    flat = traverse_util.flatten_dict(params)
    out = {path: leaf for path, leaf in flat.items() if not str(path[-1]).startswith("kernel_")}
    for owner in {path[:-1] for path in flat if path[-1] == f"kernel_{kind._fields[0]}"}:
        kernel = kind(**{field: flat[(*owner, f"kernel_{field}")] for field in kind._fields})
        out[(*owner, "kernel")] = dequantize(kernel, dtype)
    return traverse_util.unflatten_dict(out)
