"""``train.py`` end to end on a tiny model directory, and its one-line errors for bad input."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from train_cli import RECORDS, ROOT, command, environment, error_line, records, tiny_job, train, write_records

from moelora_jax.formats.native import load_adapters


def test_a_tiny_job_runs_end_to_end(tiny_model_dir, tmp_path):
    records = [{"prompt": "what colour is the sky ?", "response": "the answer is blue .", "label": "blue"}] * 12
    cache = tmp_path / "xla-cache"
    job = tiny_job(tiny_model_dir, write_records(tmp_path, records))
    result = train(tmp_path / "run", *job, f"--config.compilation_cache={cache}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(cache.iterdir())) >= 2  # the compiled programs (at least the train step and generation)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss_after"] < summary["eval_loss_before"]
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events == ["eval", "train", "train", "train", "eval"]

    # the run's record of itself: the resolved settings, and the command line that reruns it
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    assert settings["train"]["steps"] == 3 and settings["compilation_cache"] == str(cache)
    (attempt,) = [json.loads(line) for line in (tmp_path / "run" / "commands.jsonl").read_text().splitlines()]
    assert attempt["argv"][1:] == command(tmp_path / "run", *job, f"--config.compilation_cache={cache}")[1:]
    assert attempt["cwd"] == str(tmp_path) and attempt["versions"]["moelora_jax"] and attempt["processes"] == 1
    rerun = subprocess.run(attempt["argv"], cwd=attempt["cwd"], env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from_step"] == 3  # the same run
    attempts = [json.loads(line) for line in (tmp_path / "run" / "commands.jsonl").read_text().splitlines()]
    assert [a["argv"] for a in attempts] == [attempt["argv"]] * 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--config.optim.nope=1"], "error: unknown config key 'nope'"),
        (["--config.optim.lr=fast"], "error: flag --config.optim.lr=fast: could not convert string to float"),
        (["--config.optim.lr=-1"], "error: optim: OptimConfig.lr=-1.0 must be >= 0."),
        (["--config.adapter.top_k=30"], "error: adapter: AdapterConfig.top_k=30 must lie in [1, num_experts=20]"),
        (["--config.adapter.rank=0"], "rank=0 must be a positive integer"),
        (["--config.adapter.kind=mole"], "adapter.kind=mole needs the mole.* settings: use --config configs/mole.py"),
        (["--config.adapter.balance_loss=-1"], "adapter.balance_loss=-1.0 and adapter.z_loss=0.0 must be >= 0"),
        (["--config.data.task=squad"], "data.task='squad' is not a task format"),
        (["--config.data.pack_length=100"], "data.pack_length=100 must be 0 (rows as long as the window) or at least"),
        (["--config.data.length_bucket=0"], "data.length_bucket=0 must be >= 1"),
        (["--config.data.eval_seed=-2"], "data.eval_seed=-2 must be >= -1"),
        (["--config.data.eval_on=dev"], "data.eval_on='dev' must be one of"),
        (["--config.data.eval_on=validation"], "data.eval_on=validation needs data.validation_examples > 0"),
        (["--config.data.validation_examples=-1"], "data.validation_examples=-1 must be >= 0"),
        (["--config.model.attention=flash"], "model.attention='flash' must be one of ('xla', 'cudnn', 'splash')"),
        (["--config.model.path=/no/such/model"], "model path /no/such/model does not exist"),
        (["--config.model.quantize=nf8"], "model.quantize='nf8' must be one of ('none', 'int8', 'nf4')"),
        (["--config.model.double_quant=True"], "model.double_quant=True compresses NF4's scales: it needs"),
    ],
)
def test_bad_config_fails_before_loading_anything(tmp_path, overrides, message):
    result = train(tmp_path / "run", *overrides)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


def test_bad_data_fails_with_one_line(tiny_model_dir, tmp_path):
    good = {"prompt": "why ?", "response": "yes"}
    cases = [
        ([good, '{"prompt": "why ?", "response"\n'], "train.jsonl:2: malformed JSON line"),
        ([], "gave no 'train' examples"),
        (
            [{"prompt": " ".join(["why"] * 40), "response": "yes"}],
            "is 44 tokens (42 prompt, 2 response and end), longer than max_length=24",
        ),
    ]
    for lines, message in cases:
        job = tiny_job(tiny_model_dir, write_records(tmp_path, lines))
        result = train(tmp_path / "run", *job, "--config.data.overflow=error")
        line = error_line(result)
        assert message in line and line.startswith("error:"), result.stderr[-2000:]


def test_a_plain_lora_job_exports_peft_and_merged_weights_that_agree(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    job = tiny_job(tiny_model_dir, write_records(tmp_path))
    result = train(run, *job, "--config.adapter.kind=lora", "--config.train.eval_before=False")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in records(run, "eval")] == [3]  # eval_before=False: no step-0 evaluation
    assert sorted(p.name for p in (run / "export").iterdir()) == ["adapters", "merged", "peft"]
    tokens = torch.tensor([[1, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        plain = base(tokens).logits
        with_peft = peft.PeftModel.from_pretrained(base, run / "export" / "peft").eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "merged").eval()(tokens).logits
    assert (with_peft - plain).abs().max() > 1e-5  # three steps of training moved the adapter off zero
    torch.testing.assert_close(merged, with_peft, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kind", "riemann"), [("lora", True), ("lora", False), ("moe_lora", True), ("moe_lora", False)]
)
def test_moslora_trains_through_the_trainer(tiny_model_dir, tmp_path, kind, riemann):
    run = tmp_path / "run"
    job = tiny_job(tiny_model_dir, write_records(tmp_path))
    result = train(run, *job, f"--config.adapter.kind={kind}", f"--config.optim.riemann={riemann}", config="moslora.py")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter"]["mixer"] and summary["eval_loss_after"] < summary["eval_loss_before"]
    exported = load_adapters(run / "export" / "adapters")
    mixer = exported.adapters["layers"]["attn"]["q_proj"]["mixer"]
    assert mixer.shape[:2] == (2, 1 if kind == "lora" else 4) and exported.adapter.mixer


def _tree_digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by its relative path -> a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory):
    """A finished two-step tiny job (its checkpoint at step 2) and its overrides."""
    root = tmp_path_factory.mktemp("checkpointed")
    job = [*tiny_job(tiny_model_dir, write_records(root)), "--config.train.eval_before=False"]
    result = train(root / "run", *job, "--config.train.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run", job


def _rerun_over(checkpointed_run, tmp_path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The checkpointed run's directory copied, and ``train.py`` run over it with ``overrides``; asserts its
    checkpoints were left exactly as they were."""
    source, job = checkpointed_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = _tree_digest(run / "checkpoints")
    result = train(run, *job, *overrides)
    assert _tree_digest(run / "checkpoints") == before
    return result, run


def test_updates_that_are_all_skipped_stop_the_run_with_their_count(checkpointed_run, tmp_path):
    """A learning rate that overflows the adapters after one update: every later update is non-finite."""
    result, _ = _rerun_over(checkpointed_run, tmp_path, "--config.optim.lr=1e30", "--config.train.steps=6")
    line = error_line(result)  # the last line, after the progress bar's
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(r"error: [34] of this run's 4 updates had a non-finite loss or gradient and were skipped", line)


def test_a_bug_keeps_its_traceback(checkpointed_run, tmp_path):
    """An exception that is not a ``UserError`` (here a ``KeyError`` raised inside the job) is not reworded."""
    job = checkpointed_run[1]
    bug = "def broken(*args, **kwargs):\n    raise KeyError('a bug in the batch layout')\n"
    script = tmp_path / "buggy_train.py"
    script.write_text(
        f"import runpy, sys\nimport moelora_jax.training.job\n{bug}moelora_jax.training.job.batch_layout = broken\n"
        f"sys.argv[0] = {str(ROOT / 'train.py')!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    argv = command(tmp_path / "run", *job)
    result = subprocess.run(
        [argv[0], str(script), *argv[2:]], capture_output=True, text=True, env=environment(), timeout=600
    )
    assert result.returncode not in (0, 2)
    assert (
        "Traceback (most recent call last)" in result.stderr
        and "KeyError: 'a bug in the batch layout'" in result.stderr
    )
    assert "error:" not in result.stderr


CSQA_ROW = {"question": {"stem": "why ?", "choices": [{"label": "A", "text": "yes"}, {"label": "B", "text": "no"}]}}
BAD_DATA = {  # records, raw bytes appended, overrides, the message
    "null response": (
        [*RECORDS[:3], {"prompt": "why ?", "response": None}],
        b"",
        [],
        r"train.jsonl:4: field 'response' is null; give every row a prompt and a response string",
    ),
    "answerKey not a choice": (
        [CSQA_ROW | {"answerKey": "A"}, CSQA_ROW | {"answerKey": "C"}],
        b"",
        ["--config.data.task=commonsenseqa"],
        r"train.jsonl:2: answerKey 'C' is not one of the choice labels \['A', 'B'\]",
    ),
    "not UTF-8": (
        RECORDS[:2],
        b'{"prompt": "caf\xe9 ?", "response": "yes"}\n',  # Latin-1
        [],
        r"train.jsonl:3: not valid UTF-8 \(.*\): re-save the file as UTF-8",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_fails_in_one_line_and_leaves_the_checkpoints(checkpointed_run, tmp_path, case):
    lines, raw, overrides, message = BAD_DATA[case]
    path = write_records(tmp_path, lines)
    path.write_bytes(path.read_bytes() + raw)
    result, _ = _rerun_over(checkpointed_run, tmp_path, f"--config.data.train_path={path}", *overrides)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert re.search(message, error_line(result)), error_line(result)


def test_a_tokenizer_larger_than_the_embedding_fails_in_one_line(checkpointed_run, tiny_model_dir, tmp_path):
    """Its extra ids would index past the embedding: every loss NaN, every update skipped."""
    transformers = pytest.importorskip("transformers")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"extra{i}" for i in range(40)])
    tokenizer.save_pretrained(model)
    result, _ = _rerun_over(checkpointed_run, tmp_path, f"--config.model.path={model}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert re.search(r"the tokenizer in .* has 6[0-9] tokens but the model's embedding has 32 rows", error_line(result))


def test_a_bom_at_the_start_of_a_jsonl_file_reads_the_same_data(checkpointed_run, tmp_path):
    """The same records behind a UTF-8 BOM are the same data: the run resumes its checkpoint (same fingerprint)."""
    path = write_records(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result, run = _rerun_over(checkpointed_run, tmp_path, f"--config.data.train_path={path}", "--config.train.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2


@pytest.mark.parametrize(("overflow", "reported"), [("truncate", "1 had their prompt truncated and 0 were dropped")])
def test_an_over_long_example_is_truncated_and_counted(tiny_model_dir, tmp_path, overflow, reported):
    long = {"prompt": " ".join(["why"] * 40), "response": "the answer is blue ."}
    job = tiny_job(tiny_model_dir, write_records(tmp_path, [*RECORDS, long]))
    result = train(tmp_path / "run", *job, f"--config.data.overflow={overflow}", "--config.train.eval_before=False")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"of 13 training examples longer than data.max_length=24, {reported}" in result.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train_examples"] == 13


def test_a_quantized_base_trains_exports_merged_and_refuses_a_block_size_that_does_not_divide(tiny_model_dir, tmp_path):
    """int8 and NF4 bases through the CLI: a plain LoRA run's merged export is the dequantized base plus the adapter;
    an NF4 block of 48 does not divide the tiny model's 32 inputs."""
    job = tiny_job(tiny_model_dir, write_records(tmp_path))
    result = train(tmp_path / "run", *job, "--config.model.quantize=int8", "--config.adapter.kind=lora")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "export").iterdir()) == ["adapters", "merged", "peft"]
    bad = train(tmp_path / "bad", *job, "--config.model.quantize=nf4", "--config.model.quant_block_size=48")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
    assert "quantization block_size=48 does not divide d_in=32" in error_line(bad)
