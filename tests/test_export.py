"""Adapter exports checked by the libraries that read them: PEFT on transformers' LLaMA, transformers alone for
merged weights, and our own reader for MoE-LoRA; plus our safetensors writer against PyTorch's reader."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from moelora_jax import AdapterConfig
from moelora_jax.errors import UserError
from moelora_jax.export import export_adapters, export_merged, export_peft, load_adapters, merge_adapters
from moelora_jax.models.llama import TARGETS, Llama, init_variables
from moelora_jax.pretrained import SafetensorsFile, load_config, load_params, save_safetensors

torch = pytest.importorskip("torch")


def _trained_adapters(model, seed=1):
    """Random adapters with a non-zero B (as after training), so every factor matters."""
    adapters = init_variables(model, jax.random.key(seed), ("adapters",))["adapters"]
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


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
    with pytest.raises(UserError, match=r"needs plain LoRA .* mixes 4 experts"):
        export_peft(tmp_path / "p", adapters, adapter=adapter, targets=targets)
    with pytest.raises(UserError, match="needs plain LoRA"):
        merge_adapters(params, adapters, adapter=adapter, targets=targets)
    assert not (tmp_path / "p").exists()
    with pytest.raises(UserError, match=r"is not an adapter export: it needs adapters\.json and adapters\.safetensors"):
        load_adapters(tmp_path)


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
