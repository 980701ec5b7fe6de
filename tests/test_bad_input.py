"""Bad input given to ``train.py`` as a user gives it, beside a run that already finished: each is one ``error:``
line and exit code 2, without a traceback, and the run's directory is byte for byte as it was (a refused attempt
is not recorded)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_cli import ROOT, environment, tiny_job, train, write_records

CASES = {
    "a config file that does not exist": (
        {"config": "no_such_config.py"},
        "cannot load the config file: [Errno 2] No such file or directory:",
    ),
    "a config file with a syntax error": ({"config": "syntax_error.py"}, "has a syntax error at line 1"),
    "cuDNN attention without a GPU": (
        {"overrides": ["--config.model.attention=cudnn"]},
        "model.attention=cudnn is a kernel for NVIDIA GPUs and these devices are cpu: use model.attention=xla",
    ),
    "a model directory without tokenizer.json": (
        {"model": "no_tokenizer"},
        "has no tokenizer (tokenizer.json, or a sentencepiece tokenizer.model)",
    ),
    "a truncated tokenizer.json": ({"model": "truncated_tokenizer"}, "cannot be loaded (Unterminated string"),
    "a corrupt Parquet file": ({"data": "corrupt.parquet"}, "corrupt.parquet cannot be read as parquet ("),
    "a datasets hub name while offline": (
        {
            "overrides": ["--config.data.train_path=someone/some_dataset"],
            "env": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        },
        "someone/some_dataset: the datasets hub name cannot be loaded (",
    ),
    "W&B without a login": (
        {"overrides": ["--config.log.wandb=True"], "env": {"WANDB_API_KEY": None, "WANDB_MODE": None, "HOME": "{tmp}"}},
        "log.wandb=True but W&B has no login (",
    ),
    "every example dropped for its length": (
        {"overrides": ["--config.data.overflow=drop", "--config.data.max_length=4"]},
        "all 12 training examples are longer than data.max_length=4 and data.overflow=drop dropped them",
    ),
    "a gs:// output_dir without a bucket": ({"output_dir": "gs:///run"}, "gs:///run names no bucket"),
    "MoLE sources in a bucket": (
        {"overrides": ["--config.mole.loras=gs://bucket/a,gs://bucket/b"], "config": "mole.py"},
        "mole.loras: gs://bucket/a is in an object store; MoLE's LoRA sources must be local",
    ),
}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished tiny run, the job's overrides, and files that are bad in each way the cases need."""
    root = tmp_path_factory.mktemp("bad-input")
    args = tiny_job(tiny_model_dir, write_records(root))
    result = train(root / "run", *args, "--config.train.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    (root / "syntax_error.py").write_text("def get_config(:\n")
    (root / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    for name in ("no_tokenizer", "truncated_tokenizer"):
        shutil.copytree(tiny_model_dir, root / name)
    (root / "no_tokenizer" / "tokenizer.json").unlink()
    text = (root / "truncated_tokenizer" / "tokenizer.json").read_text()
    (root / "truncated_tokenizer" / "tokenizer.json").write_text(text[: len(text) // 2])
    return root, args


def _contents(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_the_run_as_it_was(finished, tiny_model_dir, case):
    root, args = finished
    how, message = CASES[case]
    if "model" in how:
        args = [a.replace(str(tiny_model_dir), str(root / how["model"])) for a in args]
    if "data" in how:
        args = [f"--config.data.train_path={root / how['data']}" if "train_path" in a else a for a in args]
    config = how.get("config", "llama_moelora.py")
    config = f"{ROOT / 'configs' / config}:smoke" if (ROOT / "configs" / config).exists() else str(root / config)
    command = [sys.executable, str(ROOT / "train.py"), f"--config={config}"]
    command += [f"--config.output_dir={how.get('output_dir', root / 'run')}", *args, *how.get("overrides", [])]
    env = environment(1, {k: v.format(tmp=root) for k, v in how.get("env", {}).items() if v is not None})
    env = {k: v for k, v in env.items() if how.get("env", {}).get(k, "") is not None}  # None: unset
    before = _contents(root / "run")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], result.stderr[-3000:]
    assert message in lines[-1] and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _contents(root / "run") == before
