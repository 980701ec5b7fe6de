"""``experiments/reproduce.py``: its runs are valid configs, and finished runs become tables and plots."""

import json
from pathlib import Path

import pytest

from moelora_jax.config_file import load_config, load_module
from moelora_jax.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


reproduce = load_module(ROOT / "experiments" / "reproduce.py")


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_every_run_of_a_protocol_is_a_valid_config(name, tmp_path):
    protocol = reproduce.protocols(tmp_path)[name]
    runs = reproduce.grid(protocol, list(reproduce.METHODS))
    assert len(runs) == len(reproduce.METHODS) * 2 * 3 and set(reproduce.CORE_METHODS) <= set(reproduce.METHODS)
    for optimizer, rates in protocol.learning_rates.items():
        assert max(rates) / min(rates) == pytest.approx(100)  # three learning rates spanning a factor of 100
        assert optimizer in reproduce.GATE_LR_RATIO
    for index, run in enumerate(runs):
        config = load_config(ROOT / "configs" / "llama_moelora.py", protocol.preset)
        config.update_from_flattened_dict(reproduce.settings(protocol, run, tmp_path / run.name, {}, index == 0))
        settings = Settings.from_config(config)  # unknown keys or wrong types raise above, bad values here
        adapter = settings.adapter.config
        assert (settings.optim.family, settings.optim.lr) == (run.optimizer, run.lr)
        assert (adapter.num_experts > 1) == run.method.startswith("moe")
        assert settings.optim.riemann == ("riemann" in run.method)
        assert adapter.mixer == ("moslora" in run.method)
        if run.method.startswith("moe"):  # (plain LoRA has no gate, so no gradient strategy)
            assert (adapter.strategy == "sqrt_gate") == run.method.endswith("sqrt_gate")
    argv = reproduce.command(protocol, {"optim.lr": 1e-3 * 3e-3, "train.eval_before": False})
    assert argv[-2:] == ["--config.optim.lr=3e-06", "--config.train.eval_before=False"]


def _finished_run(root: Path, run, accuracy: float, base: bool) -> None:
    directory = root / run.name
    directory.mkdir(parents=True)
    (directory / "command.txt").write_text(f"python train.py {run.name}\n")
    records = [{"event": "train", "step": s, "loss": 2.0 / s} for s in (1, 2, 3)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "accuracy_before": 0.1 if base else None,
        "eval_loss_before": 3.0 if base else None,
        "accuracy_after": accuracy,
        "eval_loss_after": 1.0 - accuracy,
        "skipped_updates": 0,
        "train_seconds": 10.0,
    }
    (directory / "summary.json").write_text(json.dumps(summary))


def test_finished_runs_become_tables_and_plots(tmp_path):
    protocol = reproduce.protocols(tmp_path)["cpu"]
    runs = reproduce.grid(protocol, ["lora"])
    for index, run in enumerate(runs[:-1]):  # the last one has not finished
        _finished_run(tmp_path / "runs", run, accuracy=0.25 * (index % 3 + 1), base=index == 0)
    collected = reproduce.collect("cpu", reproduce.grid(protocol, list(reproduce.METHODS)), tmp_path / "runs")
    assert collected["base"] == {"accuracy": 0.1, "eval_loss": 3.0}
    assert len(collected["runs"]) == 5 and collected["runs"][0]["train_loss"] == [[1, 2.0], [2, 1.0], [3, 2.0 / 3]]
    lines = reproduce.tables(collected, protocol).splitlines()
    sgd = next(line for line in lines if line.startswith("| LoRA |"))
    assert sgd == "| LoRA | 0.250 | 0.500 | 0.750 | 0.500 | 0.250 | 0.500 |"  # per lr, mean, worst, spread
    adamw = [line for line in lines if line.startswith("| LoRA |")][2]
    assert adamw == "| LoRA | 0.250 | 0.500 | n/a | n/a | n/a | n/a |"
    written = reproduce.plot(collected, protocol, tmp_path)
    assert [p.name for p in written] == ["loss_vs_step.png", "accuracy_vs_lr.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
