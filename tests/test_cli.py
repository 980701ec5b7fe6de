"""``train.py`` end to end on a tiny model directory, and its one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, word_tokenizer):
    """A tiny random LLaMA with the word-level test tokenizer and its chat template, saved as a HF directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    return directory


def _data(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def _train(tmp_path, *overrides, preset="smoke"):
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": "cpu"}
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs' / 'llama_moelora.py'}:{preset}",
        f"--config.output_dir={tmp_path / 'run'}",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def _tiny_job(model_dir, data_path):
    return [
        f"--config.model.path={model_dir}",
        "--config.data.task=prompt_response",
        f"--config.data.train_path={data_path}",
        "--config.data.eval_split=train",
        "--config.data.max_length=24",
        "--config.adapter.num_experts=4",
        "--config.adapter.top_k=2",
        "--config.train.eval_batch_size=4",
        "--config.data.max_eval_examples=4",
    ]


def test_a_tiny_job_runs_end_to_end(tiny_model_dir, tmp_path):
    records = [{"prompt": "what colour is the sky ?", "response": "the answer is blue .", "label": "blue"}] * 12
    result = _train(tmp_path, *_tiny_job(tiny_model_dir, _data(tmp_path, records)))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss_after"] < summary["eval_loss_before"]
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events == ["eval", "train", "train", "train", "eval"]


def _error(result):
    assert result.returncode != 0
    return (
        result.stderr.strip().splitlines()[-1]
        if "error:" not in result.stderr
        else next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--config.optim.nope=1"], "error: unknown config key 'nope'"),
        (["--config.optim.lr=fast"], "error: flag --config.optim.lr=fast: could not convert string to float"),
        (["--config.adapter.top_k=30"], "top_k=30 must lie in [1, num_experts=20]"),
        (["--config.adapter.rank=0"], "rank=0 must be a positive integer"),
        (["--config.data.task=squad"], "data.task='squad' is not a task format"),
        (["--config.model.path=/no/such/model"], "model path /no/such/model does not exist"),
    ],
)
def test_bad_config_fails_before_loading_anything(tmp_path, overrides, message):
    result = _train(tmp_path, *overrides)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


def test_bad_data_fails_with_one_line(tiny_model_dir, tmp_path):
    good = {"prompt": "why ?", "response": "yes"}
    cases = [
        ([good, '{"prompt": "why ?", "response"\n'], "train.jsonl:2: malformed JSON line"),
        ([], "gave no 'train' examples"),
        (
            [{"prompt": " ".join(["why"] * 40), "response": "yes"}],
            "the prompt alone is 42 tokens, longer than the window of 24",
        ),
    ]
    for records, message in cases:
        result = _train(tmp_path, *_tiny_job(tiny_model_dir, _data(tmp_path, records)))
        line = _error(result)
        assert message in line and line.startswith("error:"), result.stderr[-2000:]
