"""Tokenized training examples and batches: loss on the response only, truncation, padding, shuffling."""

import json

import numpy as np
import pytest

from moelora_jax.data import (
    Example,
    batch_indices,
    collate,
    encode_example,
    encode_prompt,
    read_jsonl,
)


def _ids(word_tokenizer, text):
    return word_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat", [False, True])
def test_loss_mask_covers_exactly_the_response_and_eos(word_tokenizer, chat):
    example = Example("what colour is the sky ?", "the answer is blue", "blue")
    enc = encode_example(word_tokenizer, example, 32, use_chat_template=chat)
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


def test_long_examples_lose_prompt_tokens_from_the_left_only(word_tokenizer):
    prompt = "why why what colour is the sky ?"  # 9 tokens with BOS; + "blue" + eos = 11 > 10
    enc = encode_example(word_tokenizer, Example(prompt, "blue"), 10, use_chat_template=False)
    assert len(enc.tokens) == 10
    assert enc.tokens[-2:].tolist() == [*_ids(word_tokenizer, "blue"), 2] and enc.loss_mask.sum() == 2
    assert enc.tokens[:-2].tolist() == _ids(word_tokenizer, prompt)  # only BOS went


def test_windows_too_small_fail_with_the_example_index(word_tokenizer):
    with pytest.raises(ValueError, match="example 7: the prompt alone is 21 tokens, longer than the window of 16"):
        encode_example(word_tokenizer, Example(" ".join(["why"] * 20), "yes"), 16, use_chat_template=False, index=7)
    with pytest.raises(ValueError, match="the response needs 5 tokens but the window is 4"):
        encode_example(word_tokenizer, Example("why", "the answer is yes"), 4, use_chat_template=False)


def test_collate_left_pads_and_keeps_targets_aligned(word_tokenizer):
    examples = [Example("why ?", "yes"), Example("what colour is the sky ?", "the answer is blue")]
    encoded = [encode_example(word_tokenizer, e, 16, use_chat_template=False) for e in examples]
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
    with pytest.raises(ValueError, match="training set is empty"):
        batch_indices(0, 3, seed=0, step=0)
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        batch_indices(10, 16, seed=0, step=0)


def test_malformed_jsonl_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + '{"prompt": "a", "response"\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:3: malformed JSON line"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
