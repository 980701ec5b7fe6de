"""Published architectures by name, for work that needs a model's shapes but not its weights: the compile check,
benchmarks on random weights, memory estimates. Each entry is the architecture part of the model's public
``config.json`` (token ids play no part in shapes)."""

from __future__ import annotations

import dataclasses

from moelora_jax.errors import UserError
from moelora_jax.models.llama import LinearRopeScaling, Llama3RopeScaling, LlamaConfig

_LLAMA_3_2_1B = LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=Llama3RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    tie_word_embeddings=True,
    max_position_embeddings=131072,
)
_LLAMA_3_1_8B = dataclasses.replace(
    _LLAMA_3_2_1B,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    head_dim=128,
    rope_scaling=dataclasses.replace(_LLAMA_3_2_1B.rope_scaling, factor=8.0),
    tie_word_embeddings=False,
)


def _gemma3(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> LlamaConfig:
    """A Gemma 3 language model (4B and up): five sliding layers (window 1024, rotary base 10^4) to each global
    one (base 10^6, positions scaled 8x), (1 + w) norms around each branch and on q and k, GELU."""
    return LlamaConfig(
        vocab_size=262208,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=LinearRopeScaling(8.0),
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        model_type="gemma3_text",
        qk_norm=True,
        sliding_window=1024,
        sliding_layers=tuple((i + 1) % 6 != 0 for i in range(layers)),
        norm_offset=1.0,
        hidden_act="gelu_pytorch_tanh",
        scale_embeddings=True,
        sandwich_norms=True,
        query_pre_attn_scalar=256,
        local_rope_theta=10000.0,
    )


SHAPES: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": _LLAMA_3_2_1B,
    "llama-3.2-3b": dataclasses.replace(_LLAMA_3_2_1B, hidden_size=3072, num_layers=28, num_heads=24, head_dim=128),
    "llama-3.1-8b": _LLAMA_3_1_8B,
    "llama-3.1-70b": dataclasses.replace(
        _LLAMA_3_1_8B, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64
    ),
    "qwen2.5-7b": LlamaConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        model_type="qwen2",
        bias_targets=("q", "k", "v"),
    ),
    "qwen3-8b": LlamaConfig(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        model_type="qwen3",
        qk_norm=True,
    ),
    "mistral-7b": LlamaConfig(  # v0.3: no sliding window
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        model_type="mistral",
    ),
    "gemma-3-4b": _gemma3(hidden=2560, intermediate=10240, layers=34, heads=8, kv_heads=4),
    "gemma-3-12b": _gemma3(hidden=3840, intermediate=15360, layers=48, heads=16, kv_heads=8),
}
"""Name -> architecture: SmolLM2-135M, Llama-3.2-1B and 3B, Llama-3.1-8B and 70B, Qwen2.5-7B, Qwen3-8B,
Mistral-7B-v0.3, and the language models of Gemma-3-4B and 12B."""


def published_shape(name: str) -> LlamaConfig:
    """The architecture published as ``name`` (a key of :data:`SHAPES`)."""
    if name not in SHAPES:
        raise UserError(f"no published shape named {name!r}: choose one of {', '.join(SHAPES)}.")
    return SHAPES[name]
