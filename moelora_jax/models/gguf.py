"""GGUF files (llama.cpp) as Hugging Face directories: the configuration, float32 weights and tokenizer a file
describes, for the architectures llama.cpp writes our families as (:data:`GGUF_ARCHITECTURES`). Read with ``gguf``
and transformers' tokenizer converter; torch is never imported.

llama.cpp's conventions, undone here: the file's metadata is the config, under ``<architecture>.<key>`` names, and
what it leaves out is fixed per architecture in llama.cpp's loader (Gemma 2 slides on every 2nd layer and Gemma 3
on 5 of every 6, Gemma 3's sliding layers rotate with base 10000, and a Gemma scales its scores by
``head_dim ** -0.5`` except the 27B, by ``(hidden / heads) ** -0.5``); ``llama`` files interleave each head's two
rotary halves in the Q/K rows; Gemma's ``(1 + w)`` RMSNorm scales are stored as ``1 + w``. Mistral is written as
``llama`` (its sliding window is not in the file), so it loads as Llama, which computes the same.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from moelora_jax.errors import UserError
from moelora_jax.io.atomic import atomic_directory
from moelora_jax.io.safetensors import save_safetensors
from moelora_jax.models.llama import FAMILIES, PROJECTIONS, LlamaConfig


@dataclasses.dataclass(frozen=True)
class GgufArchitecture:
    """How llama.cpp writes one family: its ``model_type``; whether Q/K rows are rotary-interleaved; the offset
    stored in every ``*norm.weight``; the sliding-window period (every ``period``-th layer attends globally; 0: no
    sliding layers); the number of layers of its 27B, whose scores llama.cpp scales by ``(hidden / heads) ** -0.5``."""

    model_type: str
    interleaved_rotary: bool = False
    norm_shift: float = 0.0
    sliding_period: int = 0
    layers_of_27b: int | None = None


GGUF_ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture("llama", interleaved_rotary=True),
    "qwen2": GgufArchitecture("qwen2"),
    "qwen3": GgufArchitecture("qwen3"),
    "gemma2": GgufArchitecture("gemma2", norm_shift=1.0, sliding_period=2, layers_of_27b=46),
    "gemma3": GgufArchitecture("gemma3_text", norm_shift=1.0, sliding_period=6, layers_of_27b=62),
}
"""GGUF ``general.architecture`` -> how to read it."""

GEMMA3_LOCAL_ROPE_THETA = 10000.0
"""Gemma 3's sliding layers' rotary base, which its GGUF files do not state (llama.cpp fixes it)."""

END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
"""Tokens that end a chat turn: llama.cpp stops generation at them, so they join the file's end-of-sequence id."""

_TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PROJECTIONS = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
_BLOCK_NAMES = {gguf: PROJECTIONS[target].hf_module for gguf, target in _PROJECTIONS.items()} | {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_SANDWICH_BLOCK_NAMES = _BLOCK_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
"""llama.cpp's tensor names (``blk.{i}.<name>`` in a block) -> Hugging Face's; Gemma's norms sit around both
branches."""


def _value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: Any, path: Path) -> tuple[str, GgufArchitecture]:
    name = _value(reader, "general.architecture")
    if name not in GGUF_ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture {name!r} is not supported: the supported ones are "
            f"{', '.join(GGUF_ARCHITECTURES)} (load other models from their Hugging Face directories)."
        )
    return name, GGUF_ARCHITECTURES[name]


def _end_ids(reader: Any) -> list[int]:
    """The file's end-of-sequence id, then every end-of-turn token in its vocabulary."""
    tokens = _value(reader, "tokenizer.ggml.tokens", [])
    eos = _value(reader, "tokenizer.ggml.eos_token_id")
    turn_ends = [i for i, token in enumerate(tokens) if token in END_OF_TURN_TOKENS]
    return ([] if eos is None else [eos]) + [i for i in turn_ends if i != eos]


def _hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` contents a GGUF's metadata (and tensor names) describe."""
    name, arch = _architecture(reader, path)
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UserError(f"{path}: GGUF with rope_freqs (Llama 3.1 scaling) is not supported; use the HF directory.")

    def key(suffix: str, default: Any = None) -> Any:
        return _value(reader, f"{name}.{suffix}", default)

    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    head_dim = key("attention.key_length", hidden // heads)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope |= {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise UserError(f"{path}: GGUF rope scaling {scaling!r} is not supported: only 'linear' is.")
    end_ids = _end_ids(reader)
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "vocab_size": key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "max_position_embeddings": key("context_length", 4096),
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": end_ids[0] if len(end_ids) == 1 else (end_ids or None),
        "pad_token_id": _value(reader, "tokenizer.ggml.padding_token_id"),
    }
    if FAMILIES[arch.model_type].attention_bias:
        config["attention_bias"] = "blk.0.attn_output.bias" in tensor_names
    if arch.model_type == "llama":
        config["mlp_bias"] = "blk.0.ffn_down.bias" in tensor_names
    if FAMILIES[arch.model_type].gemma:  # what the file leaves out keeps transformers' default, as it keeps llama.cpp's
        window = key("attention.sliding_window")
        config |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": [
                "sliding_attention" if window and (i + 1) % arch.sliding_period else "full_attention"
                for i in range(layers)
            ],
            "query_pre_attn_scalar": hidden // heads if layers == arch.layers_of_27b else head_dim,
        }
        optional = {
            "sliding_window": window,
            "attn_logit_softcapping": key("attn_logit_softcapping"),
            "final_logit_softcapping": key("final_logit_softcapping"),
        }
        config |= {k: v for k, v in optional.items() if v is not None}
    if arch.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}
        config["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    return config


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (each head's two rotary halves interleaved) back to Hugging Face's: a weight's
    rows or a bias's entries, ``(n_heads, head_dim / 2, 2) -> (n_heads, 2, head_dim / 2)``."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(reader: Any, arch: GgufArchitecture, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantized to float32, under its Hugging Face name and in its layout."""
    from gguf.quants import dequantize

    block = _SANDWICH_BLOCK_NAMES if config.sandwich_norms else _BLOCK_NAMES
    out = {}
    for t in reader.tensors:
        stem, suffix = t.name.rsplit(".", 1)
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in block:
            hf = f"model.layers.{parts[1]}.{block[parts[2]]}.{suffix}"
        elif stem in _TENSOR_NAMES:
            hf = f"{_TENSOR_NAMES[stem]}.{suffix}"
        else:
            raise UserError(f"GGUF tensor {t.name!r} is not part of a {config.model_type} model.")
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(int(d) for d in t.shape[::-1]))
        if arch.interleaved_rotary and parts[-1] in ("attn_q", "attn_k"):
            w = _unpermute_rotary(w, config.num_heads if parts[-1] == "attn_q" else config.num_kv_heads)
        if arch.norm_shift and stem.endswith("norm"):
            w = w - np.float32(arch.norm_shift)
        out[hf] = w
    return out


_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def gguf_tokenizer(reader: Any) -> Any:
    """The tokenizer a GGUF describes (vocabulary, merges, token types, pre-tokenizer, special tokens, chat
    template), built by transformers' GGUF converter from metadata read with ``gguf`` (transformers' own GGUF
    reader would import torch)."""
    import transformers
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    groups = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    spec, options = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in spec:
        raise UserError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens).")
    if spec.get("tokenizer_type") == "llama":
        options.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies by default
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        options[name] = None if token_id is None else spec["tokens"][token_id]
    backend, extra = convert_gguf_tokenizer(_value(reader, "general.architecture"), spec)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **options, **extra)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a GGUF model as a Hugging Face directory (config.json, float32 model.safetensors, tokenizer files).

    The directory appears atomically: it is built beside ``out_dir`` and renamed into place when complete.
    """
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} not found.")
    reader = gguf.GGUFReader(gguf_path)
    _, arch = _architecture(reader, gguf_path)
    config = LlamaConfig.from_hf(_hf_config(reader, gguf_path))
    with atomic_directory(out_dir) as tmp:
        config.to_hf().save_pretrained(tmp)
        save_safetensors(tmp / "model.safetensors", _hf_tensors(reader, arch, config))
        gguf_tokenizer(reader).save_pretrained(tmp)
    return out_dir
