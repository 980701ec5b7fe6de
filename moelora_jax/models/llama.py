"""The LLaMA-family decoder (Llama 2, Llama 3.x, SmolLM2, Mistral, Qwen2 / 2.5, Qwen3, Gemma 2, Gemma 3) in Flax
Linen, carrying (MoE-)LoRA adapters.

Per layer, with RMSNorm ``n(x) = x / sqrt(mean(x^2) + eps) * w`` (statistics in float32)::

    h = x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))     grouped-query, causal + padding mask
    y = h + down(silu(gate(n2(h))) * up(n2(h)))                   SwiGLU

The families (:data:`FAMILIES`) differ by: a bias on some projections (Qwen2's q/k/v; Llama's ``attention_bias`` /
``mlp_bias``, Qwen3's ``attention_bias``); an RMSNorm over each head of ``q`` and ``k`` before the rotary embedding
(Qwen3, Gemma 3); a sliding window (Mistral on every layer, Gemma on the layers ``sliding_layers`` marks, each
layer's flag carried through the scan): a query in slot ``i`` sees keys in slots ``i - W < j <= i`` only; and
Gemma's ``(1 + w)`` norms around both branches, GELU, scaled embeddings, scaled and soft-capped scores and logits
(Gemma 2), and per-layer rotary tables (Gemma 3). :class:`LlamaConfig` lists them.

``logits = n(y_L) @ E^T`` (tied embeddings) or ``@ lm_head``; ``output="hidden"`` returns ``n(y_L)`` instead, for a
loss that applies the head only where it is needed (:mod:`moelora_jax.models.loss`). Rotary embeddings rotate the two
halves of each head (``x * cos + rotate_half(x) * sin``), with plain, ``linear`` or ``llama3`` frequency scaling, as
transformers does. Attention is ``jax.nn.dot_product_attention`` (XLA, or cuDNN's fused kernel on GPU) under a
causal mask restricted to real tokens and, for packed rows, to each token's own segment (block-diagonal), or TPU's
splash kernel (:mod:`moelora_jax.models.splash`), which takes segment ids instead of the dense mask.
Layers are one ``nn.scan`` (compile time independent of depth; every layer leaf has a leading ``layers`` axis),
optionally rematerialised. Each projection is a ``FrozenDense``, ``AdaptedDense`` or ``MoleDense``: frozen kernels
live in ``"params"``, the adapters of the configured target projections in ``"adapters"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moelora_jax.adapters.layers import (
    ADAPTER_COLLECTION,
    ROUTER_COLLECTION,
    AdaptedDense,
    AdapterConfig,
    AdapterKind,
    FrozenDense,
    MoleConfig,
    MoleDense,
    MoleGate,
)
from moelora_jax.adapters.quantize import QuantConfig
from moelora_jax.errors import UserError, check_choice
from moelora_jax.models.splash import splash_attention
from moelora_jax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Projection:
    """A projection adapters can target: its place in our ``"params"`` tree (``layers/<block>/<name>``, stacked over
    layers) and its module in layer ``i`` of a Hugging Face checkpoint (``model.layers.{i}.<hf_module>``)."""

    block: str
    name: str
    hf_module: str

    @property
    def path(self) -> tuple[str, str, str]:
        """Its subtree of the ``"params"`` (or ``"adapters"``) tree: ``("layers", block, name)``."""
        return ("layers", self.block, self.name)

    def hf_name(self, layer: int | str) -> str:
        """Its Hugging Face module name in ``layer`` (``"{i}"``: a pattern to format)."""
        return f"model.layers.{layer}.{self.hf_module}"


PROJECTIONS: dict[str, Projection] = {
    "q": Projection("attn", "q_proj", "self_attn.q_proj"),
    "k": Projection("attn", "k_proj", "self_attn.k_proj"),
    "v": Projection("attn", "v_proj", "self_attn.v_proj"),
    "o": Projection("attn", "o_proj", "self_attn.o_proj"),
    "gate": Projection("mlp", "gate_proj", "mlp.gate_proj"),
    "up": Projection("mlp", "up_proj", "mlp.up_proj"),
    "down": Projection("mlp", "down_proj", "mlp.down_proj"),
}
"""Every target name (``adapter.targets``) and where that projection lives: the one table that loading, exports,
PEFT and MoLE read."""
TARGETS: tuple[str, ...] = tuple(PROJECTIONS)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""The dtypes a model computes in and stores its frozen weights in, by name."""
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
"""The gated MLP's activations by their transformers names: Llama's SiLU (SwiGLU), Gemma's tanh-approximated GELU."""
Remat = Literal["none", "full", "dots", "save_qkv", "save_attention", "offload_attention"]
AttentionImpl = Literal["xla", "cudnn", "splash"]
ATTENTION_IMPLS: tuple[str, ...] = ("xla", "cudnn", "splash")
Output = Literal["logits", "last_logits", "hidden"]
REMAT_CHOICES: tuple[str, ...] = ("none", "full", "dots", "save_qkv", "save_attention", "offload_attention")
QKV_NAMES = ("query", "key", "value")
"""The adapted q/k/v projections' outputs, before the rotary embedding: ``(B, T, heads * head_dim)`` each."""
ATTENTION_NAMES = ("attention_out", "mlp_in")
"""The attention's output before the ``o`` projection ``(B, T, heads * head_dim)``, and the MLP's normalised input
``(B, T, d)``."""
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": jax.checkpoint_policies.save_only_these_names(*QKV_NAMES),
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES),
    "offload_attention": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(ATTENTION_NAMES),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def check_targets(name: str, targets: tuple[str, ...]) -> None:
    """``targets`` (the projections that carry adapters) must be a non-empty subset of :data:`TARGETS`."""
    if not targets or set(targets) - set(TARGETS):
        raise UserError(f"{name}={','.join(targets)!r} must be a non-empty subset of {', '.join(TARGETS)}.")


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family this decoder runs: its ``model_type`` and transformers' classes for it (the config's, and the
    causal LM's, which a merged export names in ``architectures``); whether its config has the ``attention_bias``
    option; whether it norms each head of q and k (``qk_norm``); whether it is a Gemma (``(1 + w)`` norms around both
    branches, tanh-GELU, scaled embeddings, per-layer sliding windows, ``query_pre_attn_scalar``, soft-capping)."""

    model_type: str
    config_class: str
    architecture: str
    attention_bias: bool = False
    qk_norm: bool = False
    gemma: bool = False


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaConfig", "LlamaForCausalLM", attention_bias=True),
        Family("mistral", "MistralConfig", "MistralForCausalLM"),
        Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
        Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", attention_bias=True, qk_norm=True),
        Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", gemma=True),
        Family("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", qk_norm=True, gemma=True),
    )
}
"""Every supported ``model_type`` (a Hugging Face ``config.json``'s) and its family."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1/3.2 frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Positions divided by ``factor`` (``rope_type: linear``; Gemma 3's global layers, 4B and up)."""

    factor: float


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, as in a Hugging Face ``config.json`` of a supported ``model_type``
    (:data:`FAMILIES`). ``bias_targets``: the projections with a bias; ``qk_norm``: an RMSNorm over each head of q
    and k; ``sliding_window``: the keys a query sees, itself included (None: every earlier one), on the layers
    ``sliding_layers`` marks (empty: every layer). Gemma's: ``norm_offset=1`` (RMSNorm scales by ``1 + w``),
    ``hidden_act`` ``gelu_pytorch_tanh``, ``scale_embeddings`` (by ``sqrt(hidden_size)``), ``sandwich_norms`` (an
    RMSNorm after the attention and after the MLP too), scores scaled by ``query_pre_attn_scalar ** -0.5`` and
    soft-capped, ``cap * tanh(z / cap)``, in the attention (``attn_logit_softcap``) and at the head
    (``final_logit_softcap``). Gemma 3's sliding layers rotate with ``local_rope_theta`` (unscaled), its others
    with ``rope_theta`` and ``rope_scaling``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | LinearRopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "llama"
    bias_targets: tuple[str, ...] = ()
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    norm_offset: float = 0.0
    hidden_act: str = "silu"
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        check_choice("model_type", self.model_type, tuple(FAMILIES))
        check_choice("hidden_act", self.hidden_act, tuple(ACTIVATIONS))
        if self.sliding_layers and (len(self.sliding_layers) != self.num_layers or self.sliding_window is None):
            raise UserError(
                f"sliding_layers has {len(self.sliding_layers)} flags for {self.num_layers} layers "
                f"(sliding_window={self.sliding_window}): give one per layer, and a window."
            )
        if set(self.bias_targets) - set(TARGETS):
            raise UserError(f"bias_targets={self.bias_targets} must be a subset of {', '.join(TARGETS)}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window={self.sliding_window} must be a positive number of tokens, or None.")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings.")

    @classmethod
    def from_hf(cls, hf: Any) -> LlamaConfig:
        """From a ``transformers`` config object or a ``config.json`` dict; unsupported variants fail clearly."""
        import transformers

        model_type = hf.get("model_type") if isinstance(hf, dict) else getattr(hf, "model_type", None)
        if model_type == "gemma3":  # the multimodal Gemma 3 (4B and up): its language model only
            text = hf["text_config"] if isinstance(hf, dict) else hf.text_config
            return cls.from_hf({**text, "model_type": "gemma3_text"} if isinstance(text, dict) else text)
        if model_type not in FAMILIES:
            raise UserError(
                f"model_type={model_type!r} is not supported: the supported families are {', '.join(FAMILIES)} "
                "(and gemma3's language model)."
            )
        family = FAMILIES[model_type]
        if isinstance(hf, dict):
            hf = getattr(transformers, family.config_class)(**{k: v for k, v in hf.items() if k != "model_type"})
        if getattr(hf, "use_sliding_window", False):
            raise UserError(
                f"use_sliding_window=True is not supported for {model_type}: its sliding layers are not implemented "
                "(the published Qwen2.5 and Qwen3 checkpoints do not use them)."
            )
        gemma = family.gemma
        act = getattr(hf, "hidden_activation", None) if gemma else getattr(hf, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise UserError(f"hidden_act={act!r} is not supported: use one of {', '.join(ACTIVATIONS)}.")
        bias_targets = ("q", "k", "v") if model_type == "qwen2" else ()
        if getattr(hf, "attention_bias", False):
            bias_targets = ("q", "k", "v", "o")
        if getattr(hf, "mlp_bias", False):
            bias_targets += ("gate", "up", "down")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        local_rope_theta = None
        if "full_attention" in rope:  # Gemma 3: the global layers' rotation, and the sliding layers'
            local = rope.get("sliding_attention", {})
            if local.get("rope_type", "default") != "default":
                raise UserError(
                    f"the sliding layers' rope_type={local['rope_type']!r} is not supported: use 'default'."
                )
            local_rope_theta, rope = float(local["rope_theta"]), dict(rope["full_attention"])
        rope_type = rope.get("rope_type", "default")
        scaling = None
        if rope_type == "linear":
            scaling = LinearRopeScaling(float(rope["factor"]))
        elif rope_type == "llama3":
            scaling = Llama3RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise UserError(f"rope_type={rope_type!r} is not supported: use 'default', 'linear' or 'llama3'.")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError("partial_rotary_factor != 1 is not supported by LLaMA-family models.")
        eos = hf.eos_token_id
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            max_position_embeddings=hf.max_position_embeddings,
            bos_token_id=hf.bos_token_id,
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,),
            pad_token_id=hf.pad_token_id,
            model_type=model_type,
            bias_targets=bias_targets,
            qk_norm=family.qk_norm,
            sliding_window=getattr(hf, "sliding_window", None) if model_type == "mistral" or gemma else None,
            sliding_layers=tuple(t == "sliding_attention" for t in hf.layer_types) if gemma else (),
            norm_offset=1.0 if gemma else 0.0,
            hidden_act=act,
            scale_embeddings=gemma,
            sandwich_norms=gemma,
            query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None) if gemma else None,
            attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
            final_logit_softcap=getattr(hf, "final_logit_softcapping", None) if gemma else None,
            local_rope_theta=local_rope_theta,
        )

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def to_hf(self) -> Any:
        """The equivalent transformers config of its family (for ``config.json`` files and PyTorch oracles)."""
        import transformers

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            kind = "linear" if isinstance(self.rope_scaling, LinearRopeScaling) else "llama3"
            rope = {"rope_type": kind, "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        if self.local_rope_theta is not None:
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta}
            rope = {"full_attention": rope, "sliding_attention": local}
        eos = list(self.eos_token_ids)
        options: dict[str, Any] = {}
        if self.family.attention_bias:
            options["attention_bias"] = "o" in self.bias_targets
        if self.model_type == "llama":
            options["mlp_bias"] = "down" in self.bias_targets
        if self.model_type == "mistral":
            options["sliding_window"] = self.sliding_window
        if self.family.gemma:
            options |= {
                "sliding_window": self.sliding_window,
                "layer_types": ["sliding_attention" if s else "full_attention" for s in self.sliding_layers],
                "hidden_activation": self.hidden_act,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "attn_logit_softcapping": self.attn_logit_softcap,
                "final_logit_softcapping": self.final_logit_softcap,
            }
        return getattr(transformers, self.family.config_class)(
            **options,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
            pad_token_id=self.pad_token_id,
        )


def rope_inv_freq(config: LlamaConfig, local: bool = False) -> np.ndarray:
    """``(head_dim / 2,)`` float32 inverse frequencies ``theta^(-2i/d)``, scaled as configured: ``linear`` divides
    them by ``factor``; ``llama3`` divides wavelengths above ``L / low_freq_factor`` by ``factor``, keeps those below
    ``L / high_freq_factor`` and interpolates the band between smoothly (``L`` the original context length).
    ``local``: the sliding layers' (``theta = local_rope_theta``, unscaled)."""
    dim = config.head_dim
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    s = None if local else config.rope_scaling
    if s is None:
        return inv_freq
    if isinstance(s, LinearRopeScaling):
        return (inv_freq / s.factor).astype(np.float32)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``positions: (B, T)`` -> ``cos, sin: (B, T, head_dim)`` float32 (each frequency repeated for both halves)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x: (B, T, H, hd)`` rotated: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class KVCache(NamedTuple):
    """Decoding state. ``k, v: (layers, B, S, kv_heads, head_dim)``; ``valid: (B, S)`` marks written, non-padding
    slots; ``index``: the next slot to write (shared by the batch, whose prompts are left-padded)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, length: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
        """An empty cache of ``length`` slots, which must cover the prompt and every token to be generated."""
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32)
        )


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (offset + scale)`` with the statistics in float32, the result in ``dtype``.
    ``offset=0`` (Llama: ``scale`` starts at 1, the product in ``dtype``) or ``1`` (Gemma: ``scale`` starts at 0,
    the product in float32)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class _LayerPart(nn.Module):
    """Fields every part of a decoder layer shares, and how it builds its (adapted) projections."""

    config: LlamaConfig
    adapter: AdapterConfig | MoleConfig | None
    targets: tuple[str, ...]
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    deterministic: bool
    attention_impl: AttentionImpl
    quant: QuantConfig | None

    def norm(self, name: str) -> RMSNorm:
        """The model's RMSNorm (its ``eps`` and ``norm_offset``), named ``name``."""
        c = self.config
        return RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.norm_offset, name=name)

    def project(
        self, target: str, x: jax.Array, features: int, axes: tuple[str, str], mole_logits: jax.Array | None
    ) -> jax.Array:
        """``x`` through projection ``target`` (``features`` wide, logical ``axes``): a :class:`FrozenDense`, with
        the model's adapter where ``target`` is adapted: an :class:`AdaptedDense` (LoRA, MoE-LoRA), or a
        :class:`MoleDense` fed the block gate's ``mole_logits`` when there is one."""
        frozen = {
            "features": features,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "kernel_init": nn.initializers.normal(0.02),
            "kernel_axes": axes,
            "quant": self.quant,
            "use_bias": target in self.config.bias_targets,
            "name": PROJECTIONS[target].name,
        }
        adapter = self.adapter if target in self.targets else None
        if adapter is None:
            return FrozenDense(**frozen)(x)
        if adapter.kind is AdapterKind.MOLE:
            return MoleDense(**frozen, adapter=adapter)(x, mole_logits)
        return AdaptedDense(**frozen, adapter=adapter, deterministic=self.deterministic)(x)


class Attention(_LayerPart):
    """Grouped-query attention: ``num_heads`` query heads share ``num_kv_heads`` key/value heads."""

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache_index: jax.Array,
        layer_cache,
        mole_logits: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """``x: (B, T, d)``, ``mask: (B, T, S)`` bool -> ``(B, T, d)`` and the layer's updated ``(k, v)`` cache.

        Without a cache the keys are the ``T`` new tokens (``S == T``); with one, ``(B, S, kv, hd)`` slots of which
        the new tokens fill ``[cache_index, cache_index + T)``. With ``attention_impl="splash"`` and no cache,
        ``mask`` is instead the ``(B, T)`` segment ids :func:`moelora_jax.models.splash.splash_attention` takes.
        ``mole_logits``: a MoLE block gate's, for every adapted projection.
        """
        c = self.config
        batch, length, _ = x.shape
        q = self.project("q", x, c.num_heads * c.head_dim, ("embed", "heads"), mole_logits)
        k = self.project("k", x, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), mole_logits)
        v = self.project("v", x, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), mole_logits)
        q, k, v = (checkpoint_name(y, name) for y, name in zip((q, k, v), QKV_NAMES, strict=True))
        q = constrain(q.reshape(batch, length, c.num_heads, c.head_dim), ("batch", "length", "act_heads", "head_dim"))
        kv_names = ("batch", "length", "act_kv_heads", "head_dim")
        k = constrain(k.reshape(batch, length, c.num_kv_heads, c.head_dim), kv_names)
        if c.qk_norm:  # Qwen3, Gemma 3: each head of q and k normalised over head_dim, before the rotation
            q, k = self.norm("q_norm")(q), self.norm("k_norm")(k)
        v = constrain(v.reshape(batch, length, c.num_kv_heads, c.head_dim), kv_names)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            layer_cache = (k, v)
        k, v = k.astype(self.dtype), v.astype(self.dtype)
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        if self.attention_impl == "splash" and layer_cache is None:
            out = splash_attention(q, k, v, mask)
        elif c.attn_logit_softcap is not None:
            out = softcapped_attention(q, k, v, mask, scale or c.head_dim**-0.5, c.attn_logit_softcap)
        else:
            impl = "xla" if self.attention_impl == "splash" else self.attention_impl
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=impl)
        out = out.reshape(batch, length, -1)
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads")), "attention_out")
        return self.project("o", out, c.hidden_size, ("heads", "embed"), mole_logits), layer_cache


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping: values kept inside ``(-cap, cap)``); ``x`` when ``cap`` is
    None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def softcapped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, cap: float
) -> jax.Array:
    """Grouped-query attention with soft-capped scores, ``softmax(cap * tanh(scale q k^T / cap))`` under ``mask``.

    ``q: (B, T, H, hd)``, ``k, v: (B, S, K, hd)`` with ``H`` a multiple of ``K``, ``mask: (B, T, S)`` bool;
    returns ``(B, T, H, hd)``. Scores and the softmax are float32.
    """
    batch, length, heads, dim = q.shape
    groups = q.reshape(batch, length, k.shape[2], heads // k.shape[2], dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", groups, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], softcap(scores, cap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, heads, dim)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` whose backward keeps only its two inputs and recomputes the sigmoid: with
    ``s = sigmoid(gate)``, ``d/dgate = up * s * (1 + gate * (1 - s))`` and ``d/dup = gate * s``."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy):
    gate, up = residuals
    g32, dy32 = gate.astype(jnp.float32), dy.astype(jnp.float32)
    s = jax.nn.sigmoid(g32)
    dgate = dy32 * up.astype(jnp.float32) * s * (1 + g32 * (1 - s))
    return dgate.astype(gate.dtype), (dy32 * g32 * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(_LayerPart):
    """A gated MLP, ``down(act(gate(x)) * up(x))``: SwiGLU (``act = silu``) or Gemma's tanh-approximated GELU."""

    @nn.compact
    def __call__(self, x: jax.Array, mole_logits: jax.Array | None = None) -> jax.Array:
        c = self.config
        gate = self.project("gate", x, c.intermediate_size, ("embed", "mlp"), mole_logits)
        up = self.project("up", x, c.intermediate_size, ("embed", "mlp"), mole_logits)
        hidden = swiglu(gate, up) if c.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True) * up
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))
        return self.project("down", hidden, c.hidden_size, ("mlp", "embed"), mole_logits)


class DecoderLayer(_LayerPart):
    """One pre-norm block; the ``nn.scan`` body (``carry = x``). A MoLE block gate (``MoleConfig.gate == "block"``)
    reads the normalised block input and weighs the LoRAs of every adapted projection in the block."""

    @nn.compact
    def __call__(self, x, ropes, masks, cache_index, per_layer):
        """``ropes``: the rotary ``(cos, sin)``, and the sliding layers' where they differ (else None); ``masks``:
        the attention mask, and the sliding layers' where some layers slide and others do not (else None);
        ``per_layer``: this layer's ``(k, v)`` cache (or None) and whether it slides."""
        layer_cache, sliding = per_layer
        mask = masks[0] if masks[1] is None else jnp.where(sliding, masks[1], masks[0])
        cos, sin = ropes[0] if ropes[1] is None else (jnp.where(sliding, lo, gl) for gl, lo in zip(*ropes, strict=True))
        fields = {
            f: getattr(self, f)
            for f in (
                "config",
                "adapter",
                "targets",
                "dtype",
                "param_dtype",
                "deterministic",
                "attention_impl",
                "quant",
            )
        }
        sandwich = self.config.sandwich_norms  # Gemma: each branch's output normalised before the residual sum
        normed = self.norm("attn_norm")(x)
        mole_logits = None
        if self.adapter is not None and self.adapter.kind is AdapterKind.MOLE and self.adapter.gate == "block":
            mole_logits = MoleGate(self.adapter, "embed", partitioned=True, name="mole_gate")(normed)
        attn_out, layer_cache = Attention(**fields, name="attn")(
            normed, cos, sin, mask, cache_index, layer_cache, mole_logits
        )
        h = x + (self.norm("post_attn_norm")(attn_out) if sandwich else attn_out)
        mlp_in = checkpoint_name(self.norm("mlp_norm")(h), "mlp_in")
        mlp_out = MLP(**fields, name="mlp")(mlp_in, mole_logits)
        y = h + (self.norm("post_mlp_norm")(mlp_out) if sandwich else mlp_out)
        return constrain(y, ("batch", "length", "act_embed")), layer_cache


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """``(B, T)`` positions that restart at 0 wherever ``segment_ids: (B, T)`` changes along a row (each packed
    example counts from its own first token)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(changed, index, 0), axis=1)


def output_head(params: Any, config: LlamaConfig) -> jax.Array:
    """The ``(d, vocab)`` output projection in ``params``: the transposed embedding when tied, else ``lm_head``."""
    return params["embedding"].T if config.tie_word_embeddings else params["lm_head"]


class Llama(nn.Module):
    """LLaMA-family causal LM (any family of :data:`FAMILIES`, as its ``config`` says) with adapters on
    ``adapter_targets`` (any of ``q k v o gate up down``).

    ``dtype`` is the compute dtype (activations, matmul inputs); ``param_dtype`` the frozen weights' dtype;
    adapters are always float32 and logits always float32. ``remat``: ``"none"``, ``"full"`` (recompute each layer
    in the backward pass from its input), ``"dots"`` (keep only matmul outputs without batch dimensions),
    ``"save_qkv"`` (keep the :data:`QKV_NAMES` activations), ``"save_attention"`` (keep the :data:`ATTENTION_NAMES`
    ones) or ``"offload_attention"`` (those kept in host memory until the backward pass: on a TPU or GPU they leave
    the HBM; on a CPU host memory is the same memory). Every policy computes the same values and gradients.
    ``attention_impl``: ``jax.nn.dot_product_attention``'s ``"xla"`` or ``"cudnn"`` (GPU, float16/bfloat16; the
    flash kernel), or ``"splash"`` (TPU's kernel, :mod:`moelora_jax.models.splash`; decoding with a cache stays on
    XLA's); a sliding window takes ``"xla"`` only. ``quant``: the q/k/v/o and MLP kernels stored int8 or NF4
    (:mod:`moelora_jax.adapters.quantize`) and dequantized inside each projection's matmul; the embedding, the
    norms, the biases and the LM head stay in ``param_dtype``.
    """

    config: LlamaConfig
    adapter: AdapterConfig | MoleConfig | None = None
    adapter_targets: tuple[str, ...] = ("q", "k", "v", "o")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: Remat = "none"
    attention_impl: AttentionImpl = "xla"
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        check_targets("adapter_targets", tuple(self.adapter_targets))
        check_choice("remat", self.remat, REMAT_CHOICES)
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        c = self.config
        unsupported = {  # what XLA's attention supports and the fused kernels do not: by kernel
            "sliding window": (c.sliding_window is not None, ("cudnn", "splash")),
            "soft-capped attention scores": (c.attn_logit_softcap is not None, ("cudnn", "splash")),
            "query_pre_attn_scalar other than head_dim": (
                c.query_pre_attn_scalar not in (None, c.head_dim),
                ("splash",),
            ),
        }
        for what, (used, kernels) in unsupported.items():
            if used and self.attention_impl in kernels:
                raise UserError(
                    f"attention_impl={self.attention_impl!r} does not support {c.model_type}'s {what}: use "
                    "attention_impl='xla'."
                )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        output: Output = "logits",
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits ``(B, T, vocab)`` float32 for ``tokens: (B, T)`` (or what ``output`` asks for).

        Args:
          tokens: int token ids.
          attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding (left or right); all ones if None.
          positions: ``(B, T)`` rotary positions; by default each row counts its real tokens (``cumsum(mask) - 1``,
            continuing after what the cache already holds), so padding never shifts a sequence, and with
            ``segment_ids`` each segment counts from 0.
          segment_ids: ``(B, T)`` int, for packed rows: tokens attend only within their segment; 0 marks padding
            (then ``attention_mask`` defaults to ``segment_ids > 0``). Not with a cache.
          cache: with a ``KVCache``, the tokens are appended to it and ``(output, new_cache)`` is returned.
          deterministic: False enables adapter dropout (needs a ``"dropout"`` RNG).
          output: ``"logits"``; ``"last_logits"``, ``(B, 1, vocab)`` for the last position only (a prefill);
            ``"hidden"``, the final-normed ``(B, T, d)`` states in ``dtype``, to apply :func:`output_head` to.
        """
        c = self.config
        batch, length = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids > 0
        token_mask = attention_mask.astype(bool)
        if cache is None:
            prior, cache_index, valid = jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32), token_mask
            slots = length
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) cannot be decoded with a KV cache.")
            if length > cache.valid.shape[1]:
                raise ValueError(f"{length} tokens do not fit a KV cache of {cache.valid.shape[1]} slots.")
            prior, cache_index = jnp.sum(cache.valid, axis=1, dtype=jnp.int32), cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache_index))
            slots = cache.valid.shape[1]
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif positions is None:
            positions = jnp.maximum(prior[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
        if self.attention_impl == "splash" and cache is None:  # the kernel masks by segment ids, 0 for padding
            segments = token_mask.astype(jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            mask = jnp.where(token_mask, segments, 0)
        else:
            query_slot = cache_index + jnp.arange(length)
            mask = valid[:, None, :] & (jnp.arange(slots)[None, None, :] <= query_slot[None, :, None])
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        masks = (mask, None)
        if c.sliding_window is not None and self.attention_impl != "splash":
            # slots, like positions, are contiguous within a sequence
            window = mask & (jnp.arange(slots)[None, None, :] > query_slot[None, :, None] - c.sliding_window)
            masks = (mask, window) if c.sliding_layers else (window, None)
        ropes = (rope_cos_sin(positions, rope_inv_freq(c)), None)
        if c.local_rope_theta is not None:
            ropes = (ropes[0], rope_cos_sin(positions, rope_inv_freq(c, local=True)))

        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            self.param_dtype,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        if c.scale_embeddings:  # Gemma
            x = x * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))

        layer = DecoderLayer
        if self.remat != "none":
            layer = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0, ADAPTER_COLLECTION: 0, ROUTER_COLLECTION: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            config=c,
            adapter=self.adapter,
            targets=self.adapter_targets,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            deterministic=deterministic,
            attention_impl=self.attention_impl,
            quant=self.quant,
            name="layers",
        )
        sliding = jnp.asarray(c.sliding_layers or (False,) * c.num_layers)
        per_layer = (None if cache is None else (cache.k, cache.v), sliding)
        x, new_kv = stack(x, ropes, masks, cache_index, per_layer)
        x = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.norm_offset, name="final_norm")(x)
        if c.tie_word_embeddings:
            head = embedding.T
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                (c.hidden_size, c.vocab_size),
                self.param_dtype,
            )
        if output == "hidden":
            out = x
        elif output in ("logits", "last_logits"):
            out = constrain(
                lm_head(x[:, -1:] if output == "last_logits" else x, head, c.final_logit_softcap),
                ("batch", "length", "act_vocab"),
            )
        else:
            raise ValueError(f"output={output!r} must be 'logits', 'last_logits' or 'hidden'.")
        if cache is None:
            return out
        return out, KVCache(*new_kv, valid, cache_index + length)


def lm_head(hidden: jax.Array, head: jax.Array, cap: float | None = None) -> jax.Array:
    """float32 logits ``hidden @ head`` for ``hidden: (..., d)`` and ``head: (d, vocab)``, computed in ``hidden``'s
    dtype with float32 accumulation, soft-capped at ``cap`` (a config's ``final_logit_softcap``) when given."""
    return softcap(jnp.dot(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32), cap)


def init_variables(model: Llama, rng: jax.Array, collections: tuple[str, ...] = ("params", ADAPTER_COLLECTION)):
    """Random ``{"params": ..., "adapters": ...}`` (plain arrays) for ``model``, in one compiled program.

    Ask for ``collections=("adapters",)`` alone to initialise adapters for loaded weights: the compiler drops the
    unused base initialisation.
    """

    @jax.jit
    def init(rng):
        variables = nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32)))
        return {name: variables[name] for name in collections if name in variables}

    return init(rng)


def abstract_variables(model: Llama) -> dict[str, Any]:
    """Shapes and dtypes of ``init_variables``, boxed with their logical axis names (no computation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
