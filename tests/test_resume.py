"""``train.py`` stopped and resumed every way a real run is: by itself, SIGKILL, SIGTERM, a damaged checkpoint, a
full disk, on two processes; each time the resumed run must equal the uninterrupted one. Also its outputs:
TensorBoard events (read by TensorBoard's own reader), the curves PNG and the exports."""

import contextlib
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from train_cli import error_line, one_job_on_processes, records, start, tiny_job, train, write_records

from moelora_jax.io.safetensors import SafetensorsFile
from moelora_jax.training.checkpoints import DIGEST_FILE
from moelora_jax.training.preemption import EXIT_PREEMPTED

STEPS = 24
SETTINGS = ["--config.checkpoint.every=4", "--config.optim.decay_steps=100", "--config.adapter.dropout=0.1"]
SETTINGS += ["--config.data.pack_length=48"]  # packed rows of about three examples each


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """The job's overrides and its uninterrupted run of ``STEPS`` steps."""
    root = tmp_path_factory.mktemp("job")
    args = [*tiny_job(tiny_model_dir, write_records(root)), *SETTINGS]
    result = train(root / "reference", *args, f"--config.train.steps={STEPS}")
    assert result.returncode == 0, result.stderr[-2000:]
    return args, root / "reference"


def _adapters(run):
    reader = SafetensorsFile(run / "export" / "adapters" / "adapters.safetensors")
    return {name: reader.get(name) for name in reader}


def _assert_same_run(run, reference):
    """Bit for bit: every training loss and every exported adapter tensor."""
    assert [(r["step"], r["loss"]) for r in records(run)] == [(r["step"], r["loss"]) for r in records(reference)]
    ours, theirs = _adapters(run), _adapters(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def _wait_for_step(run, process, step, timeout=300):
    """Block until the background run has logged training ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            if any(r["step"] >= step for r in records(run)):
                return
        time.sleep(0.005)
    raise TimeoutError(f"no step {step} within {timeout} s")


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_outputs_of_a_run(job):
    """TensorBoard's own reader sees the JSONL records; the PNG and the MoE-LoRA export are there."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _, run = job
    accumulator = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    losses = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records(run)]
    assert [e.step for e in accumulator.Scalars("eval/eval_loss")] == [0, STEPS]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "export").iterdir()) == ["adapters"]  # E = 4: no PEFT or merged form
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [STEPS - 4, STEPS]  # keep=2
    settings = json.loads((run / "config.json").read_text())  # the resolved settings
    assert settings["adapter"]["config"]["num_experts"] == 4 and settings["data"]["pack_length"] == 48
    logged = records(run)[0]
    assert {"loss", "grad_norm", "balance_loss", "z_loss", "load_cv", "expert_load"} <= logged.keys()
    assert "mole_balance_loss" not in logged  # MoLE's loss is not MoE-LoRA's


def test_a_run_stopped_and_continued_equals_the_uninterrupted_one(job, tmp_path):
    args, reference = job
    first = train(tmp_path / "run", *args, "--config.train.steps=13")
    assert first.returncode == 0, first.stderr[-2000:]
    second = train(tmp_path / "run", *args, f"--config.train.steps={STEPS}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert _summary(tmp_path / "run")["resumed_from_step"] == 13
    _assert_same_run(tmp_path / "run", reference)


def test_sigkill_then_rerun_equals_the_uninterrupted_run(job, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    args, reference = job
    run = tmp_path / "run"
    process = start(run, *args, f"--config.train.steps={STEPS}")
    _wait_for_step(run, process, 9)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed_at = max(r["step"] for r in records(run))
    result = train(run, *args, f"--config.train.steps={STEPS}")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed_from = _summary(run)["resumed_from_step"]
    assert resumed_from % 4 == 0 and 4 <= resumed_from <= killed_at  # the save at 8 may still have been in flight
    _assert_same_run(run, reference)
    # TensorBoard drops what the killed attempt logged after the checkpoint: each step once, as in the reference
    accumulator = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(job, tmp_path):
    args, reference = job
    run = tmp_path / "run"
    process = start(run, *args, f"--config.train.steps={STEPS}")
    _wait_for_step(run, process, 9)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    log = (tmp_path / "run.log").read_text().strip().splitlines()
    stopped = max(r["step"] for r in records(run))
    assert log[-1].startswith(f"stopped by SIGTERM after step {stopped}; the checkpoint is in {run / 'checkpoints'}")
    assert max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == stopped
    result = train(run, *args, f"--config.train.steps={STEPS}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _summary(run)["resumed_from_step"] == stopped
    _assert_same_run(run, reference)


def test_checkpoints_of_another_config_or_damaged_are_refused_in_one_line(job, tmp_path):
    args, reference = job
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = train(run, *args, "--config.adapter.num_experts=8", f"--config.train.steps={STEPS + 4}")
    assert result.returncode == 2
    line = error_line(result)
    assert "belongs to another configuration (adapter.num_experts: 4 -> 8)" in line, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    latest = run / "checkpoints" / str(STEPS)
    data = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = data.read_bytes()
    middle = len(original) // 2  # 16 bytes changed, the size kept: bit rot, which orbax alone reads as data
    data.write_bytes(
        original[:middle] + bytes(b ^ 0x5A for b in original[middle : middle + 16]) + original[middle + 16 :]
    )
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = train(run, *args, f"--config.train.steps={STEPS}")
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: checkpoint.resume=latest: checkpoint ") and f"{latest} is damaged: state/" in line
    assert f"restore step {STEPS - 4} instead, the newest checkpoint that verifies" in line, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # written before digests existed: the file cut short, orbax's own error (a bare Exception) as one line
    (latest / DIGEST_FILE).unlink()
    data.write_bytes(original[: len(original) // 2])
    result = train(run, *args, f"--config.train.steps={STEPS}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has no digest" in result.stderr and "moelora_jax/training/checkpoints.py" not in result.stderr
    assert f"{latest} cannot be read (" in result.stderr and f"restore step {STEPS - 4} instead" in result.stderr

    result = train(run, *args, f"--config.train.steps={STEPS}", f"--config.checkpoint.resume={STEPS - 4}")
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_run(run, reference)


def test_a_read_only_output_dir_fails_in_one_line(job, tmp_path, tmpfs):
    args, _ = job
    if os.geteuid() == 0:
        context = tmpfs(tmp_path / "ro", "ro,size=1m")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        context = contextlib.nullcontext(tmp_path / "ro")
    with context as read_only:
        result = train(read_only / "run", *args)
    assert result.returncode == 2
    assert error_line(result).startswith(f"error: output_dir {read_only / 'run'} is not writable (")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_full_disk_fails_in_one_line_and_keeps_the_last_checkpoint(job, tmp_path, tmpfs):
    args, _ = job
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        run = disk / "run"
        keep_one = [*args, "--config.checkpoint.keep=1"]
        result = train(run, *keep_one, "--config.train.steps=4")
        assert result.returncode == 0, result.stderr[-2000:]
        filler = disk / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * (shutil.disk_usage(disk).free - 96 * 1024))  # room for logs, not a checkpoint
        result = train(run, *keep_one, "--config.train.steps=12")
        assert result.returncode == 2
        line = error_line(result)
        assert "MiB free" in line and "(steps [4]) are intact" in line, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        filler.unlink()
        result = train(run, *keep_one, "--config.train.steps=12")
        assert result.returncode == 0, result.stderr[-2000:]
        assert _summary(run)["resumed_from_step"] == 4


def _two_processes(run, args):
    codes, logs = one_job_on_processes([run, run], args, run.parent)
    assert codes == [0, 0], logs


def test_two_processes_train_resume_and_match_one(job, tmp_path):
    """jax.distributed on localhost: 2 processes x 2 CPU devices equal 1 process x 4 devices, through a resume."""
    args, _ = job
    steps = [*args, "--config.train.steps=8"]
    one = train(tmp_path / "one", *steps, devices=4)
    assert one.returncode == 0, one.stderr[-2000:]
    _two_processes(tmp_path / "two", [*args, "--config.train.steps=4"])
    _two_processes(tmp_path / "two", steps)
    assert _summary(tmp_path / "two")["resumed_from_step"] == 4
    ours, theirs = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in ours] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=1e-5)
    two, one = _adapters(tmp_path / "two"), _adapters(tmp_path / "one")
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
