"""The validation split carved from the training examples (``data.validation_examples``, ``data.eval_on``) and
evaluation by loss only (``train.score=False``): on synthetic examples, on the real BBC News and SST-2 files, and
through ``train.py``."""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
from tiny_models import TEST_WORDS
from train_cli import tiny_job, train, write_records

from moelora_jax.data.splits import hold_out
from moelora_jax.data.tasks import load_task
from moelora_jax.errors import UserError
from moelora_jax.evaluation.scoring import EXAMPLES_FILE

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_data" / "SST-2"


@dataclasses.dataclass(frozen=True)
class _Example:
    prompt: str


def test_hold_out_is_one_fixed_carve_disjoint_from_training_and_test():
    examples = [_Example(f"p{i}") for i in range(50)] + [_Example("twice"), _Example("twice")]
    test = {"p3", "p7", "p11"}
    training, validation = hold_out(examples, 10, test)
    assert len(validation) == 10 and len(training) == 42
    assert {e.prompt for e in validation}.isdisjoint({e.prompt for e in training} | test)
    assert "twice" not in {e.prompt for e in validation}  # a repeated prompt stays in training, both copies
    assert training == [e for e in examples if e not in validation]  # the training order is kept
    assert hold_out(examples, 10, test) == (training, validation)  # no run-dependent draw
    assert hold_out(examples, 0, test) == (examples, [])
    with pytest.raises(UserError, match=r"data\.validation_examples=48 is too many: of 52 training examples, 47 can"):
        hold_out(examples, 48, test)


def test_the_real_tasks_validation_splits_share_no_prompt_with_training_or_test():
    for task, train_path, test_path, test_split in (
        ("bbc_news", None, None, "test"),
        ("sst2", SST2 / "train.tsv", SST2 / "dev.tsv", "train"),
    ):
        if train_path is not None and not train_path.exists():
            pytest.skip(f"{train_path} is not here")
        _, examples = load_task(task, train_path, "train")
        _, test = load_task(task, test_path, test_split)
        training, validation = hold_out(examples, 200, {e.prompt for e in test})
        assert len(validation) == 200 and len(training) == len(examples) - 200
        prompts = {e.prompt for e in validation}
        assert prompts.isdisjoint({e.prompt for e in training}) and prompts.isdisjoint({e.prompt for e in test})


def _records(count, offset=0):
    """``count`` prompt/response records with distinct prompts of the word tokenizer's words."""
    pairs = itertools.islice(itertools.permutations(TEST_WORDS[:12], 2), offset, offset + count)
    return [{"prompt": f"{a} {b} ?", "response": "yes", "label": "yes"} for a, b in pairs]


def test_train_py_tunes_on_the_validation_examples_by_loss_only(tmp_path, tiny_model_dir):
    train_file = write_records(tmp_path, _records(40))
    test_file = write_records(tmp_path, _records(8, offset=40), name="test.jsonl")
    common = [
        *tiny_job(tiny_model_dir, train_file),
        f"--config.data.eval_path={test_file}",
        "--config.data.max_eval_examples=0",
        "--config.data.validation_examples=6",
        "--config.train.steps=1",
    ]
    runs = {
        "tune": ["--config.data.eval_on=validation", "--config.train.score=False"],
        "final": ["--config.data.eval_on=test"],
    }
    summaries, printed = {}, {}
    for name, overrides in runs.items():
        result = train(tmp_path / name, *common, *overrides)
        assert result.returncode == 0, result.stderr[-2000:]
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
        printed[name] = result.stdout
    tune, final = summaries["tune"], summaries["final"]
    assert tune["train_examples"] == final["train_examples"] == 34  # the same 6 held out of both
    assert (tune["eval_examples"], final["eval_examples"]) == (6, 8)
    assert tune["accuracy_after"] is None and tune["eval_loss_after"] > 0
    assert final["accuracy_after"] is not None
    assert (tmp_path / "tune" / "curves.png").exists() and "accuracy not scored" in printed["tune"]
    for name, scored in (("tune", False), ("final", True)):  # the outputs it lists are those it wrote
        assert (tmp_path / name / EXAMPLES_FILE).exists() == scored == (EXAMPLES_FILE in printed[name])
