"""``train.py`` with everything on a bucket, as on a multi-host TPU VM slice, against a GCS emulator on loopback: the
model and the data read from ``gs://``, ``output_dir=gs://...`` killed and resumed by a fresh "host" (an empty local
cache) bit for bit, the compilation cache in the bucket, and two processes refused when their output directories are
each one's own, accepted on one bucket and equal to one process through a resume."""

import json
import os
import signal
import time

import numpy as np
import pytest
from gcs_emulator import download, files, upload
from train_cli import one_job_on_processes, records, start, tiny_job, train, write_records

from moelora_jax.io.safetensors import SafetensorsFile
from moelora_jax.training.run_log import read_records

STEPS = 12
SETTINGS = ["--config.checkpoint.every=4", "--config.optim.decay_steps=100", "--config.adapter.dropout=0.1"]


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory, gcs):
    """A bucket holding the tiny model and the data, the job's overrides reading them from it, and the uninterrupted
    run of ``STEPS`` steps on local copies of both."""
    root = tmp_path_factory.mktemp("remote-job")
    data = write_records(root)
    bucket = gcs.bucket()
    upload(tiny_model_dir, bucket / "models" / "tiny")
    upload(data, bucket / "data" / "train.jsonl")
    reference = train(root / "reference", *tiny_job(tiny_model_dir, data), *SETTINGS, f"--config.train.steps={STEPS}")
    assert reference.returncode == 0, reference.stderr[-2000:]
    remote_args = [*tiny_job(f"{bucket}/models/tiny", f"{bucket}/data/train.jsonl"), *SETTINGS]
    return bucket, remote_args, root / "reference"


def _host(tmp_path, name):
    """The environment of a fresh host: its own empty cache (model copies, staging)."""
    return {"MOELORA_JAX_CACHE": str(tmp_path / name)}


def _adapters(directory):
    reader = SafetensorsFile(directory / "adapters.safetensors")
    return {name: reader.get(name) for name in reader}


def _wait_for_checkpoint(run, process, step, timeout=300):
    """Block until the background run's checkpoint ``step`` is complete in the bucket (orbax's commit file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if (run / "checkpoints" / str(step) / "commit_success.txt").exists():
            return
        time.sleep(0.01)
    raise TimeoutError(f"no checkpoint {step} within {timeout} s")


def test_a_run_on_a_bucket_killed_and_resumed_by_another_host_equals_the_local_run(job, tmp_path):
    bucket, args, reference = job
    run = bucket / "run"
    args = [*args, "--config.compilation_cache=output_dir"]
    process = start(
        os.fspath(run), *args, f"--config.train.steps={STEPS}", log=tmp_path / "first.log", env=_host(tmp_path, "host1")
    )
    _wait_for_checkpoint(run, process, 4)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    result = train(os.fspath(run), *args, f"--config.train.steps={STEPS}", env=_host(tmp_path, "host2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "free space is not checked" in result.stdout
    stored = files(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] in (4, 8), summary  # the save at 8 may have been complete too
    assert summary["output_dir"] == os.fspath(run) and summary["exports"] == [os.fspath(run / "export" / "adapters")]
    for name in ("config.json", "commands.jsonl", "metrics.jsonl", "curves.png", "summary.json"):
        assert name in stored
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in stored)
    assert {name.split("/")[1] for name in stored if name.startswith("checkpoints/")} >= {"8", "12"}
    # verified on the bucket too: each checkpoint's digest written before its commit marker, read at the resume
    assert {"checkpoints/8/digest.json", "checkpoints/12/digest.json"} <= set(stored)
    assert "has no digest" not in result.stderr
    assert any(name.startswith("compilation_cache/") for name in stored)
    assert len((run / "commands.jsonl").read_text().splitlines()) == 2  # each attempt's command line

    ours = [r for r in read_records(download(run, tmp_path / "copy") / "metrics.jsonl") if r["event"] == "train"]
    assert [(r["step"], r["loss"]) for r in ours] == [(r["step"], r["loss"]) for r in records(reference)]
    theirs = _adapters(reference / "export" / "adapters")
    mine = _adapters(tmp_path / "copy" / "export" / "adapters")
    assert mine.keys() == theirs.keys()
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)


def test_two_processes_with_output_dirs_of_their_own_are_refused_in_one_line(job, tmp_path):
    _, args, _ = job
    codes, logs = one_job_on_processes([tmp_path / "host0" / "run", tmp_path / "host1" / "run"], args, tmp_path)
    assert codes == [2, 2], logs
    for i in range(2):
        last = (tmp_path / f"process{i}.log").read_text().strip().splitlines()[-1]
        assert last.startswith(f"error: output_dir {tmp_path / f'host{i}' / 'run'} is not shared by the job's 2 "), last
        assert "(process 1 cannot see what process 0 wrote there): give every host the same directory" in last
    assert not (tmp_path / "host0" / "run" / "checkpoints").exists()


def test_two_processes_on_one_bucket_train_resume_and_match_one_process(job, tmp_path):
    """2 processes x 2 CPU devices (each its own cache, as two hosts) on ``gs://``, equal to 1 process x 4 devices."""
    bucket, args, _ = job
    one = train(tmp_path / "one", *args, "--config.train.steps=8", devices=4, env=_host(tmp_path, "one-host"))
    assert one.returncode == 0, one.stderr[-2000:]
    run = os.fspath(bucket / "two")
    envs = [_host(tmp_path, "host0"), _host(tmp_path, "host1")]
    for steps in (4, 8):
        codes, logs = one_job_on_processes([run, run], [*args, f"--config.train.steps={steps}"], tmp_path, envs)
        assert codes == [0, 0], logs
    copy = download(bucket / "two", tmp_path / "two")
    assert json.loads((copy / "summary.json").read_text())["resumed_from_step"] == 4
    ours, theirs = records(copy), records(tmp_path / "one")
    assert [r["step"] for r in ours] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=1e-5)
    two, one = _adapters(copy / "export" / "adapters"), _adapters(tmp_path / "one" / "export" / "adapters")
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
