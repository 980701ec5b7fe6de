"""A validation split carved from a task's training examples, for choosing settings without the test examples.

The carve is the same for every run of a task: a permutation drawn by :data:`VALIDATION_SEED` (never by the run's
seed) orders the training examples, and the first ``count`` of them whose prompt is neither a test prompt nor another
training example's (SST-2 repeats short phrases) are held out; the rest, in their original order, are trained on.
So every arm and seed of a comparison trains on the same examples and is tuned on the same others, and no test
example is seen while tuning.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Sequence
from typing import TypeVar

import numpy as np

from moelora_jax.errors import UserError

EVAL_SETS = ("test", "validation")
"""What ``data.eval_on`` may name: the eval file's split, or the validation examples held out of training."""
VALIDATION_SEED = 0
"""The seed of the permutation that picks the validation examples (fixed: the carve never depends on a run)."""

E = TypeVar("E")


def hold_out(examples: Sequence[E], count: int, test_prompts: Collection[str] = ()) -> tuple[list[E], list[E]]:
    """``(training, validation)``: ``count`` of ``examples`` (objects with a ``prompt``) held out, none of them with a
    prompt in ``test_prompts`` or shared with another example, each list in the examples' order; a ``UserError``
    when too few are left to hold out (at least one must stay for training)."""
    if count <= 0:
        return list(examples), []
    copies = collections.Counter(e.prompt for e in examples)
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(examples))
    candidates = [int(i) for i in order if copies[examples[i].prompt] == 1 and examples[i].prompt not in test_prompts]
    if count > len(candidates) or count >= len(examples):
        raise UserError(
            f"data.validation_examples={count} is too many: of {len(examples)} training examples, {len(candidates)} "
            "can be held out (their prompt is in no test example and no other training example): hold out fewer."
        )
    held = set(candidates[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
