"""The training loop against a record of the loop before it ran ahead of the host, and against itself.

``fixtures/loop_before_prefetch.npz`` holds every training loss and every exported adapter tensor of one tiny
``train.py`` run, written by the loop of commit d58b42c (which packed each batch after the previous step had
finished and fetched every step's metrics at once). The run today must reproduce them: running ahead, fetching
metrics late and checking stops less often change when the host works, never what the devices compute.

Bit for bit only holds on one machine with one set of packages: the record, made on 2026-12-05, drifted by
3.7e-9 (a relative 1.3e-6, in 9 of a gate's 128 values) by 2026-12-06 on a commit that had reproduced it in CI,
with XLA's CPU code capped at AVX2 in both runs, so it is compared to 1e-5 of each value (a batch drawn or packed
differently moves the losses by a hundredth or more). Bit for bit is asserted where it holds: the same job run
twice today, once with the host fetching metrics, evaluating and checkpointing at every few steps and once almost
never.
"""

from pathlib import Path

import numpy as np
from train_cli import records, tiny_job, train, write_records

from moelora_jax.io.safetensors import SafetensorsFile

FIXTURE = Path(__file__).with_name("fixtures") / "loop_before_prefetch.npz"
SETTINGS = [
    "--config.train.steps=10",
    "--config.train.batch_size=4",
    "--config.train.micro_batches=2",
    "--config.train.eval_every=5",
    "--config.checkpoint.every=4",
    "--config.adapter.dropout=0.1",
    "--config.data.pack_length=48",
    "--config.optim.decay_steps=100",
]
RECORDS = [  # of several lengths, so that a batch drawn or packed differently changes the losses
    {"prompt": "what colour is the sky ?", "response": "the answer is blue .", "label": "blue"},
    {"prompt": "why is the sky blue ?", "response": "the answer is a .", "label": "a"},
    {"prompt": "question : is the sky blue ?", "response": "yes", "label": "yes"},
    {"prompt": "passage : the sky . title : sky . question : what colour ?", "response": "blue", "label": "blue"},
    {"prompt": "a b c ?", "response": "the answer is c .", "label": "c"},
    {"prompt": "what is the answer ?", "response": "no", "label": "no"},
] * 2
ISA = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false --xla_cpu_max_isa=AVX2"}


def tiny_run(model_dir: Path, root: Path, *overrides: str) -> dict[str, np.ndarray]:
    """The losses (``loss``) and steps (``step``) of the logged steps and the exported adapters (``adapter/<name>``)
    of the recorded job, with ``overrides`` of its settings."""
    root.mkdir(parents=True, exist_ok=True)
    args = [*tiny_job(model_dir, write_records(root, RECORDS)), *SETTINGS, *overrides]
    result = train(root / "run", *args, env=ISA)
    assert result.returncode == 0, result.stderr[-2000:]
    reader = SafetensorsFile(root / "run" / "export" / "adapters" / "adapters.safetensors")
    values = {f"adapter/{name}": np.asarray(reader.get(name)) for name in reader}
    values["loss"] = np.asarray([r["loss"] for r in records(root / "run")], np.float64)
    values["step"] = np.asarray([r["step"] for r in records(root / "run")])
    return values


def test_the_loop_reproduces_the_record_of_the_loop_before_it(tiny_model_dir, tmp_path):
    recorded = dict(np.load(FIXTURE))
    ours = tiny_run(tiny_model_dir, tmp_path)
    assert ours.keys() == recorded.keys()
    np.testing.assert_array_equal(ours["step"], np.arange(1, 11))
    for name, value in recorded.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_when_the_host_waits_never_changes_what_the_devices_compute(tiny_model_dir, tmp_path):
    often = tiny_run(tiny_model_dir, tmp_path / "often")
    rarely = tiny_run(
        tiny_model_dir,
        tmp_path / "rarely",
        "--config.train.log_every=4",
        "--config.train.eval_every=0",
        "--config.checkpoint.every=0",
    )
    np.testing.assert_array_equal(rarely["step"], [4, 8, 10])
    np.testing.assert_array_equal(rarely["loss"], often["loss"][rarely["step"] - 1])
    for name in often.keys() - {"step", "loss"}:
        np.testing.assert_array_equal(rarely[name], often[name], err_msg=name)
