"""The lm-evaluation-harness model (:mod:`moelora_jax.evaluation.lm_eval_model`) against direct computations with our
model and against lm-eval's own Hugging Face model, and the ``python -m moelora_jax.evaluate`` command on the local
CSQA tasks."""

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_LLAMA

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval import utils as lm_eval_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from moelora_jax import AdapterConfig  # noqa: E402
from moelora_jax.errors import UserError  # noqa: E402
from moelora_jax.evaluate import TASKS_DIR, commonsenseqa_dataset, main, task_manager  # noqa: E402
from moelora_jax.evaluation.lm_eval_model import MoeloraLM  # noqa: E402
from moelora_jax.formats.native import export_adapters  # noqa: E402
from moelora_jax.models.llama import Llama, init_variables  # noqa: E402
from moelora_jax.models.pretrained import load_config, load_params  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DIRECT_LENGTH = 32  # the one row length of the direct computations (one compiled program)
ADAPTER = AdapterConfig(num_experts=4, rank=2, top_k=2)
TARGETS = ("q", "v", "down")
REQUESTS = [  # (context, continuation); the first three share a row, as a multiple-choice question's letters do
    ("the answer is", " a"),
    ("the answer is", " b"),
    ("the answer is", " c"),
    ("what colour is the sky ?", " the answer is blue ."),
    ("", " yes no"),  # an empty context reads the prefix (BOS) token
    ("question : why", " ?"),
    ("why ", "why why"),  # the context's trailing space moves into the continuation
]
CSQA_ROWS = [
    {
        "answerKey": key,
        "id": f"q{i}",
        "question": {
            "question_concept": "sky",
            "stem": stem,
            "choices": [{"label": label, "text": text} for label, text in zip("ABCDE", choices, strict=True)],
        },
    }
    for i, (key, stem, choices) in enumerate(
        [
            ("A", "what colour is the sky ?", ["blue", "yes", "no", "the answer", "a b c"]),
            ("C", "why ?", ["a", "b", "c", "the sky", "title"]),
            ("B", "the answer is what ?", ["passage", "yes", "no", "blue", "question"]),
        ]
    )
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_tokenizer):
    """A tiny random LLaMA whose vocabulary is exactly the word tokenizer's (so every greedy token is a word)."""
    directory = tmp_path_factory.mktemp("lm-eval-model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(word_tokenizer)})
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """``(export directory, adapters tree)``: random MoE-LoRA adapters with non-zero B, exported as training does."""
    config = load_config(model_dir)
    tree = init_variables(Llama(config, adapter=ADAPTER, adapter_targets=TARGETS), jax.random.key(1), ("adapters",))
    leaves, structure = jax.tree.flatten(tree["adapters"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    tree = structure.unflatten([0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    directory = tmp_path_factory.mktemp("export") / "adapters"
    export_adapters(directory, tree, adapter=ADAPTER, targets=TARGETS, model_config=config, base_model=str(model_dir))
    return directory, tree


@pytest.fixture(scope="module")
def lm(model_dir):
    return MoeloraLM(model=str(model_dir), batch_size=2, length_bucket=4)


def _instances(kind, args):
    return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


@functools.cache
def _forward(model_dir, with_adapters):
    """Our model's jitted forward pass over one right-padded row of ``DIRECT_LENGTH`` tokens, and its variables, built
    from the files (not from the lm-eval model)."""
    config = load_config(model_dir)
    model = Llama(config, adapter=ADAPTER, adapter_targets=TARGETS) if with_adapters else Llama(config)
    return jax.jit(model.apply), {"params": load_params(model_dir, config)}


def _direct_logits(model_dir, tokens, adapters=None):
    """``(T, V)`` logits of our model for one token sequence (``T <= DIRECT_LENGTH``; right padding is invisible to
    the real tokens of a causal model)."""
    apply, variables = _forward(model_dir, adapters is not None)
    if adapters is not None:
        variables = {**variables, "adapters": adapters}
    row, mask = np.zeros((1, DIRECT_LENGTH), np.int32), np.zeros((1, DIRECT_LENGTH), np.int32)
    row[0, : len(tokens)], mask[0, : len(tokens)] = tokens, 1
    return np.asarray(apply(variables, row, mask)[0, : len(tokens)])


def _split(tokenizer, context, continuation):
    """lm-eval's causal tokenization: ``context + continuation`` encoded whole, split at the context's length."""
    if not context:
        return [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head) :]


def _direct_loglikelihood(model_dir, tokenizer, context, continuation, adapters=None):
    """``(sum_i log softmax(z_{t_i})[c_i], all c_i greedy)`` from one forward pass over ``context + continuation``."""
    head, tail = _split(tokenizer, context, continuation)
    tokens = head + tail
    logits = _direct_logits(model_dir, tokens, adapters)
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    positions = range(len(head) - 1, len(tokens) - 1)
    total = sum(float(logprobs[p, tokens[p + 1]]) for p in positions)
    return total, all(int(np.argmax(logits[p])) == tokens[p + 1] for p in positions)


@pytest.mark.parametrize("with_adapters", [False, True])
def test_loglikelihood_equals_the_direct_computation(model_dir, word_tokenizer, adapters, lm, with_adapters):
    directory, tree = adapters
    if with_adapters:
        lm = MoeloraLM(model=str(model_dir), adapters=str(directory), batch_size=2, length_bucket=4)
    got = lm.loglikelihood(_instances("loglikelihood", REQUESTS), disable_tqdm=True)
    want = [
        _direct_loglikelihood(model_dir, word_tokenizer, c, x, tree if with_adapters else None) for c, x in REQUESTS
    ]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    if with_adapters:
        base = [_direct_loglikelihood(model_dir, word_tokenizer, c, x)[0] for c, x in REQUESTS]
        assert np.abs(np.subtract(base, [g[0] for g in got])).max() > 1e-2  # the adapters change every answer


def test_greedy_flag_marks_exactly_the_argmax_continuation(model_dir, word_tokenizer, lm):
    context = "what colour is the sky ?"
    tokens = word_tokenizer.encode(context)
    for _ in range(3):  # the model's own greedy continuation, 3 tokens
        tokens.append(int(np.argmax(_direct_logits(model_dir, tokens)[-1])))
    greedy = tokens[-3:]
    assert min(greedy) >= 6, "the tiny model's greedy tokens should be words"  # ids below 6 are special
    words = word_tokenizer.convert_ids_to_tokens(greedy)
    other = next(w for w in ("yes", "no") if w != words[-1])
    requests = [
        (context, " " + " ".join(words)),
        (context, " " + words[0]),
        (context, " " + " ".join([*words[:2], other])),
    ]
    flags = [g for _, g in lm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)]
    assert flags == [True, True, False]


def test_long_requests_keep_their_last_max_length_tokens(model_dir, word_tokenizer):
    lm = MoeloraLM(model=str(model_dir), batch_size=2, length_bucket=4, max_length=5)
    context, continuation = "the answer is a b c yes no", " why ?"
    (got, _), *_ = lm.loglikelihood(_instances("loglikelihood", [(context, continuation)]), disable_tqdm=True)
    head, tail = _split(word_tokenizer, context, continuation)
    window = (head + tail)[-6:]  # the model reads 5 tokens and scores the last 2
    logprobs = np.asarray(jax.nn.log_softmax(_direct_logits(model_dir, window[:-1]), axis=-1))
    np.testing.assert_allclose(got, logprobs[3, window[4]] + logprobs[4, window[5]], rtol=1e-5)


def test_rolling_loglikelihood_is_the_whole_document_in_windows(model_dir, word_tokenizer, lm):
    text = "the answer is blue . why ? the sky is blue"
    tokens = word_tokenizer.encode(text)  # BOS first: lm-eval scores the tokenizer's own special tokens too
    inputs = [word_tokenizer.bos_token_id, *tokens]  # every token conditions on the prefix token and all before it
    logprobs = np.asarray(jax.nn.log_softmax(_direct_logits(model_dir, inputs[:-1]), axis=-1))
    whole = sum(float(logprobs[i, inputs[i + 1]]) for i in range(len(tokens)))
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [text]), disable_tqdm=True)
    np.testing.assert_allclose(got, whole, rtol=1e-5)

    short = MoeloraLM(model=str(model_dir), batch_size=2, length_bucket=4, max_length=5)
    (got_short,) = short.loglikelihood_rolling(_instances("loglikelihood_rolling", [text]), disable_tqdm=True)
    want = 0.0
    windows = lm_eval_utils.get_rolling_token_windows(tokens, word_tokenizer.bos_token_id, 5, 1)
    for context, scored in map(lm_eval_utils.make_disjoint_window, windows):
        window = context + scored
        logprobs = np.asarray(jax.nn.log_softmax(_direct_logits(model_dir, window[:-1]), axis=-1))
        want += sum(float(logprobs[p, window[p + 1]]) for p in range(len(context) - 1, len(window) - 1))
    np.testing.assert_allclose(got_short, want, rtol=1e-5)
    assert abs(got_short - whole) > 1e-3  # the windows do cut the context


def _greedy_text(model_dir, tokenizer, context, steps):
    tokens = tokenizer.encode(context)
    for _ in range(steps):
        tokens.append(int(np.argmax(_direct_logits(model_dir, tokens)[-1])))
    return tokenizer.decode(tokens[len(tokens) - steps :], skip_special_tokens=True)


def test_generate_until_stops_at_a_stop_string_and_the_budget(model_dir, word_tokenizer, lm):
    contexts = ["the answer is", "what colour is the sky ?", "why"]
    free = {c: _greedy_text(model_dir, word_tokenizer, c, 6) for c in contexts}
    stop = free["the answer is"].split()[1]  # a word the first continuation emits after its first
    requests = [(c, {"until": [stop], "max_gen_toks": 6}) for c in contexts] + [("why", {"max_gen_toks": 2})]
    got = lm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert got[:3] == [free[c].split(stop)[0] for c in contexts]
    assert got[0] and len(got[0]) < len(free["the answer is"])  # it did stop early
    assert got[3] == _greedy_text(model_dir, word_tokenizer, "why", 2)


def test_the_same_answers_as_lm_evals_hugging_face_model(model_dir, lm):
    hf = pytest.importorskip("lm_eval.models.huggingface").HFLM(pretrained=str(model_dir), device="cpu", batch_size=2)
    loglikelihood = _instances("loglikelihood", REQUESTS)
    rolling = _instances("loglikelihood_rolling", ["the answer is blue . why ?", "yes no yes"])
    generation = _instances("generate_until", [("the answer is", {"until": ["?"], "max_gen_toks": 5})])
    ours, theirs = (
        (m.loglikelihood(loglikelihood), m.loglikelihood_rolling(rolling), m.generate_until(generation))
        for m in (lm, hf)
    )
    np.testing.assert_allclose([x for x, _ in ours[0]], [x for x, _ in theirs[0]], rtol=1e-4, atol=1e-4)
    assert [g for _, g in ours[0]] == [g for _, g in theirs[0]]
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4)
    assert ours[2] == theirs[2]


def test_adapters_for_another_base_model_are_refused(tmp_path, model_dir, tiny_llama):
    _, other = tiny_llama(hidden_size=16, intermediate_size=32)
    config = load_config(other)
    tree = init_variables(Llama(config, adapter=ADAPTER, adapter_targets=TARGETS), jax.random.key(0), ("adapters",))
    export_adapters(tmp_path / "a", tree["adapters"], adapter=ADAPTER, targets=TARGETS, model_config=config)
    with pytest.raises(UserError, match="do not fit the base model"):
        MoeloraLM(model=str(model_dir), adapters=str(tmp_path / "a"))


# ------------------------------------------------------------------------------------------------- the local tasks


def _data_dir(root: Path) -> Path:
    """A ``data/commonsenseqa`` folder with three dev questions (and the same as the train split) in the original
    format, written with the test tokenizer's words."""
    folder = root / "data" / "commonsenseqa"
    folder.mkdir(parents=True)
    for name in ("dev_rand_split.jsonl", "train_rand_split.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in CSQA_ROWS))
    return root / "data"


def test_the_task_prompts_are_lm_evals_commonsense_qa_and_the_cloze(tmp_path):
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "commonsense_qa" / "default.yaml", resolve_func=False)
    ours = load_yaml(TASKS_DIR / "commonsenseqa_local.yaml", resolve_func=False)
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "training_split", "validation_split"):
        assert ours[key] == theirs[key], key
    tasks = task_manager(["commonsenseqa_local", "commonsenseqa_local_cloze"], _data_dir(tmp_path)).load(
        ["commonsenseqa_local", "commonsenseqa_local_cloze"]
    )["tasks"]
    letters, cloze = tasks["commonsenseqa_local"], tasks["commonsenseqa_local_cloze"]
    doc = next(iter(letters.validation_docs()))
    assert letters.doc_to_text(doc) == (
        "Question: what colour is the sky ?\nA. blue\nB. yes\nC. no\nD. the answer\nE. a b c\nAnswer:"
    )
    assert letters.doc_to_choice(doc) == list("ABCDE") and letters.doc_to_target(doc) == "A"
    assert cloze.doc_to_text(doc) == "what colour is the sky ?" and cloze.doc_to_target(doc) == 0
    assert cloze.doc_to_choice(doc) == ["blue", "yes", "no", "the answer", "a b c"]


def test_a_bad_commonsenseqa_row_is_named_by_file_and_line(tmp_path):
    data = _data_dir(tmp_path)
    dev = data / "commonsenseqa" / "dev_rand_split.jsonl"
    rows = [*CSQA_ROWS[:1], {**CSQA_ROWS[1], "answerKey": "F"}, {"question": "why ?", "answerKey": "A"}]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(UserError, match=r"dev_rand_split.jsonl:2: choices labelled .* and answerKey 'F'"):
        commonsenseqa_dataset(str(data))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    with pytest.raises(UserError, match=r"dev_rand_split.jsonl:2: expected question.stem and question.choices"):
        commonsenseqa_dataset(str(data))


@pytest.mark.skipif(not (SHARED / "commonsenseqa").is_dir(), reason="../shared/data/commonsenseqa not present")
def test_the_shared_commonsenseqa_files_load_whole():
    splits = commonsenseqa_dataset(str(SHARED))
    assert splits["validation"].num_rows == 1221 and splits["train"].num_rows == 9741
    first = splits["validation"][0]
    assert first["answerKey"] == "A" and first["choices"]["text"][0] == "bank" and first["question"].endswith("what?")


def test_the_command_evaluates_offline_and_writes_json(tmp_path, model_dir, adapters, capsys):
    out = tmp_path / "results.json"
    tasks = "commonsenseqa_local,commonsenseqa_local_cloze"
    data = _data_dir(tmp_path)
    main(
        [
            *(f"--model={model_dir}", f"--adapters={adapters[0]}", f"--tasks={tasks}", "--limit=2"),
            *("--batch-size=2", "--length-bucket=8", f"--data-dir={data}", f"--output={out}"),
        ]
    )
    table = capsys.readouterr().out
    assert "commonsenseqa_local" in table and "acc_norm" in table and "wall time" in table
    results = json.loads(out.read_text())
    for task in tasks.split(","):
        assert results["n-samples"][task] == {"original": 3, "effective": 2}
        assert 0 <= results["results"][task]["acc,none"] <= 1 and "acc_norm,none" in results["results"][task]
    assert results["config"]["adapters"] == str(adapters[0]) and results["config"]["batch_size"] == 2
    assert results["wall_seconds"] > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model=/no/such/model"], "error: model path /no/such/model does not exist"),
        (["--tasks=no_such_task"], "error: unknown task(s) no_such_task: the local tasks are commonsenseqa_local,"),
        (["--data-dir=/no/such/data"], "error: CommonsenseQA file /no/such/data/commonsenseqa/dev_rand_split.jsonl"),
        (["--adapters=/no/such/export"], "error: /no/such/export is not an adapter export"),
        (["--tasks=,"], "error: --tasks=',' names no task: give lm-eval task names, comma-separated."),
        (["--output={tmp}"], "error: --output {tmp} is a directory: give a file, e.g. {tmp}/results.json."),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, capsys, tmp_path, arguments, message):
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main([f"--model={model_dir}", "--limit=1", *arguments])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message.format(tmp=tmp_path)), err
