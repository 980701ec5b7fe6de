"""Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (and Llama with biases) against transformers' own classes: tiny random
checkpoints made offline by each family's PyTorch model, checked on padded and packed batches, in greedy generation,
through the merged and PEFT exports (and a warm start from the PEFT one), lm-eval against the harness's own model,
one ``train.py`` run, and as GGUF files written in llama.cpp's conventions."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import TINY_LLAMA
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from tiny_models import word_level_tokenizer
from train_cli import tiny_job, train, write_records

from moelora_jax import AdapterConfig, build_model, load_config, load_params, load_tokenizer
from moelora_jax.adapters.layers import MoleConfig
from moelora_jax.adapters.quantize import QuantConfig
from moelora_jax.errors import UserError
from moelora_jax.formats.merged import export_merged
from moelora_jax.formats.peft import export_peft
from moelora_jax.formats.warm_start import warm_adapters
from moelora_jax.models.generation import generate
from moelora_jax.models.gguf import GGUF_ARCHITECTURES, convert_gguf
from moelora_jax.models.llama import FAMILIES, TARGETS, LlamaConfig, abstract_variables, init_variables
from moelora_jax.models.shapes import SHAPES
from moelora_jax.parallel.sharding import DEFAULT_RULES, batch_sharding, logical_shardings, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {  # model_type, overrides; every case has one difference from Llama that its logits depend on
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}),
    "mistral-window-5": ("mistral", {"sliding_window": 5}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "gemma2": (  # caps low enough to bind on tiny logits; layers 0 and 2 slide, 1 does not
        "gemma2",
        {
            "num_hidden_layers": 3,
            "sliding_window": 5,
            "query_pre_attn_scalar": 6,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (  # 7 layers: the 6-layer local/global pattern does not divide them (layer 5 is global)
        "gemma3_text",
        {
            "num_hidden_layers": 7,
            "sliding_window": 5,
            "query_pre_attn_scalar": 6,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
        },
    ),
}
WITHOUT_DIFFERENCE = {  # each case's config with one of its differences taken out
    "qwen2": [{"bias_targets": ()}],
    "qwen3": [{"qk_norm": False}],
    "qwen3-attention-bias": [{"bias_targets": ()}],
    "mistral-window-5": [{"sliding_window": None}],
    "llama-biases": [{"bias_targets": ()}],
    "gemma2": [
        {"norm_offset": 0.0},
        {"hidden_act": "silu"},
        {"scale_embeddings": False},
        {"sandwich_norms": False},
        {"query_pre_attn_scalar": None},
        {"attn_logit_softcap": None},
        {"final_logit_softcap": None},
        {"sliding_layers": (False, False, False)},
    ],
    "gemma3": [
        {"qk_norm": False},
        {"local_rope_theta": None},
        {"rope_scaling": None},
        {"sliding_layers": (False,) * 7},
        {"sandwich_norms": False},
    ],
}


def _tiny(case: str, directory, seed: int = 0, tokenizer=None, spec=None):
    """Transformers' model of ``case`` (or of ``spec``, a ``(model_type, overrides)`` pair) with random weights, its
    biases and norm scales random too (transformers starts them at 0 and 1, where a loader that skipped them would
    pass), saved to ``directory``."""
    model_type, overrides = spec or CASES[case]
    family = FAMILIES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, family.config_class)(**{**TINY_LLAMA, **overrides})
    model = getattr(transformers, family.architecture)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return model, directory


@pytest.fixture(params=sorted(CASES))
def family(request, tmp_path):
    """``(case, transformers model, its directory)`` for each case."""
    model, directory = _tiny(request.param, tmp_path / request.param)
    return request.param, model, directory


def _padded(seed=0, batch=3, length=24):
    """Tokens with a full row, a left-padded row and a right-padded row."""
    tokens = np.random.RandomState(seed).randint(3, 96, (batch, length))
    mask = np.ones((batch, length), np.int32)
    mask[1, :9] = 0
    mask[2, -5:] = 0
    return tokens * mask, mask


def _torch_logits(model, tokens, mask=None):
    mask = np.ones_like(tokens) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.float().numpy()


def _load(directory):
    config = load_config(directory)
    return config, load_params(directory, config)


def test_each_family_reads_its_config_and_round_trips(family):
    case, _, directory = family
    config = load_config(directory)
    assert config.model_type == CASES[case][0]
    assert LlamaConfig.from_hf(config.to_hf()) == config
    assert type(config.to_hf()).__name__ == FAMILIES[config.model_type].config_class


def test_logits_equal_transformers_on_padded_batches_and_need_the_familys_difference(family):
    case, hf, directory = family
    config, params = _load(directory)
    tokens, mask = _padded()
    ours = np.asarray(jax.jit(build_model(config).apply)({"params": params}, tokens, mask))
    want = _torch_logits(hf, tokens, mask)
    valid = mask.astype(bool)
    assert np.abs(want[valid]).max() > 1.0  # logits large enough for 1e-4 to mean something
    np.testing.assert_allclose(ours[valid], want[valid], atol=1e-4 * np.abs(want[valid]).max(), rtol=0)
    for change in WITHOUT_DIFFERENCE[case]:  # the comparison above fails without any one of them
        plain = dataclasses.replace(config, **change)
        without = np.asarray(jax.jit(build_model(plain).apply)({"params": params}, tokens, mask))
        assert np.abs(without[valid] - want[valid]).max() > 1e-2, change


def test_packed_rows_equal_each_sequence_alone_in_transformers(family):
    _, hf, directory = family
    config, params = _load(directory)
    lengths = (7, 11)
    sequences = [np.random.RandomState(5 + i).randint(3, 96, n) for i, n in enumerate(lengths)]
    row = np.zeros((1, 22), np.int64)
    segments = np.zeros((1, 22), np.int32)
    row[0, :7], row[0, 7:18] = sequences
    segments[0, :7], segments[0, 7:18] = 1, 2
    ours = np.asarray(jax.jit(build_model(config).apply)({"params": params}, row, segment_ids=segments))[0]
    for got, sequence in zip((ours[:7], ours[7:18]), sequences, strict=True):
        want = _torch_logits(hf, sequence[None])[0]
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_greedy_generation_equals_transformers_generate(family):
    _, hf, directory = family
    config, params = _load(directory)
    tokens = np.random.RandomState(3).randint(3, 96, (3, 9))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :7] = 0
    tokens = tokens * mask
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            max_new_tokens=12,  # past the 5-token window: the cache must drop what slides out
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()[:, 9:]
    got = generate(build_model(config), {"params": params}, tokens, mask, max_new_tokens=12, eos_ids=(95,), pad_id=0)
    np.testing.assert_array_equal(np.asarray(got)[:, : want.shape[1]], want)


def _trained_adapters(model, seed=1, scale=0.3):
    adapters = init_variables(model, jax.random.key(seed), ("adapters",))["adapters"]
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def test_merged_and_peft_exports_load_in_transformers_and_peft_with_our_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    _, hf, directory = family
    config, params = _load(directory)
    adapter = AdapterConfig(num_experts=1, rank=4, alpha=8.0)
    model = build_model(config, adapter=adapter, adapter_targets=TARGETS)
    adapters = _trained_adapters(model)
    tokens, mask = _padded()
    valid = mask.astype(bool)
    ours = np.asarray(jax.jit(model.apply)({"params": params, "adapters": adapters}, tokens, mask))

    export_merged(tmp_path / "merged", params, adapters, adapter=adapter, targets=TARGETS, model_config=config)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == FAMILIES[config.model_type].architecture
    assert load_config(tmp_path / "merged") == config
    scale = np.abs(ours[valid]).max()
    np.testing.assert_allclose(_torch_logits(merged, tokens, mask)[valid], ours[valid], atol=1e-4 * scale, rtol=0)

    export_peft(tmp_path / "peft", adapters, adapter=adapter, targets=TARGETS, base_model=str(directory))
    base = _torch_logits(hf, tokens, mask)
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval(), tokens, mask)
    assert np.abs(theirs - base)[valid].max() > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(theirs[valid], ours[valid], atol=1e-4 * scale, rtol=0)

    fresh = jax.tree.map(np.zeros_like, adapters)  # a run warm-started from the PEFT export starts where it ended
    warm = warm_adapters(tmp_path / "peft", fresh, adapter=adapter, targets=TARGETS, model_config=config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), warm, adapters)


@pytest.mark.parametrize(
    "adapter", [AdapterConfig(num_experts=4, rank=2, top_k=2, mixer=True), MoleConfig(3, 2)], ids=["moe", "mole"]
)
def test_every_adapter_kind_on_every_projection_over_a_quantized_base(family, adapter):
    """Fresh adapters (B = 0; MoLE's frozen LoRAs zero) leave the int8 base model's logits as they are, and every
    new leaf has logical axis names for the sharding rules."""
    _, _, directory = family
    config = load_config(directory)
    quant = QuantConfig("int8")
    params = load_params(directory, config, quant=quant)
    base = build_model(config, quant=quant)
    model = build_model(config, adapter=adapter, adapter_targets=TARGETS, quant=quant)
    variables = init_variables(model, jax.random.key(0))
    flat = traverse_util.flatten_dict(variables["params"]) | traverse_util.flatten_dict(params)
    variables["params"] = traverse_util.unflatten_dict(flat)  # MoLE's (zero) LoRAs beside the loaded weights
    tokens, mask = _padded()
    want = np.asarray(jax.jit(base.apply)({"params": params}, tokens, mask))
    got = np.asarray(jax.jit(model.apply)(variables, tokens, mask))
    np.testing.assert_allclose(got, want, atol=1e-5)
    boxed = jax.tree.leaves(abstract_variables(model), is_leaf=lambda x: hasattr(x, "names"))
    assert all(hasattr(leaf, "names") for leaf in boxed)


def test_one_training_step_through_train_py(tmp_path, word_tokenizer):
    """Every family trains through the command, with nothing but ``model.path`` to say which it is."""
    records = [{"prompt": "what colour is the sky ?", "response": "blue", "label": "blue"}] * 8
    data = write_records(tmp_path, records)
    for case in ("qwen2", "qwen3", "mistral-window-5", "gemma2", "gemma3"):
        _, directory = _tiny(case, tmp_path / case, tokenizer=word_tokenizer)
        result = train(tmp_path / f"run-{case}", *tiny_job(directory, data), "--config.train.steps=1")
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / f"run-{case}" / "export" / "adapters").is_dir()


@pytest.mark.parametrize("case", ["qwen2", "gemma2", "gemma3"])
def test_lm_eval_answers_equal_lm_evals_hugging_face_model(case, tmp_path, word_tokenizer):
    """Loglikelihoods (Gemma 2's final logits soft-capped), greedy flags and generations through our lm-eval model
    equal lm-eval's own ``HFLM`` on transformers' model."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moelora_jax.evaluation.lm_eval_model import MoeloraLM

    _, directory = _tiny(case, tmp_path / case, tokenizer=word_tokenizer)
    requests = [("the answer is", " a"), ("what colour is the sky ?", " the answer is blue ."), ("why", " ? ?")]
    loglikelihood = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    generation = [Instance("generate_until", {}, ("the answer is", {"until": ["?"], "max_gen_toks": 6}), 0)]
    ours = MoeloraLM(model=str(directory), batch_size=2, length_bucket=4)
    theirs = HFLM(pretrained=str(directory), device="cpu", batch_size=2, add_bos_token=True)
    got, want = ours.loglikelihood(loglikelihood), theirs.loglikelihood(loglikelihood)
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in want], rtol=1e-4, atol=1e-4)
    assert [g for _, g in got] == [g for _, g in want]
    assert ours.generate_until(generation) == theirs.generate_until(generation)


def test_unsupported_family_options_fail_in_one_line():
    with pytest.raises(UserError, match=r"model_type='gpt2' is not supported: the supported families are llama, "):
        LlamaConfig.from_hf({"model_type": "gpt2"})
    qwen = transformers.Qwen2Config(**TINY_LLAMA, use_sliding_window=True, sliding_window=4).to_dict()
    with pytest.raises(UserError, match="use_sliding_window=True is not supported for qwen2"):
        LlamaConfig.from_hf(qwen)
    mistral = LlamaConfig(96, 32, 64, 2, 4, 2, 8, model_type="mistral", sliding_window=5)
    for impl in ("cudnn", "splash"):
        with pytest.raises(UserError, match=rf"attention_impl='{impl}' does not support mistral's sliding window"):
            build_model(mistral, attention_impl=impl)
    gemma = dataclasses.replace(mistral, model_type="gemma2", sliding_window=None, attn_logit_softcap=50.0)
    with pytest.raises(
        UserError, match="attention_impl='cudnn' does not support gemma2's soft-capped attention scores"
    ):
        build_model(gemma, attention_impl="cudnn")


def test_the_published_shapes_of_the_new_families_are_their_config_jsons():
    assert SHAPES["qwen2.5-7b"].bias_targets == ("q", "k", "v") and SHAPES["qwen2.5-7b"].num_kv_heads == 4
    assert SHAPES["qwen3-8b"].qk_norm and SHAPES["qwen3-8b"].head_dim == 128
    assert SHAPES["mistral-7b"].model_type == "mistral" and SHAPES["mistral-7b"].vocab_size == 32768
    gemma = SHAPES["gemma-3-4b"]
    assert gemma.sliding_layers.count(False) == 5 and not gemma.sliding_layers[5]  # 34 layers: 5 global
    assert LlamaConfig.from_hf(gemma.to_hf()) == gemma


@pytest.mark.parametrize("case", ["qwen3-attention-bias", "mistral-window-5", "gemma2", "gemma3"])
def test_sharded_forward_equals_unsharded(case, tmp_path):
    """data x fsdp x tensor = 2 x 2 x 2 over 8 CPU devices: the biases and q/k norms placed by their logical axes."""
    _, directory = _tiny(case, tmp_path)
    config, params = _load(directory)
    model = build_model(config, adapter=AdapterConfig(num_experts=4, rank=2, top_k=2), adapter_targets=TARGETS)
    variables = init_variables(model, jax.random.key(0))
    variables = {"params": params, "adapters": jax.tree.map(lambda x: x + 0.05, variables["adapters"])}
    tokens, mask = _padded(batch=4, length=16)
    want = np.asarray(jax.jit(model.apply)(variables, tokens, mask))

    mesh = make_mesh(2, 2, 2, devices=jax.devices("cpu")[:8])
    shardings = logical_shardings(abstract_variables(model), mesh)
    attn = shardings["params"]["layers"]["attn"]
    if config.bias_targets:
        assert attn["q_proj"]["bias"].spec == P(None, "tensor")
    if config.qk_norm:
        assert attn["q_norm"]["scale"].spec == P(None, None)  # (layers, head_dim): replicated
    batch = batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        forward = jax.jit(model.apply, out_shardings=jax.sharding.NamedSharding(mesh, P()))
        got = forward(jax.device_put(variables, shardings), jax.device_put(tokens, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)  # float32 reordered


def _qwen_tokenizer():
    """A word-level tokenizer in Qwen's conventions: no BOS, ``<|im_end|>`` ending a turn (its eos), ``<|endoftext|>``
    padding, and a ChatML template."""
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4, "the": 5, "sky": 6}
    vocab |= {"is": 7, "blue": 8, "?": 9, "<unk>": 10}
    template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "<|im_start|> assistant "
    )
    return word_level_tokenizer(vocab, ["<|im_start|>"], template, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_qwen_conventions_come_from_its_files(tmp_path):
    """No BOS before the prompt, ``<|im_end|>`` learned after the response, and generation stopping at it and at the
    ends ``config.json`` and ``generation_config.json`` name."""
    from moelora_jax.data.encoding import Example, encode_examples
    from moelora_jax.models.generation import end_ids

    tokenizer = _qwen_tokenizer()
    (encoded,), _ = encode_examples(tokenizer, [Example("the sky is ?", "blue")], 32)
    assert encoded.tokens.tolist() == [1, 3, 5, 6, 7, 9, 2, 1, 4, 8, 2]
    assert encoded.loss_mask.tolist() == [False] * 9 + [True, True]  # the answer and the <|im_end|> after it

    _, directory = _tiny("qwen2", tmp_path / "qwen", tokenizer=tokenizer)
    config_json = directory / "config.json"
    config_json.write_text(config_json.read_text().replace('"eos_token_id": 2', '"eos_token_id": 0'))
    transformers.GenerationConfig(eos_token_id=[2, 0]).save_pretrained(directory)
    config = load_config(directory)
    assert config.eos_token_ids == (0, 2)
    assert end_ids(config, tokenizer) == (0, 2)
    assert end_ids(dataclasses.replace(config, eos_token_ids=(0,)), tokenizer) == (0, 2)  # the tokenizer's end too


def test_a_multimodal_gemma3_loads_and_exports_its_language_model(tmp_path):
    """``model_type: gemma3`` (4B and up): the language model read from ``text_config`` and the
    ``language_model.*`` tensors, our logits equal to the whole model's on text, and the merged export a
    text-only ``Gemma3ForCausalLM``."""
    _, overrides = CASES["gemma3"]
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.Gemma3Config(
        text_config={**TINY_LLAMA, **overrides},
        vision_config={**vision, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4,
        boi_token_index=93,
        eoi_token_index=94,
        image_token_index=95,
    )
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "gemma3")
    ours_config, params = _load(tmp_path / "gemma3")
    assert ours_config.model_type == "gemma3_text" and ours_config.local_rope_theta == 10.0
    tokens = np.random.RandomState(0).randint(3, 90, (2, 24))
    want = _torch_logits(hf, tokens)
    ours = np.asarray(jax.jit(build_model(ours_config).apply)({"params": params}, tokens))
    np.testing.assert_allclose(ours, want, atol=1e-4 * np.abs(want).max(), rtol=0)

    adapter = AdapterConfig(num_experts=1, rank=4, alpha=8.0)
    model = build_model(ours_config, adapter=adapter, adapter_targets=TARGETS)
    adapters = _trained_adapters(model)
    adapted = np.asarray(jax.jit(model.apply)({"params": params, "adapters": adapters}, tokens))
    export_merged(tmp_path / "merged", params, adapters, adapter=adapter, targets=TARGETS, model_config=ours_config)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(_torch_logits(merged, tokens), adapted, atol=1e-4 * np.abs(adapted).max(), rtol=0)


def test_gemma_conventions_one_bos_and_end_of_turn_learned():
    """Gemma's template writes ``<bos>`` itself (not added twice) and ends a turn with ``<end_of_turn>``, which is
    what a response learns to end with where the model stops at it (its generation_config lists it)."""
    from moelora_jax.data.encoding import Example, encode_examples, turn_end_id

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4, "user": 5, "model": 6}
    vocab |= {"the": 7, "sky": 8, "is": 9, "blue": 10, "?": 11, "<unk>": 12}
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else "
        "m['role'] }} {{ m['content'] }} <end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> "
        "model {% endif %}"
    )
    tokenizer = word_level_tokenizer(
        vocab,
        ["<start_of_turn>", "<end_of_turn>"],
        template,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    end = turn_end_id(tokenizer, (1, 4))
    assert end == 4 and turn_end_id(tokenizer, (1,)) == 1  # only an end the model stops at
    (encoded,), _ = encode_examples(tokenizer, [Example("the sky is ?", "blue")], 32, end_id=end)
    assert encoded.tokens.tolist() == [2, 3, 5, 7, 8, 9, 11, 4, 3, 6, 10, 4]
    assert encoded.loss_mask.tolist() == [False] * 10 + [True, True]


# ------------------------------------------------------------------------------------ GGUF, as llama.cpp writes it

GGUF_CASES = {  # case -> (GGUF architecture, transformers' model); Gemma's scalars are the ones llama.cpp assumes
    "llama-biases": ("llama", CASES["llama-biases"]),
    "mistral": ("llama", ("mistral", {"sliding_window": None})),  # written as llama, which carries no window
    "qwen2": ("qwen2", CASES["qwen2"]),
    "qwen3-attention-bias": ("qwen3", CASES["qwen3-attention-bias"]),
    "gemma2": ("gemma2", ("gemma2", {**CASES["gemma2"][1], "query_pre_attn_scalar": 8})),
    "gemma3": (
        "gemma3",
        (
            "gemma3_text",
            {
                **CASES["gemma3"][1],
                "query_pre_attn_scalar": 8,
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
            },
        ),
    ),
}


def _interleave_rotary(w, n_heads):
    """llama.cpp's Q/K row order for ``llama`` files: within each head, row ``j`` of the first rotary half, then
    row ``j`` of the second, for each ``j``."""
    halves = w.reshape(n_heads, 2, -1, *w.shape[1:])
    return np.stack([halves[:, 0], halves[:, 1]], axis=2).reshape(w.shape)


def _gguf_tokens(gemma):
    """A 96-token vocabulary: the family's special tokens (an end-of-turn one among them), then single
    characters; sentencepiece-style for Gemma, byte-level (with one merge) otherwise."""
    import gguf

    if gemma:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        chars = ["\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        chars = ["\u0120", *"abcdefghijklmnopqrstuvwxyz", "ab"]  # "ab": the one merge's result
    chars += [chr(c) for c in range(ord("A"), ord("A") + 96 - len(specials) - len(chars))]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * len(chars)
    return specials + chars, [int(t) for t in types]


def _write_gguf(hf, arch, path):
    """``hf`` (a transformers model) as a float32 GGUF in llama.cpp's conventions for ``arch``: its key names,
    tensor names, rotary-interleaved Q/K for ``llama`` and Gemma's norms stored as ``1 + w``."""
    import gguf

    c = hf.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    gemma = arch.startswith("gemma")
    if gemma:
        writer.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    tokens, types = _gguf_tokens(gemma)
    writer.add_tokenizer_model("llama" if gemma else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if gemma:
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_pad_token_id(0)
    else:
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_merges(["a b"])
        writer.add_eos_token_id(0)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm" if gemma else "ffn_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    for name, tensor in hf.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        if module == "lm_head" and c.tie_word_embeddings:
            continue
        parts = module.split(".")
        stem = names[module] if module in names else f"blk.{parts[2]}.{block['.'.join(parts[3:])]}"
        w = tensor.float().numpy()
        if arch == "llama" and stem.endswith(("attn_q", "attn_k")):
            w = _interleave_rotary(w, c.num_attention_heads if stem.endswith("q") else c.num_key_value_heads)
        if gemma and stem.endswith("norm"):
            w = w + 1.0
        writer.add_tensor(f"{stem}.{suffix}", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_written_as_llama_cpp_does_converts_to_transformers_logits(case, tmp_path):
    """Each family's GGUF (written with ``gguf``'s writer in llama.cpp's conventions) converts to our model with
    transformers' logits: the family and its shape read from the file's metadata, and its end-of-turn token one of
    the end ids."""
    arch, spec = GGUF_CASES[case]
    hf, _ = _tiny(case, tmp_path / "hf", spec=spec)
    directory = convert_gguf(_write_gguf(hf, arch, tmp_path / "model.gguf"), tmp_path / "converted")
    config, params = _load(directory)
    assert config.model_type == GGUF_ARCHITECTURES[arch].model_type
    ids = ("model_type", "bos_token_id", "eos_token_ids", "pad_token_id", "rms_norm_eps")  # eps: float32 in GGUF
    expected = dataclasses.replace(LlamaConfig.from_hf(hf.config), **{name: getattr(config, name) for name in ids})
    assert config == expected and np.float32(config.rms_norm_eps) == np.float32(hf.config.rms_norm_eps)
    tokens, mask = _padded()
    ours = np.asarray(jax.jit(build_model(config).apply)({"params": params}, tokens, mask))
    want = _torch_logits(hf, tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], want[valid], atol=1e-4 * np.abs(want[valid]).max(), rtol=0)
    turn_end = "<end_of_turn>" if arch.startswith("gemma") else "<|im_end|>"
    assert load_tokenizer(directory).convert_tokens_to_ids(turn_end) in config.eos_token_ids


def test_a_gguf_of_another_architecture_is_refused_in_one_line(tmp_path):
    hf, _ = _tiny("qwen2", tmp_path / "hf")
    path = _write_gguf(hf, "phi3", tmp_path / "phi3.gguf")
    with pytest.raises(UserError, match=r"GGUF architecture 'phi3' is not supported: the supported ones are llama"):
        convert_gguf(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
