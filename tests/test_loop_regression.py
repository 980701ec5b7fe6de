"""The training loop against a record of the loop before it ran ahead of the host.

``fixtures/loop_before_prefetch.npz`` holds every training loss and every exported adapter tensor of one tiny
``train.py`` run, written by the loop of commit d58b42c (which packed each batch after the previous step had
finished and fetched every step's metrics at once). The run today must reproduce them bit for bit: running ahead,
fetching metrics late and checking stops less often change when the host works, never what the devices compute.
XLA's CPU code is capped at AVX2 in both runs, so that the record means the same on any x86-64 machine that has it.
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


def tiny_run(model_dir: Path, root: Path) -> dict[str, np.ndarray]:
    """The losses (``loss``, by step) and exported adapters (``adapter/<name>``) of the recorded job."""
    args = [*tiny_job(model_dir, write_records(root, RECORDS)), *SETTINGS]
    result = train(root / "run", *args, env=ISA)
    assert result.returncode == 0, result.stderr[-2000:]
    reader = SafetensorsFile(root / "run" / "export" / "adapters" / "adapters.safetensors")
    values = {f"adapter/{name}": np.asarray(reader.get(name)) for name in reader}
    values["loss"] = np.asarray([r["loss"] for r in records(root / "run")], np.float64)
    values["step"] = np.asarray([r["step"] for r in records(root / "run")])
    return values


def test_the_loop_reproduces_the_record_of_the_loop_before_it_bit_for_bit(tiny_model_dir, tmp_path):
    recorded = dict(np.load(FIXTURE))
    ours = tiny_run(tiny_model_dir, tmp_path)
    assert ours.keys() == recorded.keys()
    np.testing.assert_array_equal(ours["step"], np.arange(1, 11))
    for name, value in recorded.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
