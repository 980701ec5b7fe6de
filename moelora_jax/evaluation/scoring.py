"""Evaluation by generation: greedy answers to held-out prompts, scored by the task's parser and metric.

Prompts are batched by length, longest first, and each batch is left-padded to its longest prompt rounded up to
``length_bucket`` (0: to ``prompt_length``), so at most ``prompt_length / length_bucket`` shapes compile. Each
batch is placed on the model's mesh (a :class:`Decoder`'s ``put_batch``, as the trainer's) and decoded with the KV
cache (:func:`~moelora_jax.models.generation.generate`). :func:`task_score` can also record each example's outcome
(:func:`example_records`) as JSON lines, for statistics paired on the same examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import jax

from moelora_jax.data.encoding import Example, encode_prompt, left_pad, round_up
from moelora_jax.data.tasks import Task
from moelora_jax.io.atomic import write_text_atomically
from moelora_jax.models.generation import end_ids, generate
from moelora_jax.models.llama import Llama
from moelora_jax.parallel.distributed import to_host

EXAMPLES_FILE = "eval_examples.jsonl"
"""The final evaluation's :func:`example_records`, one JSON line per held-out example, in ``output_dir``."""


class Decoder(Protocol):
    """A model and where it runs: what generation needs (a :class:`~moelora_jax.training.trainer.Trainer` is one)."""

    model: Llama

    def context(self) -> AbstractContextManager[None]:
        """The mesh and logical-axis rules the model's programs run under."""
        ...

    def put_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """A numpy batch as global arrays on the mesh."""
        ...


def generate_answers(
    decoder: Decoder,
    params: Any,
    adapters: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int,
    prompt_length: int,
    max_new_tokens: int,
    use_chat_template: bool = True,
    length_bucket: int = 0,
) -> list[str]:
    """Greedy answers of ``decoder.model`` with ``adapters`` to each example's prompt, decoded, in order."""
    eos = end_ids(decoder.model.config, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    prompts = [encode_prompt(tokenizer, e.prompt, prompt_length, use_chat_template=use_chat_template) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    variables = {"params": params, "adapters": adapters}
    with decoder.context():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            chunk = [prompts[i] for i in rows]
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape; extra rows are dropped
            length = min(prompt_length, round_up(len(chunk[0]), length_bucket)) if length_bucket else prompt_length
            tokens, mask = left_pad(chunk, length, pad)
            batch = decoder.put_batch({"tokens": tokens, "attention_mask": mask})
            out = generate(
                decoder.model,
                variables,
                batch["tokens"],
                batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_ids=eos,
                pad_id=pad,
            )
            for i, row in zip(rows, to_host(out), strict=False):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


def example_records(task: Task, generated: Sequence[str], examples: Sequence[Example]) -> list[dict[str, Any]]:
    """Per example, in order: its ``index``, ``source`` (``file:line``), ``label``, the ``generated`` text, the
    ``answer`` extracted from it (None when it does not follow the format) and ``correct`` (``answer == label``)."""
    records = []
    for index, (text, example) in enumerate(zip(generated, examples, strict=True)):
        answer = task.extract(text)
        records.append(
            {
                "index": index,
                "source": example.source,
                "label": example.label,
                "generated": text,
                "answer": answer,
                "correct": answer == example.label,
            }
        )
    return records


def task_score(
    decoder: Decoder,
    params: Any,
    adapters: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    examples_file: Path | None = None,
    **kwargs: Any,
) -> float:
    """The task's score (accuracy or MCC) of greedy answers; with ``examples_file``, also each example's
    :func:`example_records` written there as JSON lines. ``kwargs`` as for :func:`generate_answers`."""
    generated = generate_answers(decoder, params, adapters, tokenizer, examples, **kwargs)
    if examples_file is not None:
        lines = "".join(json.dumps(record) + "\n" for record in example_records(task, generated, examples))
        write_text_atomically(examples_file, lines)
    return task.score(generated, examples)
