"""Prompt/response examples -> token batches with the loss on the response only.

Each example is tokenized as ``prompt_ids + response_ids + [eos]`` from two separate tokenizer calls, and the loss
mask marks exactly the response and end tokens, so labels come from the very ids the model reads and can never be
misaligned. A sequence longer than the window loses prompt tokens from the left (the instruction's end and the
whole response are kept); a prompt that leaves no room for its response is an error. Batches are left-padded to
the window (one compiled shape; generation needs left padding), and the training order is a permutation drawn
from ``(seed, epoch)`` so that any position of any epoch can be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: the text the model reads, the target it should produce, and the label the target encodes
    (what evaluation compares, e.g. ``"B"``, ``"Yes"``, ``"business"``)."""

    prompt: str
    response: str
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """``tokens`` (int32) and ``loss_mask`` (bool, True on response and end tokens) of one example, unpadded."""

    tokens: np.ndarray
    loss_mask: np.ndarray


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a malformed line fails with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found.")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: malformed JSON line ({e.msg}); fix or remove that line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}.")
            records.append(record)
    return records


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> tuple[str, bool]:
    """The prompt text to tokenize and whether the tokenizer should add its special tokens (BOS) itself.

    With the chat template the prompt becomes a user turn followed by the assistant header (the template supplies
    any BOS); otherwise the raw prompt gets the tokenizer's usual special tokens.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, False
    return prompt, True


def encode_example(
    tokenizer: Any, example: Example, max_length: int, *, use_chat_template: bool = True, index: int | None = None
) -> Encoded:
    """``prompt + response + eos`` tokens and their loss mask, left-truncating the prompt to fit ``max_length``."""
    text, special = format_prompt(tokenizer, example.prompt, use_chat_template)
    prompt_ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    response_ids = [*tokenizer(example.response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    room = max_length - len(response_ids)
    where = "" if index is None else f"example {index}: "
    if room < 1:
        raise ValueError(
            f"{where}the response needs {len(response_ids)} tokens but the window is {max_length}: raise max_length."
        )
    if len(prompt_ids) >= max_length:
        raise ValueError(
            f"{where}the prompt alone is {len(prompt_ids)} tokens, longer than the window of {max_length}: "
            "raise max_length or shorten the prompt."
        )
    prompt_ids = prompt_ids[-room:]
    tokens = np.asarray([*prompt_ids, *response_ids], np.int32)
    loss_mask = np.zeros(len(tokens), bool)
    loss_mask[len(prompt_ids) :] = True
    return Encoded(tokens, loss_mask)


def encode_prompt(tokenizer: Any, prompt: str, max_length: int, *, use_chat_template: bool = True) -> np.ndarray:
    """Prompt tokens for generation, keeping the last ``max_length``."""
    text, special = format_prompt(tokenizer, prompt, use_chat_template)
    return np.asarray(tokenizer(text, add_special_tokens=special)["input_ids"][-max_length:], np.int32)


def left_pad(sequences: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, length)`` tokens and attention mask with each sequence right-aligned (left padding)."""
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit a batch of length {length}.")
        if len(seq):
            tokens[row, -len(seq) :] = seq
            mask[row, -len(seq) :] = 1
    return tokens, mask


def collate(examples: Sequence[Encoded], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A training batch: ``tokens``, ``attention_mask`` (B, length) int32 and ``loss_mask`` (B, length) bool, where
    ``loss_mask[b, t]`` says token ``t`` is a target (predicted from position ``t - 1``)."""
    tokens, mask = left_pad([e.tokens for e in examples], length, pad_id)
    loss_mask = left_pad([e.loss_mask.astype(np.int32) for e in examples], length, 0)[0].astype(bool)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of example indices for ``epoch``: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """The example indices of global batch ``step`` (from 0): a pure function of ``(seed, step)``, so a resumed run
    reads exactly the batches an uninterrupted one would.

    Each epoch is a fresh permutation and drops its last incomplete batch.
    """
    if num_examples == 0:
        raise ValueError("the training set is empty: check the data path and the task format.")
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_examples} training examples are fewer than one batch of {batch_size}.")
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_examples, seed, epoch)[offset * batch_size : (offset + 1) * batch_size]
