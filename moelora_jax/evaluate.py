"""Evaluate a base model, optionally with our exported adapters, with EleutherAI's lm-evaluation-harness, offline.

``python -m moelora_jax.evaluate --model PATH --adapters DIR --tasks commonsenseqa_local --limit N
--batch-size B --output results.json`` runs ``lm_eval.simple_evaluate`` on the ``moelora_jax`` model
(:mod:`moelora_jax.evaluation.lm_eval_model`) with this package's task directory (``evaluation/lm_eval_tasks/``)
included, prints lm-eval's results table and writes the results as JSON. ``--model ""`` (the default) is the offline
SmolLM2-135M-Instruct.

Local tasks read their data from ``--data-dir``, default ``$MOELORA_JAX_DATA_DIR``, else ``../shared/data`` beside
the repository:

- ``commonsenseqa_local``: CommonsenseQA's ``dev_rand_split.jsonl`` (1,221 questions) in lm-eval's
  ``commonsense_qa`` prompt (question, lettered choices, ``Answer:``; the five letters scored), ``acc``/``acc_norm``.
- ``commonsenseqa_local_cloze``: the same questions as a cloze (the bare question; each choice's text scored),
  the formulation of the SmolLM2 model card's zero-shot CommonsenseQA figure (its ``acc_norm``).

Bad input (a missing model or data file, an unknown task, bad adapters) prints one line ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import datasets
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from moelora_jax.data.encoding import read_jsonl
from moelora_jax.errors import UserError
from moelora_jax.evaluation.lm_eval_model import MoeloraLM
from moelora_jax.io.atomic import write_text_atomically
from moelora_jax.models.llama import DTYPES

TASKS_DIR = Path(__file__).resolve().parent / "evaluation" / "lm_eval_tasks"
DATA_DIR_ENV = "MOELORA_JAX_DATA_DIR"
CSQA_FILES = {"validation": "dev_rand_split.jsonl", "train": "train_rand_split.jsonl"}
CSQA_LABELS = ["A", "B", "C", "D", "E"]

# lm-eval announces each call of a task's custom_dataset with advice for its own CLI; ours passes the data dir itself.
logging.getLogger("lm_eval.api.task").addFilter(lambda r: "Custom kwargs can be passed" not in r.getMessage())


def default_data_dir() -> Path:
    """``$MOELORA_JAX_DATA_DIR``, else ``../shared/data`` beside the repository (where the project's CI keeps it)."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")


def _csqa_rows(path: Path) -> list[dict[str, Any]]:
    """One original CommonsenseQA file as rows of the Hugging Face ``tau/commonsense_qa`` schema."""
    rows = []
    for number, record in read_jsonl(path):
        question = record.get("question")
        try:
            stem, labels = question["stem"], [str(c["label"]).strip() for c in question["choices"]]
            texts = [str(c["text"]) for c in question["choices"]]
        except (KeyError, TypeError):
            raise UserError(
                f"{path}:{number}: expected question.stem and question.choices [{{label, text}}, ...]; fix or remove "
                "the row."
            ) from None
        key = str(record.get("answerKey", "")).strip()
        if labels != CSQA_LABELS or key not in labels:
            raise UserError(
                f"{path}:{number}: choices labelled {labels} and answerKey {key!r}: a row needs the five choices A-E "
                "and an answerKey among them; fix or remove the row."
            )
        rows.append(
            {
                "id": str(record.get("id", number)),
                "question": stem,
                "question_concept": question.get("question_concept", ""),
                "choices": {"label": labels, "text": texts},
                "answerKey": key,
            }
        )
    return rows


def commonsenseqa_dataset(data_dir: str | None = None, **_task_metadata: Any) -> datasets.DatasetDict:
    """CommonsenseQA's original ``{dev,train}_rand_split.jsonl`` under ``data_dir/commonsenseqa`` (default
    :func:`default_data_dir`) as the ``validation`` and ``train`` splits of ``tau/commonsense_qa``'s schema
    (``question``, ``choices: {label, text}``, ``answerKey``). lm-eval calls it (a task's ``custom_dataset``) with
    the task's metadata, which carries ``data_dir`` from :func:`task_manager`."""
    directory = Path(data_dir or default_data_dir()) / "commonsenseqa"
    paths = {split: directory / name for split, name in CSQA_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise UserError(
                f"CommonsenseQA file {path} not found: pass --data-dir (the folder holding commonsenseqa/) "
                f"or set ${DATA_DIR_ENV}."
            )
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_csqa_rows(p)) for split, p in paths.items()})


def task_manager(tasks: list[str], data_dir: str | os.PathLike | None = None) -> TaskManager:
    """A ``TaskManager`` that knows ``tasks``: this package's tasks alone when they suffice (a fast index), else
    lm-eval's as well; ``data_dir`` (default :func:`default_data_dir`) reaches the local tasks' loaders."""
    metadata = {"data_dir": str(data_dir or default_data_dir())}
    local = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    if set(tasks) <= set(local.all_tasks):
        return local
    manager = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown task(s) {', '.join(unknown)}: the local tasks are {', '.join(local.all_tasks)}, "
            "the others lm-eval's (see `lm_eval ls tasks`)."
        )
    return manager


def evaluate(
    lm: MoeloraLM,
    tasks: list[str],
    *,
    manager: TaskManager | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict for ``tasks`` (lm-eval names or local ones) on ``lm``; ``manager`` defaults to
    :func:`task_manager` (data from :func:`default_data_dir`); ``limit``: the first N documents of each task (a
    fraction of them when below 1)."""
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        batch_size=lm.batch_size,  # recorded in the results' config
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(tasks) if manager is None else manager,
        log_samples=False,
    )


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 (a count, or a fraction below 1)")
    return int(value) if value >= 1 else value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moelora_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="HF model directory or .gguf file; empty: SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", default="", help="an adapter export of ours (export/adapters); empty: none")
    parser.add_argument("--tasks", default="commonsenseqa_local", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=_limit, default=None, help="the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per compiled batch")
    parser.add_argument("--length-bucket", type=int, default=32, help="row lengths are rounded up to a multiple")
    parser.add_argument("--max-length", type=int, default=None, help="model window (default: the config's)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute and weight dtype")
    parser.add_argument(
        "--data-dir", default=None, help=f"local tasks' data (default ${DATA_DIR_ENV} or ../shared/data)"
    )
    parser.add_argument("--output", default=None, help="write lm-eval's results here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """The command: evaluate, print the table, write the JSON; a :class:`UserError` is one line and exit code 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise UserError(f"--tasks={args.tasks!r} names no task: give lm-eval task names, comma-separated.")
        if args.output and Path(args.output).is_dir():
            raise UserError(
                f"--output {args.output} is a directory: give a file, e.g. {Path(args.output) / 'results.json'}."
            )
        manager = task_manager(tasks, args.data_dir)  # unknown tasks fail before the model loads
        lm = MoeloraLM(
            model=args.model,
            adapters=args.adapters,
            batch_size=args.batch_size,
            max_length=args.max_length,
            length_bucket=args.length_bucket,
            dtype=args.dtype,
        )
        results = evaluate(lm, tasks, manager=manager, limit=args.limit, num_fewshot=args.num_fewshot)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results["wall_seconds"] = time.perf_counter() - start
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"wall time: {results['wall_seconds']:.1f} s")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.output, json.dumps(results, indent=2, default=handle_non_serializable))


if __name__ == "__main__":
    main()
