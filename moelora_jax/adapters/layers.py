"""LoRA, MoE-LoRA and MoLE adapters: pure functional deltas and the Flax layers that wrap a frozen projection.

Convention (JAX, ``y = x @ W``): a frozen kernel ``W0: (d_in, d_out)`` is adapted by ``E`` low-rank experts stored
stacked, ``lora_a: (E, d_in, r)`` and ``lora_b: (E, r, d_out)``, a gate ``gate: (d_in, E)`` and optionally a
MoSLoRA mixer ``mixer: (E, r, r)``::

    p = softmax(x @ W_g)                      (float32, over all E experts)
    g_i = p_i / sum_{j in top-k(p)} p_j       for i in top-k(p), else 0
    y = x @ W0 + s * sum_i g_i * (drop(x) @ A_i [@ M_i]) @ B_i,      s = alpha / r

The experts run fused: one matmul into ``E*r`` columns (``E*r + E`` with the gate kernel folded in), a
per-column gate scale, one matmul out.
``E == 1`` without a gate is plain LoRA (or MoSLoRA with a mixer). An adapter's :class:`AdapterKind` is what the
layers above ask of it (routed? merges?); a projection is an :class:`AdaptedDense` (LoRA, MoE-LoRA) or a
:class:`MoleDense` (MoLE), both a :class:`FrozenDense` underneath.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Literal, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from moelora_jax.adapters.quantize import KERNEL_TYPES, QuantConfig, dequantize, kernel_leaves
from moelora_jax.errors import UserError, check_choice

Strategy = Literal["standard", "sqrt_gate"]
STRATEGIES: tuple[str, ...] = ("standard", "sqrt_gate")


def topk_mask(logits: jax.Array, top_k: int) -> jax.Array:
    """``(..., E)`` bool, True on each row's ``top_k`` largest logits (exactly ``top_k``; ties go to lower indices)."""
    _, kept = jax.lax.top_k(logits, top_k)
    return jnp.sum(jax.nn.one_hot(kept, logits.shape[-1], dtype=jnp.bool_), axis=-2, dtype=jnp.bool_)


def topk_softmax_gate(logits: jax.Array, top_k: int) -> jax.Array:
    """Top-k renormalised softmax gate.

    Args:
      logits: ``(..., E)`` gate logits.
      top_k: number of experts kept per token, ``1 <= top_k <= E``.

    Returns:
      ``(..., E)`` float32 weights ``g`` with ``g_i = p_i / sum_{j in topk} p_j`` on the top-k entries of
      ``p = softmax(logits)`` and 0 elsewhere; this equals a softmax over the kept logits alone.
    """
    return _softmax_over(logits, None if top_k == logits.shape[-1] else topk_mask(logits, top_k))


def _softmax_over(logits: jax.Array, routed: jax.Array | None) -> jax.Array:
    """float32 softmax of ``logits: (..., E)`` over the experts ``routed`` (bool, same shape; None: all), else 0."""
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits if routed is None else jnp.where(routed, logits, -jnp.inf), axis=-1)


DROPOUT_LEVELS = 2**16  # dropout compares 16-bit random words: two per 32-bit word the generator draws


def dropout_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """A ``shape`` bool mask that keeps each entry with probability ``q``, and ``q``.

    Each entry compares a 16-bit random word with ``round(rate * 2^16)``, so ``q = 1 - round(rate * 2^16) / 2^16``
    (within ``2^-17`` of ``1 - rate``); dividing the kept values by this ``q`` keeps the layer unbiased. Packing two
    words into each 32-bit draw halves the threefry work of ``bernoulli``, which compares one float32 per entry
    (about 1.5x faster measured on a 2-core CPU; RBG keys measured slower there than threefry).
    """
    drop = min(round(rate * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
    width = -(-shape[-1] // 2)
    words = jax.random.bits(rng, (*shape[:-1], width), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*shape[:-1], 2 * width)[..., : shape[-1]]
    return halves >= drop, 1.0 - drop / DROPOUT_LEVELS


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dropped_matmul(x: jax.Array, keep: jax.Array, a: jax.Array, inverse_keep: float) -> jax.Array:
    """``drop(x) @ a`` with ``drop(x) = where(keep, x * inverse_keep, 0)``, whose backward keeps ``x`` (which the
    gate keeps anyway) and the bool ``keep`` instead of the dropped float copy, and recomputes it:
    ``da = drop(x)^T dy``, ``dx = where(keep, dy @ a^T * inverse_keep, 0)``."""
    return jnp.where(keep, x * inverse_keep, 0).astype(a.dtype) @ a


def _dropped_matmul_fwd(x, keep, a, inverse_keep):
    return _dropped_matmul(x, keep, a, inverse_keep), (x, keep, a)


def _dropped_matmul_bwd(inverse_keep, residuals, dy):
    x, keep, a = residuals
    dropped = jnp.where(keep, x * inverse_keep, 0).astype(a.dtype)
    da = dropped.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    dx = jnp.where(keep, (dy @ a.T) * inverse_keep, 0).astype(x.dtype)
    return dx, None, da.astype(a.dtype)


_dropped_matmul.defvjp(_dropped_matmul_fwd, _dropped_matmul_bwd)


class GateRouting(NamedTuple):
    """What a gate decided, for the expert-load statistics of :mod:`moelora_jax.adapters.routing`: its float32 ``logits:
    (..., E)`` and ``routed: (..., E)`` bool, the top-k experts each token went to (None for a dense gate)."""

    logits: jax.Array
    routed: jax.Array | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated_expert_out(h: jax.Array, g: jax.Array, b_cat: jax.Array, scale: float, sqrt_gate: bool) -> jax.Array:
    """``(s * g expanded over r) * h @ B_cat`` with a hand-written backward.

    Shapes: ``h: (..., E*r)``, ``g: (..., E)`` float32, ``b_cat: (E*r, d_out)``; returns ``(..., d_out)``.
    The backward weights the expert branch (``dh`` and ``dB``) by ``s * g`` (standard) or ``s * sqrt(g)``
    (sqrt_gate), while the gate always receives its true gradient ``dL/dg_i = s * <dL/dy, h_i B_i>``.
    """
    return (h * _expand_gate(scale * g, h)) @ b_cat


def _concat_experts(lora_a: jax.Array, lora_b: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Stacked experts side by side for the fused form: ``A_cat: (d_in, E*r)``, ``B_cat: (E*r, d_out)``."""
    num_experts, d_in, rank = lora_a.shape
    a_cat = jnp.swapaxes(lora_a, 0, 1).reshape(d_in, num_experts * rank).astype(dtype)
    return a_cat, lora_b.reshape(num_experts * rank, -1).astype(dtype)


def _expand_gate(g: jax.Array, h: jax.Array) -> jax.Array:
    """Repeats the ``(..., E)`` gate over each expert's ``r`` columns of ``h: (..., E*r)``, in ``h``'s dtype."""
    rank = h.shape[-1] // g.shape[-1]
    return jnp.repeat(g, rank, axis=-1).astype(h.dtype)


def _gated_expert_out_fwd(h, g, b_cat, scale, sqrt_gate):
    return _gated_expert_out(h, g, b_cat, scale, sqrt_gate), (h, g, b_cat)


def _gated_expert_out_bwd(scale, sqrt_gate, residuals, dy):
    h, g, b_cat = residuals
    dz = dy @ b_cat.T  # (..., E*r): gradient reaching the un-gated expert activations
    branch_weight = _expand_gate(scale * (jnp.sqrt(g) if sqrt_gate else g), h)
    dh = dz * branch_weight
    tokens_h = (h * branch_weight).reshape(-1, h.shape[-1])
    db = tokens_h.T @ dy.reshape(-1, dy.shape[-1])
    per_expert = (dz.astype(jnp.float32) * h.astype(jnp.float32)).reshape(*g.shape, h.shape[-1] // g.shape[-1])
    dg = scale * jnp.sum(per_expert, axis=-1)
    return dh, dg.astype(g.dtype), db.astype(b_cat.dtype)


_gated_expert_out.defvjp(_gated_expert_out_fwd, _gated_expert_out_bwd)


def _check_delta_args(
    x: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    gate: jax.Array | None,
    mixer: jax.Array | None,
    top_k: int,
    strategy: str,
    dropout_rate: float,
) -> None:
    """Asserts (chex, at trace time) the dtypes and shapes of the arrays, and raises ValueError naming a bad option."""
    chex.assert_type(x, float)  # the compute dtype
    chex.assert_rank(
        [lora_a, lora_b],
        3,
        custom_message="lora_a must be (E, d_in, r) and lora_b (E, r, d_out): index a stacked layer axis away (or "
        "use the Flax module inside nn.scan) before calling.",
    )
    num_experts, d_in, rank = lora_a.shape
    chex.assert_shape(lora_b, (num_experts, rank, None))
    chex.assert_shape(x, (..., d_in))
    if gate is None and num_experts != 1:
        raise ValueError(f"{num_experts} experts need a gate of shape ({d_in}, {num_experts}); got gate=None.")
    if gate is not None:
        chex.assert_shape(gate, (d_in, num_experts))
    if mixer is not None:
        chex.assert_shape(mixer, (num_experts, rank, rank))
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must lie in [1, E={num_experts}].")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown gradient strategy {strategy!r}; choose one of {STRATEGIES}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate} must lie in [0, 1).")


def moe_lora_delta(
    x: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    gate: jax.Array | None,
    *,
    top_k: int | None = None,
    scale: float,
    strategy: Strategy = "standard",
    mixer: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    return_routing: bool = False,
) -> jax.Array | tuple[jax.Array, GateRouting | None]:
    """The MoE-LoRA update ``s * sum_i g_i * (drop(x) @ A_i [@ M_i]) @ B_i``, computed fused.

    Args:
      x: ``(..., d_in)`` activations; all leading axes are kept. Its dtype is the compute dtype.
      lora_a: ``(E, d_in, r)`` down-projections.
      lora_b: ``(E, r, d_out)`` up-projections.
      gate: ``(d_in, E)`` gate kernel (no bias), or None for plain LoRA (``E == 1``, ``g = 1``).
      top_k: experts kept per token (default: all ``E``, a dense softmax mixture).
      scale: ``s = alpha / r``, a static Python number.
      strategy: ``"standard"`` (plain autodiff of the formula) or ``"sqrt_gate"`` (Sun et al. 2025): same forward,
        but the gradient into the experts (their ``A_i, M_i, B_i`` and through them into ``x``) is weighted by
        ``sqrt(g_i)`` instead of ``g_i``; the gate still gets the true ``dL/dg_i``. Equivalently, with
        ``sg = stop_gradient``: ``term_i = sg(sqrt g_i) E_i(x) + (g_i - sg(sqrt g_i)) sg(E_i(x))``.
      mixer: optional ``(E, r, r)`` MoSLoRA mixer ``M_i`` between the factors.
      dropout_rng: PRNG key for dropout on the experts' input; dropout is applied only when given and
        ``dropout_rate > 0`` (mask and keep probability ``q`` from :func:`dropout_mask`, kept values over ``q``).
        The gate always sees the un-dropped ``x``.
      dropout_rate: probability of zeroing an input feature.
      return_routing: also return the gate's :class:`GateRouting` (its float32 logits ``x @ W_g`` and its top-k
        choice; None without a gate), from which :mod:`moelora_jax.adapters.routing` computes expert load and the
        auxiliary routing losses without a second top-k.

    Returns:
      ``(..., d_out)`` in ``x``'s dtype (and the gate's routing with ``return_routing``). The adapter weights, gate
      kernel included, are cast to the compute dtype for the matmuls (their gradients come back in their own dtype);
      the gate logits accumulate in float32 and the top-k softmax runs in float32. Differentiable in reverse mode
      (``grad``/``vjp``), not forward mode: the expert mixture is a ``custom_vjp``.

    Raises:
      AssertionError: (chex, at trace time) ``x`` is not floating point or the shapes do not fit together.
      ValueError: a bad option (``top_k``, ``strategy``, ``dropout_rate``) or no gate for ``E > 1`` experts.
    """
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("moe_lora_delta: scale must be a static Python number (alpha / r), not a traced array.")
    scale = float(scale)
    top_k = lora_a.shape[0] if top_k is None else top_k
    _check_delta_args(x, lora_a, lora_b, gate, mixer, top_k, strategy, dropout_rate)
    num_experts, _, rank = lora_a.shape
    dtype = x.dtype
    a_cat, b_cat = _concat_experts(lora_a, lora_b, dtype)

    if dropout_rng is not None and dropout_rate > 0.0:
        keep, keep_prob = dropout_mask(dropout_rng, dropout_rate, x.shape)
        h = _dropped_matmul(x, keep, a_cat, 1.0 / keep_prob)
        logits = None if gate is None else jnp.dot(x, gate.astype(dtype), preferred_element_type=jnp.float32)
    elif gate is None:
        h, logits = x @ a_cat, None
    else:
        # One matmul for the experts and the gate: x @ [A_cat | W_g] into E*r + E columns.
        fused = jnp.dot(x, jnp.concatenate([a_cat, gate.astype(dtype)], axis=1), preferred_element_type=jnp.float32)
        h, logits = fused[..., : num_experts * rank].astype(dtype), fused[..., num_experts * rank :]

    if mixer is not None:
        h = jnp.einsum("...ei,eij->...ej", h.reshape(*h.shape[:-1], num_experts, rank), mixer.astype(dtype))
        h = h.reshape(*h.shape[:-2], num_experts * rank)

    if logits is None:
        delta, routing = scale * (h @ b_cat), None
    else:
        routing = GateRouting(logits, None if top_k == num_experts else topk_mask(logits, top_k))
        gated = _softmax_over(logits, routing.routed)
        delta = _gated_expert_out(h, gated, b_cat, scale, strategy == "sqrt_gate")
    return (delta, routing) if return_routing else delta


class AdapterKind(enum.Enum):
    """The three adapters. Code above this layer asks an adapter's ``kind`` instead of reading its fields.

    - ``LORA``: one low-rank update ``s * A [M] B`` per projection (``AdapterConfig`` with one expert; with a
      MoSLoRA mixer ``M`` when ``mixer=True``).
    - ``MOE_LORA``: ``E`` experts mixed per token by a top-k softmax gate (``AdapterConfig`` with ``E > 1``, a
      mixer per expert optional).
    - ``MOLE``: ``N`` trained LoRAs, frozen, mixed per token by a learned gate (``MoleConfig``).
    """

    LORA = "lora"
    MOE_LORA = "moe_lora"
    MOLE = "mole"

    @property
    def routed(self) -> bool:
        """A gate weighs experts per token: the update depends on the input, and routing statistics and losses
        apply."""
        return self is not AdapterKind.LORA

    @property
    def merges(self) -> bool:
        """One fixed low-rank update per projection, which folds into the frozen kernel: it has a merged form (and,
        without a mixer, a PEFT one)."""
        return self is AdapterKind.LORA

    @property
    def trains_factors(self) -> bool:
        """Its low-rank factors train (LoRA, MoE-LoRA); MoLE's are frozen and only its gate trains."""
        return self is not AdapterKind.MOLE


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What adapter a projection carries.

    ``num_experts == 1`` is plain LoRA (no gate); ``mixer=True`` adds a MoSLoRA ``r x r`` mixer per expert.
    ``top_k=None`` keeps all experts (dense softmax mixture).
    """

    num_experts: int = 1
    rank: int = 4
    top_k: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    strategy: Strategy = "standard"
    mixer: bool = False

    def __post_init__(self) -> None:
        """Raises UserError naming the first bad setting."""
        if self.rank <= 0:
            raise UserError(f"AdapterConfig.rank={self.rank} must be a positive integer.")
        if self.num_experts <= 0:
            raise UserError(f"AdapterConfig.num_experts={self.num_experts} must be a positive integer.")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise UserError(
                f"AdapterConfig.top_k={self.top_k} must lie in [1, num_experts={self.num_experts}] (or be None)."
            )
        check_choice("AdapterConfig.strategy", self.strategy, STRATEGIES)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"AdapterConfig.dropout={self.dropout} must lie in [0, 1).")

    @property
    def kind(self) -> AdapterKind:
        """``LORA`` with one expert, else ``MOE_LORA``."""
        return AdapterKind.LORA if self.num_experts == 1 else AdapterKind.MOE_LORA

    @property
    def scale(self) -> float:
        """``s = alpha / r``."""
        return self.alpha / self.rank


MoleGatePlacement = Literal["layer", "block"]


@dataclasses.dataclass(frozen=True)
class MoleConfig:
    """MoLE (Wu, Huang & Wei 2024): ``num_loras`` trained LoRAs, frozen, mixed per token by a learned gate.

    Each projection holds the LoRAs stacked in ``"params"`` with their scales folded into ``B`` (``mole_a: (N, d_in,
    r)``, ``mole_b: (N, r, d_out)``; ``rank`` is the largest source rank, smaller ones are zero-padded)::

        w = softmax(normalize(x) @ W_g / tau)          over the LoRAs not in ``masked`` (renormalised over the rest)
        y = x @ W0 + sum_i w_i * (x @ A_i) @ B_i

    Only ``W_g: (d, N)`` and ``log tau`` train (``tau`` starts at ``tau``). ``gate``: ``"layer"``, a gate per adapted
    linear layer fed that layer's input; ``"block"``, one gate per decoder block fed the block's normalised input and
    shared by its adapted layers. The paper's gate reads the LoRAs' outputs of a whole block and sequence; like the
    authors' released code we feed it the L2-normalised input, per token.
    """

    num_loras: int
    rank: int
    gate: MoleGatePlacement = "layer"
    tau: float = 1.0
    masked: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Raises UserError naming the first bad setting."""
        if self.num_loras < 2 or self.rank < 1:
            raise UserError(f"MoLE needs at least 2 LoRAs of rank >= 1; got {self.num_loras} of rank {self.rank}.")
        if self.gate not in ("layer", "block"):
            raise UserError(f"MoleConfig.gate={self.gate!r} must be 'layer' or 'block'.")
        if self.tau <= 0:
            raise UserError(f"MoleConfig.tau={self.tau} must be > 0.")
        if not set(self.masked) <= set(range(self.num_loras)) or len(set(self.masked)) >= self.num_loras:
            raise UserError(
                f"MoleConfig.masked={self.masked} must name some (not all) of the LoRAs 0..{self.num_loras - 1}."
            )

    @property
    def kind(self) -> AdapterKind:
        return AdapterKind.MOLE


def mole_gate_logits(x: jax.Array, gate: jax.Array, log_tau: jax.Array, masked: tuple[int, ...] = ()) -> jax.Array:
    """``normalize(x) @ W_g / tau`` in float32, ``-inf`` on the ``masked`` LoRAs: ``x: (..., d)``, ``gate: (d, N)``
    -> ``(..., N)``; their softmax is the MoLE mixture weights."""
    chex.assert_shape(gate, (x.shape[-1], None))
    chex.assert_shape(log_tau, ())
    x = x.astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    logits = (normed @ gate.astype(jnp.float32)) * jnp.exp(-log_tau)
    if masked:
        keep = jnp.ones(gate.shape[-1], bool).at[jnp.asarray(masked)].set(False)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def lora_mixture(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_i w_i * (x @ A_i) @ B_i``, fused like MoE-LoRA: ``x: (..., d_in)``, ``lora_a: (N, d_in, r)``,
    ``lora_b: (N, r, d_out)``, ``weights: (..., N)`` float32 -> ``(..., d_out)`` in ``x``'s dtype."""
    chex.assert_rank([lora_a, lora_b], 3)
    num_loras, d_in, rank = lora_a.shape
    chex.assert_shape(lora_b, (num_loras, rank, None))
    chex.assert_shape(x, (..., d_in))
    chex.assert_shape(weights, (*x.shape[:-1], num_loras))
    chex.assert_type(weights, jnp.float32)
    a_cat, b_cat = _concat_experts(lora_a, lora_b, x.dtype)
    return _gated_expert_out(x @ a_cat, weights, b_cat, 1.0, False)


def kaiming_uniform_fan_in(fan_in_axis: int = -2) -> nn.initializers.Initializer:
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` (the ``nn.Linear`` default): ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        bound = 1.0 / math.sqrt(shape[fan_in_axis])
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


ADAPTER_COLLECTION = "adapters"
"""The Flax variable collection that holds adapter leaves, apart from the frozen ``"params"``."""
ROUTER_COLLECTION = "router"
"""The Flax collection gates sow their decisions into (``routing``, one :class:`GateRouting` per call) when it is
mutable, e.g. ``model.apply(variables, tokens, mutable=[ROUTER_COLLECTION])``."""

LogicalAxes = tuple[str | None, str | None]


class MoleGate(nn.Module):
    """MoLE gate logits ``normalize(x) @ W_g / tau`` (see ``MoleConfig``), sown into ``"router"``. Its leaves live in
    ``"adapters"``: ``gate: (d, N)`` PyTorch-Linear default and ``log_tau`` (starts at ``log(config.tau)``); with
    ``partitioned`` they carry logical axes (``in_axis``, ``expert``)."""

    config: MoleConfig
    in_axis: str | None = None
    partitioned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate_init = kaiming_uniform_fan_in(-2)
        tau_init = nn.initializers.constant(math.log(self.config.tau))
        if self.partitioned:
            gate_init = nn.with_logical_partitioning(gate_init, (self.in_axis, "expert"))
            tau_init = nn.with_logical_partitioning(tau_init, ())
        shape = (x.shape[-1], self.config.num_loras)
        gate = self.variable(ADAPTER_COLLECTION, "gate", lambda: gate_init(self.make_rng("params"), shape)).value
        log_tau = self.variable(ADAPTER_COLLECTION, "log_tau", lambda: tau_init(self.make_rng("params"), ())).value
        logits = mole_gate_logits(x, gate, log_tau, self.config.masked)
        if not self.is_initializing():
            self.sow(ROUTER_COLLECTION, "routing", GateRouting(logits, None))
        return logits


class FrozenDense(nn.Module):
    """A frozen dense projection ``x @ kernel [+ bias]``: ``x: (..., d_in) -> (..., features)`` in ``dtype``.

    ``"params"`` holds the kernel ``(d_in, features)`` in ``param_dtype`` or, with ``quant``, its int8 / NF4 leaves
    (``kernel_<field>``, :func:`~moelora_jax.adapters.quantize.kernel_leaves`), dequantized inside the matmul, and
    with ``use_bias`` a ``bias: (features,)`` in ``param_dtype`` (never quantized). With
    ``kernel_axes`` (logical names of ``d_in, features``) every leaf, an adapter's included, is created boxed in
    ``nn.LogicallyPartitioned`` for the sharding rules (adapter axes ``expert`` and ``rank``); apply takes plain
    arrays. The adapted layers below add their update to this projection.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    kernel_axes: LogicalAxes | None = None
    quant: QuantConfig | None = None
    use_bias: bool = False

    def _init(self, init: nn.initializers.Initializer, axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
        return init if self.kernel_axes is None else nn.with_logical_partitioning(init, axes)

    def _frozen_kernel(self, d_in: int) -> jax.Array:
        """The frozen ``(d_in, features)`` kernel in the compute dtype: the ``kernel`` param, or with ``quant`` its
        quantized leaves dequantized here, so the dequantization fuses into the matmul."""
        ax_in, ax_out = self.kernel_axes or (None, None)
        if self.quant is None or self.quant.mode == "none":
            init = self._init(self.kernel_init, (ax_in, ax_out))
            return self.param("kernel", init, (d_in, self.features), self.param_dtype).astype(self.dtype)
        if self.is_initializing():
            self.make_rng("params")  # the float kernel's one draw, so adapters initialise alike whatever the storage
        names = {"in": ax_in, "out": ax_out, None: None}
        fields = {}
        for field, (shape, dtype, axes) in kernel_leaves(self.quant, d_in, self.features).items():
            init = self._init(nn.initializers.zeros, tuple(names[a] for a in axes))  # loaded, never initialised
            key = jax.random.key(0)  # unused by zeros: no draw from the "params" stream
            fields[field] = self.variable("params", f"kernel_{field}", init, key, shape, dtype).value
        return dequantize(KERNEL_TYPES[self.quant.mode, self.quant.double_quant](**fields), self.dtype)

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x`` in the compute dtype, and ``x @ kernel [+ bias]``."""
        x = x.astype(self.dtype)
        y = x @ self._frozen_kernel(x.shape[-1])
        if self.use_bias:
            ax_out = (self.kernel_axes or (None, None))[1]
            init = self._init(nn.initializers.zeros, (ax_out,))
            y = y + self.param("bias", init, (self.features,), self.param_dtype).astype(self.dtype)
        return x, y

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._project(x)[1]


class AdaptedDense(FrozenDense):
    """A :class:`FrozenDense` projection plus an optional LoRA or MoE-LoRA adapter (``adapter=None``: frozen only).

    The ``"adapters"`` collection holds the trainable leaves, always float32, named by
    :mod:`moelora_jax.adapters.leaves`' contract: lora_a ``(E, d_in, r)`` Kaiming-uniform, lora_b ``(E, r, d_out)``
    zeros, gate ``(d_in, E)`` PyTorch-Linear default (only for MoE-LoRA), mixer ``(E, r, r)`` Kaiming-uniform (only
    with ``mixer=True``). So ``variables = {"params": frozen, "adapters": trainable}`` and gradients need only the
    second. Dropout on the adapter input draws from the ``"dropout"`` RNG stream unless ``deterministic``. With a
    gate, its :class:`GateRouting` is sown into the ``"router"`` collection when that is mutable (see
    ``ROUTER_COLLECTION``).
    """

    adapter: AdapterConfig | None = None
    deterministic: bool | None = None

    def _adapter_leaf(self, name: str, init: nn.initializers.Initializer, shape: tuple[int, ...], axes) -> jax.Array:
        init = self._init(init, axes)
        return self.variable(ADAPTER_COLLECTION, name, lambda: init(self.make_rng("params"), shape, jnp.float32)).value

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """``x: (..., d_in) -> (..., features)`` in ``dtype``."""
        x, y = self._project(x)
        cfg = self.adapter
        if cfg is None:
            return y
        d_in, (ax_in, ax_out) = x.shape[-1], self.kernel_axes or (None, None)
        num_experts, rank = cfg.num_experts, cfg.rank
        uniform = kaiming_uniform_fan_in(-2)
        lora_a = self._adapter_leaf("lora_a", uniform, (num_experts, d_in, rank), ("expert", ax_in, "rank"))
        lora_b = self._adapter_leaf(
            "lora_b", nn.initializers.zeros, (num_experts, rank, self.features), ("expert", "rank", ax_out)
        )
        gate = None
        if cfg.kind.routed:
            gate = self._adapter_leaf("gate", uniform, (d_in, num_experts), (ax_in, "expert"))
        mixer = None
        if cfg.mixer:
            # a logical name may appear once per array: the mixer's second rank axis has none (replicated anyway)
            mixer = self._adapter_leaf("mixer", uniform, (num_experts, rank, rank), ("expert", "rank", None))
        use_dropout = cfg.dropout > 0.0 and not nn.merge_param("deterministic", self.deterministic, deterministic)
        delta, routing = moe_lora_delta(
            x,
            lora_a,
            lora_b,
            gate,
            top_k=cfg.top_k,
            scale=cfg.scale,
            strategy=cfg.strategy,
            mixer=mixer,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dropout_rate=cfg.dropout,
            return_routing=True,
        )
        if routing is not None and not self.is_initializing():
            self.sow(ROUTER_COLLECTION, "routing", routing)
        return y + delta


class MoleDense(FrozenDense):
    """A :class:`FrozenDense` projection plus a MoLE adapter (see ``MoleConfig``).

    The frozen LoRAs are ``"params"`` beside the kernel (``mole_a: (N, d_in, r)``, ``mole_b: (N, r, d_out)``,
    loaded, never initialised: :func:`~moelora_jax.formats.mole.with_loras`); only the gate trains, this layer's own
    (``mole_gate``) or, given ``mole_logits``, its block's.
    """

    adapter: MoleConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mole_logits: jax.Array | None = None) -> jax.Array:
        """``x: (..., d_in) -> (..., features)`` in ``dtype``. ``mole_logits``: a MoLE block gate's ``(..., N)``
        logits, used instead of this layer's own gate."""
        x, y = self._project(x)
        cfg = self.adapter
        d_in, (ax_in, ax_out) = x.shape[-1], self.kernel_axes or (None, None)
        frozen_a = self._init(nn.initializers.zeros, ("expert", ax_in, "rank"))
        frozen_b = self._init(nn.initializers.zeros, ("expert", "rank", ax_out))
        lora_a = self.param("mole_a", frozen_a, (cfg.num_loras, d_in, cfg.rank), jnp.float32)
        lora_b = self.param("mole_b", frozen_b, (cfg.num_loras, cfg.rank, self.features), jnp.float32)
        if mole_logits is None:
            mole_logits = MoleGate(cfg, ax_in, self.kernel_axes is not None, name="mole_gate")(x)
        return y + lora_mixture(x, lora_a, lora_b, jax.nn.softmax(mole_logits, axis=-1))
