"""Prompt/response examples -> token batches with the loss on the response only.

Each example is tokenized as ``prompt_ids + response_ids + [eos]`` from two separate tokenizer calls, and the loss
mask marks exactly the response and end tokens, so labels come from the very ids the model reads and can never be
misaligned. An example longer than the window follows an overflow policy (:data:`OVERFLOW_POLICIES`): an error,
dropped, or (the default) truncated by cutting text from the start of the prompt, inside the chat template, so the
template's header, the instruction at the prompt's end, the assistant header and the whole response are kept. The
training order is a permutation drawn from ``(seed, epoch)`` so that any position of any epoch can be reproduced.

Batches come in two layouts. ``collate`` left-pads one example per row to the window (one compiled shape;
generation needs left padding). ``pack`` places several examples in each row, first-fit decreasing, with segment
ids (0 on padding) and positions restarting at each example, so the model attends only within an example; rows and
their length are rounded up to a few shapes. Either carries ``targets``: per row the positions whose next token is
a loss target, so the output head runs only there (:mod:`moelora_jax.models.loss`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jinja2 import TemplateError

from moelora_jax.errors import UserError

Overflow = Literal["error", "drop", "truncate"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("error", "drop", "truncate")
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: the text the model reads, the target it should produce, the label the target encodes
    (what evaluation compares, e.g. ``"B"``, ``"Yes"``, ``"business"``) and where it was read (``file:line``, for
    messages)."""

    prompt: str
    response: str
    label: str = ""
    source: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """``tokens`` (int32) and ``loss_mask`` (bool, True on response and end tokens) of one example, unpadded."""

    tokens: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class OverflowCounts:
    """What the overflow policy did to a list of examples: ``kept``, the indices of the examples encoded (in order,
    one per encoding returned), and how many were ``truncated`` (among the kept) and ``dropped``."""

    kept: tuple[int, ...]
    truncated: int
    dropped: int


def require_file(path: str | Path) -> Path:
    """``path`` as a ``Path``; a :class:`UserError` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found: check the path.")
    return path


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text with its line end)`` of each line of a UTF-8 file; a BOM at the file's start is
    dropped, and a line that is not valid UTF-8 fails with its number."""
    path = require_file(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = (raw.removeprefix(_UTF8_BOM) if number == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line): "
                    "re-save the file as UTF-8."
                ) from None
            yield number, text


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of each non-blank line of a JSON-lines file; a malformed line fails with its number."""
    records = []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON line ({e.msg}); fix or remove that line.") from None
        if not isinstance(record, dict):
            raise UserError(
                f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}: "
                "write one {...} record per line."
            )
        records.append((number, record))
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


def turn_end_id(tokenizer: Any, end_ids: Sequence[int]) -> int:
    """The token a response ends with: the one the chat template writes right after an assistant turn (Gemma's
    ``<end_of_turn>``, Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) where it is one of the model's ``end_ids``,
    so that generation stops at it; else the tokenizer's end token."""
    probe = "moelora-response-probe"
    if getattr(tokenizer, "chat_template", None) and end_ids:
        turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}]
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False)
        except (TemplateError, ValueError):  # a template without assistant turns
            text = ""
        after = text.split(probe, 1)[1] if probe in text else ""
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        if ids and ids[0] in end_ids:
            return ids[0]
    return tokenizer.eos_token_id


def _prompt_ids(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    text, special = format_prompt(tokenizer, prompt, use_chat_template)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _fit_prompt(tokenizer: Any, prompt: str, room: int, use_chat_template: bool) -> list[int] | None:
    """The formatted prompt's ids in at most ``room`` tokens: the template around the longest tail of the prompt's
    text that fits (the text's tokens, decoded, re-formatted and re-tokenized, so every candidate is measured), or
    None when even the template around an empty prompt is longer."""
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def around_tail(k: int) -> list[int]:
        return _prompt_ids(tokenizer, tokenizer.decode(content[len(content) - k :]), use_chat_template)

    best = around_tail(0)
    if len(best) > room:
        return None
    low, high = 0, len(content)  # around_tail(low) fits; a binary search for the largest k that does
    while low < high:
        mid = (low + high + 1) // 2
        ids = around_tail(mid)
        if len(ids) <= room:
            low, best = mid, ids
        else:
            high = mid - 1
    return best


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    *,
    use_chat_template: bool = True,
    overflow: Overflow = "truncate",
    end_id: int | None = None,
) -> tuple[list[Encoded], OverflowCounts]:
    """Each example's ``prompt + response + end`` tokens and loss mask, and what ``overflow`` did to the examples
    longer than ``max_length``. ``end_id``: the token that ends a response (:func:`turn_end_id`; default the
    tokenizer's eos).

    ``"error"``: a :class:`UserError` naming the first such example. ``"drop"``: they are left out. ``"truncate"``:
    text is cut from the start of the prompt, inside the template, until the example fits; one whose response
    does not fit even with an empty prompt is dropped. ``OverflowCounts.kept`` aligns the encodings with
    ``examples``.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise UserError(f"overflow={overflow!r} must be one of {OVERFLOW_POLICIES}.")
    end = tokenizer.eos_token_id if end_id is None else end_id
    encoded, kept, truncated = [], [], 0
    for index, example in enumerate(examples):
        prompt_ids = _prompt_ids(tokenizer, example.prompt, use_chat_template)
        response_ids = [*tokenizer(example.response, add_special_tokens=False)["input_ids"], end]
        if len(prompt_ids) + len(response_ids) > max_length:
            if overflow == "error":
                length = len(prompt_ids) + len(response_ids)
                where = example.source or f"example {index}"
                raise UserError(
                    f"{where}: the example (its prompt starts {example.prompt[:40]!r}) is {length} tokens "
                    f"({len(prompt_ids)} prompt, {len(response_ids)} response and end), longer than "
                    f"max_length={max_length}: raise data.max_length, shorten the example, or set data.overflow to "
                    "'truncate' or 'drop'."
                )
            room = max_length - len(response_ids)
            fitted = _fit_prompt(tokenizer, example.prompt, room, use_chat_template) if overflow == "truncate" else None
            if fitted is None:
                continue
            prompt_ids, truncated = fitted, truncated + 1
        tokens = np.asarray([*prompt_ids, *response_ids], np.int32)
        encoded.append(Encoded(tokens, np.arange(len(tokens)) >= len(prompt_ids)))
        kept.append(index)
    return encoded, OverflowCounts(tuple(kept), truncated, len(examples) - len(kept))


def encode_prompt(tokenizer: Any, prompt: str, max_length: int, *, use_chat_template: bool = True) -> np.ndarray:
    """Prompt tokens for generation, at most ``max_length``: a longer prompt loses text from its start, inside the
    template (as under ``overflow="truncate"``)."""
    ids = _prompt_ids(tokenizer, prompt, use_chat_template)
    if len(ids) > max_length:
        ids = _fit_prompt(tokenizer, prompt, max_length, use_chat_template)
        if ids is None:
            empty = len(_prompt_ids(tokenizer, "", use_chat_template))
            raise UserError(
                f"the prompt template alone is {empty} tokens, more than max_length={max_length}: "
                "raise data.max_length."
            )
    return np.asarray(ids, np.int32)


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


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``n``."""
    return -(-n // multiple) * multiple


def target_positions(loss_mask: np.ndarray, width: int) -> np.ndarray:
    """``(B, width)`` int32: per row the positions ``t`` with ``loss_mask[t + 1]`` (their next token is a target), in
    order, then ``-1``. ``width`` must hold every row's targets."""
    out = np.full((loss_mask.shape[0], width), -1, np.int32)
    for row, mask in enumerate(np.asarray(loss_mask, bool)):
        found = np.flatnonzero(mask[1:])
        if len(found) > width:
            raise ValueError(f"row {row} has {len(found)} loss targets, more than the batch's width of {width}.")
        out[row, : len(found)] = found
    return out


def targets_bound(encoded: Sequence[Encoded], row_length: int) -> int:
    """The most loss targets one row of ``row_length`` tokens can hold: the targets of the ``m`` examples with the
    most, where ``m`` is how many of the shortest examples fit in a row together (1 without packing)."""
    lengths = np.sort([len(e.tokens) for e in encoded])
    fit = max(1, int(np.searchsorted(np.cumsum(lengths), row_length, side="right")))
    counts = np.sort([int(e.loss_mask.sum()) for e in encoded])[::-1]
    return min(row_length - 1, int(counts[:fit].sum()))


def collate(
    examples: Sequence[Encoded], length: int, pad_id: int, targets_width: int | None = None
) -> dict[str, np.ndarray]:
    """A training batch: ``tokens``, ``attention_mask`` (B, length) int32 and ``loss_mask`` (B, length) bool, where
    ``loss_mask[b, t]`` says token ``t`` is a target (predicted from position ``t - 1``); with ``targets_width``,
    also ``targets`` (B, targets_width) from :func:`target_positions`."""
    tokens, mask = left_pad([e.tokens for e in examples], length, pad_id)
    loss_mask = left_pad([e.loss_mask.astype(np.int32) for e in examples], length, 0)[0].astype(bool)
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}
    if targets_width is not None:
        batch["targets"] = target_positions(loss_mask, targets_width)
    return batch


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a list of examples becomes one batch.

    ``max_length`` is the window (the longest example, and the row length without packing); ``pack_length > 0``
    packs rows of that many tokens (:func:`pack`, lengths rounded up to ``length_bucket``, row counts to
    ``rows_multiple``); ``targets_width`` is the width of ``targets`` (0: none, the full output head).
    """

    max_length: int
    pack_length: int = 0
    length_bucket: int = 1
    rows_multiple: int = 1
    targets_width: int = 0

    @classmethod
    def fitted(cls, encoded: Sequence[Encoded], max_length: int, **kwargs: int) -> Layout:
        """The layout with ``targets_width`` the most targets a row of ``encoded`` examples can hold (rounded up to
        a multiple of 8)."""
        layout = cls(max_length, **kwargs)
        bound = targets_bound(encoded, layout.pack_length or max_length)
        return dataclasses.replace(layout, targets_width=round_up(bound, 8))

    def __call__(self, examples: Sequence[Encoded], pad_id: int) -> dict[str, np.ndarray]:
        if self.pack_length:
            return pack(
                examples,
                self.pack_length,
                pad_id,
                length_bucket=self.length_bucket,
                rows_multiple=self.rows_multiple,
                targets_width=self.targets_width or None,
            )
        return collate(examples, self.max_length, pad_id, self.targets_width or None)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity``: longest first, each into the first row with
    room (ties in input order), so the grouping is a pure function of ``lengths``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"an example of {lengths[i]} tokens does not fit a packed row of {capacity}.")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack(
    examples: Sequence[Encoded],
    row_length: int,
    pad_id: int,
    *,
    length_bucket: int = 1,
    rows_multiple: int = 1,
    targets_width: int | None = None,
) -> dict[str, np.ndarray]:
    """Examples packed into ``(R, L)`` rows (:func:`first_fit_decreasing` into ``row_length``), right-padded.

    ``L`` is the longest row rounded up to ``length_bucket`` (at most ``row_length``) and ``R`` the row count
    rounded up to ``rows_multiple`` (extra rows are all padding), so batches take few shapes. Returns ``tokens``,
    ``attention_mask``, ``segment_ids`` (``1..n`` per row, 0 on padding), ``positions`` (from 0 in each example),
    ``loss_mask`` and, with ``targets_width``, ``targets`` (:func:`target_positions`). An example's first token is
    never a target (nothing of its own precedes it).
    """
    rows = first_fit_decreasing([len(e.tokens) for e in examples], row_length)
    fill = max(sum(len(examples[i].tokens) for i in row) for row in rows)
    shape = (round_up(len(rows), rows_multiple), min(row_length, round_up(fill, length_bucket)))
    tokens = np.full(shape, pad_id, np.int32)
    segments, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, bool)
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row, start=1):
            e, end = examples[i], start + len(examples[i].tokens)
            tokens[r, start:end], loss_mask[r, start + 1 : end] = e.tokens, e.loss_mask[1:]  # no target before it
            segments[r, start:end], positions[r, start:end] = segment, np.arange(end - start)
            start = end
    batch = {
        "tokens": tokens,
        "attention_mask": (segments > 0).astype(np.int32),
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": loss_mask,
    }
    if targets_width is not None:
        batch["targets"] = target_positions(loss_mask, targets_width)
    return batch


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of example indices for ``epoch``: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """The example indices of global batch ``step`` (from 0): a pure function of ``(seed, step)``, so a resumed run
    reads exactly the batches an uninterrupted one would.

    Each epoch is a fresh permutation and drops its last incomplete batch.
    """
    if num_examples == 0:
        raise UserError("the training set is empty: check the data path and the task format.")
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise UserError(
            f"{num_examples} training examples are fewer than one batch of {batch_size}: lower the batch size."
        )
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_examples, seed, epoch)[offset * batch_size : (offset + 1) * batch_size]
