"""``experiments/``: every protocol's runs are valid configs and the recorded commands, finished runs become tables
and plots (the committed ``resolve`` results among them), the ``resolve`` protocol's intervals have the known answers,
and a resumed protocol skips finished runs and gives the same tables."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from moelora_jax.data.encoding import Example
from moelora_jax.data.tasks import TASKS
from moelora_jax.errors import UserError
from moelora_jax.evaluation.scoring import EXAMPLES_FILE, example_records
from moelora_jax.training.config_file import load_config
from moelora_jax.training.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CPU_RESULTS = RESULTS / "cpu" / "results.json"

sys.path.insert(0, str(ROOT))  # experiments/ is the repository's, as `python experiments/reproduce.py` finds it
import experiments.runs  # noqa: E402
from experiments import reporting  # noqa: E402
from experiments.protocols import (  # noqa: E402
    BEST_LEARNING_RATES,
    CORE_METHODS,
    GATE_LR_RATIO,
    METHODS,
    Protocol,
    protocols,
)
from experiments.runs import Run, claimed, launch  # noqa: E402
from experiments.stats import bootstrap_interval, statistics  # noqa: E402


def _check_configs(runs: list[Run], tmp_path: Path) -> list[Settings]:
    """Every run is a valid config (unknown keys or wrong types raise, bad values too)."""
    out = []
    for run in runs:
        config = load_config(ROOT / "configs" / "llama_moelora.py", run.preset)
        config.update_from_flattened_dict(run.overrides | {"output_dir": str(tmp_path / run.name)})
        out.append(Settings.from_config(config))
    return out


def _check_method(settings: Settings, method: str) -> None:
    adapter = settings.adapter.config
    assert (adapter.num_experts > 1) == method.startswith("moe")
    assert settings.optim.riemann == ("riemann" in method)
    assert adapter.mixer == ("moslora" in method)
    if method.startswith("moe"):  # (plain LoRA has no gate, so no gradient strategy)
        assert (adapter.strategy == "sqrt_gate") == method.endswith("sqrt_gate")


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_every_run_of_a_protocol_is_a_valid_config(name, tmp_path):
    protocol = protocols(tmp_path)[name]
    runs = protocol.runs(list(METHODS))
    assert len(runs) == len(METHODS) * 2 * 3 and set(CORE_METHODS) <= set(METHODS)
    for optimizer, rates in protocol.learning_rates.items():
        assert max(rates) / min(rates) == pytest.approx(100)  # three learning rates spanning a factor of 100
        assert optimizer in GATE_LR_RATIO
    assert [run.overrides["train.eval_before"] for run in runs] == [True] + [False] * (len(runs) - 1)
    for run, settings in zip(runs, _check_configs(runs, tmp_path), strict=True):
        assert (settings.optim.family, settings.optim.lr) == (run.optimizer, run.lr)
        _check_method(settings, run.method)
    argv = Run("lora", "sgd", 1e-3, overrides={"optim.lr": 1e-3 * 3e-3, "train.eval_before": False}).command("o", {})
    assert argv[-3:] == ["--config.optim.lr=3e-06", "--config.train.eval_before=False", "--config.output_dir=o"]


def test_a_run_is_named_by_what_its_protocol_varies():
    grid, paired = Run("lora", "sgd", 1e-2), Run("lora", "sgd", 1e-2, "sst2", 1, "paper", {"optim.lr": 1e-2})
    assert (grid.name, paired.name) == ("lora-sgd-1e-02", "sst2/lora-sgd-1e-02-seed1")
    assert grid.key == {"method": "lora", "optimizer": "sgd", "lr": 1e-2}
    assert list(paired.key.items()) == [
        ("task", "sst2"),
        ("method", "lora"),
        ("optimizer", "sgd"),
        ("lr", 1e-2),
        ("seed", 1),
    ]
    assert paired == Run("lora", "sgd", 1e-2, "sst2", 1) != grid  # the preset and overrides do not name it
    assert paired.command("out", {"train.steps": "2"})[2:] == [
        "--config=configs/llama_moelora.py:paper",
        "--config.optim.lr=0.01",
        "--config.output_dir=out",
        "--config.train.steps=2",
    ]


@pytest.mark.parametrize("name", ["cpu", "resolve"])
def test_a_protocol_still_runs_the_recorded_commands(name):
    recorded = json.loads((RESULTS / name / "results.json").read_text())["runs"]
    paths = [arg.split("=", 1)[1] for r in recorded for arg in r["command"].split() if "data.train_path=" in arg]
    data_dir = Path(paths[0]).parents[2] if paths else ROOT  # where the runs read SST-2: glue_data/SST-2/train.tsv
    runs = protocols(data_dir)[name].runs(list(CORE_METHODS))
    by_key = {tuple(r[k] for k in runs[0].key): r["command"] for r in recorded}
    for run in runs:
        assert " ".join(run.command(f"runs/reproduce/{name}/{run.name}", {})) == by_key[tuple(run.key.values())]


def test_the_resolve_protocol_runs_each_optimizer_at_its_best_rate_of_the_cpu_grid(tmp_path):
    resolve = protocols(tmp_path)["resolve"]
    accuracy: dict = {}
    for r in json.loads(CPU_RESULTS.read_text())["runs"]:
        if r["method"] in CORE_METHODS:
            accuracy.setdefault(r["optimizer"], {}).setdefault(r["lr"], []).append(r["accuracy"])
    best = {optimizer: max(rates, key=lambda lr: np.mean(rates[lr])) for optimizer, rates in accuracy.items()}
    assert BEST_LEARNING_RATES == best == {"sgd": 1e-2, "adamw": 1e-3}
    assert resolve.learning_rates == {"sgd": (1e-2,), "adamw": (1e-3,)} and resolve.paired

    trials = resolve.runs(list(CORE_METHODS))
    assert len(trials) == 48 and len(resolve.seeds) >= 3 and set(resolve.tasks) == {"bbc_news", "sst2"}
    assert [t.seed for t in trials[:16]] == [0] * 16  # seed by seed: a protocol stopped part-way has whole seeds
    assert len({t.name for t in trials}) == 48
    assert [t.name for t in trials if t.overrides["train.eval_before"]] == [trials[0].name, trials[8].name]
    for trial, settings in zip(trials, _check_configs(trials, tmp_path), strict=True):
        assert (settings.optim.family, settings.optim.lr, settings.data.task) == (trial.optimizer, trial.lr, trial.task)
        assert settings.train.seed == trial.seed
        subset = {"bbc_news": (0, -1), "sst2": (500, 0)}[trial.task]  # all 424 test articles; 500 sentences, fixed
        assert (settings.data.max_eval_examples, settings.data.eval_seed) == subset
        assert settings.train.steps == {"bbc_news": 20, "sst2": 60}[trial.task]
        _check_method(settings, trial.method)
    assert trials[8].task == "sst2" and trials[0].task == "bbc_news"
    with pytest.raises(UserError, match=r"--set train\.seed would undo the protocol"):
        resolve.launch(["lora"], tmp_path, {"train.seed": "3"})
    with pytest.raises(UserError, match=r"SST-2/train\.tsv does not exist: point --data-dir"):
        resolve.launch(["lora"], tmp_path, {})
    with pytest.raises(UserError, match=r"commonsenseqa/train_rand_split\.jsonl does not exist: point --data-dir"):
        protocols(tmp_path)["paper"].launch(["lora"], tmp_path, {})


def test_example_records_say_which_answers_are_right():
    task = TASKS["sst2"]
    examples = [Example("p", "", label, f"dev.tsv:{i + 2}") for i, label in enumerate(["positive", "negative"] * 2)]
    generated = ["The answer is positive.", "The answer is positive.", "no idea", "The answer is negative!"]
    records = example_records(task, generated, examples)
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert [r["answer"] for r in records] == ["positive", "positive", None, "negative"]
    assert [(r["index"], r["source"], r["label"]) for r in records][1] == (1, "dev.tsv:3", "negative")
    assert np.mean([r["correct"] for r in records]) == task.score(generated, examples)


def _binomial_quantile(n: int, p: float, q: float) -> float:
    """The q-quantile of Binomial(n, p) / n: the least k / n with P(X <= k) >= q."""
    cdf = np.cumsum([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)])
    return int(np.searchsorted(cdf, q)) / n


def test_one_seed_bootstraps_to_the_binomial_distribution():
    # resampling 400 examples of which 300 are right draws Binomial(400, 0.75) / 400 exactly: the percentile
    # interval must be its quantiles, to within one example
    scores = np.zeros((1, 400))
    scores[0, :300] = 1
    mean, lo, hi = bootstrap_interval(scores)
    assert mean == 0.75
    assert lo == pytest.approx(_binomial_quantile(400, 0.75, 0.025), abs=1 / 400 + 1e-12)
    assert hi == pytest.approx(_binomial_quantile(400, 0.75, 0.975), abs=1 / 400 + 1e-12)
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.75 * 0.25 / 400), abs=2 / 400)  # the normal one


def test_seeds_are_resampled_as_well_as_examples():
    # seed 0 gets everything right, seed 1 nothing: resampled means are 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    scores = np.stack([np.ones(50), np.zeros(50)])
    assert bootstrap_interval(scores) == (0.5, 0.0, 1.0)
    assert bootstrap_interval(np.full((3, 20), 0.25)) == (0.25, 0.25, 0.25)
    with pytest.raises(UserError, match="seeds x examples"):
        bootstrap_interval(np.ones(5))


def test_a_paired_difference_resolves_what_separate_intervals_do_not():
    rng = np.random.default_rng(1)
    b = (rng.random((3, 400)) < 0.5).astype(float)
    a = b.copy()
    for seed in range(3):  # A = B, plus 10 more right answers on each seed
        a[seed, np.flatnonzero(b[seed] == 0)[:10]] = 1
    _, a_lo, _ = bootstrap_interval(a)
    _, _, b_hi = bootstrap_interval(b)
    assert a_lo < b_hi  # the two cells' intervals overlap
    mean, lo, _ = bootstrap_interval(a - b)
    assert mean == pytest.approx(30 / 1200) and lo > 0  # on the same seeds and examples, A is better
    assert bootstrap_interval(b - b) == (0.0, 0.0, 0.0)
    # the same 30 gained on seed 0 alone: (2/3)^3 = 30% of the resamples leave seed 0 out, so the interval reaches 0
    one_seed = np.zeros((3, 400))
    one_seed[0, :30] = 1
    assert bootstrap_interval(one_seed)[1] == 0.0


def _finished_run(
    root: Path,
    run,
    accuracy: float,
    base: bool,
    correct: str | None = None,
    answers: list | None = None,
    labels: list | None = None,
) -> None:
    """A run directory as ``train.py`` leaves it; with ``eval_examples.jsonl`` from ``correct`` (per-example
    outcomes: labels alternate, a wrong answer is the other label) or from ``answers`` to ``labels``."""
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
    if correct is not None:
        labels = [("negative", "positive")[i % 2] for i in range(len(correct))]
        answers = [
            label if c == "1" else ({"negative", "positive"} - {label}).pop()
            for c, label in zip(correct, labels, strict=True)
        ]
    if answers is not None:
        lines = [
            {"index": i, "source": f"dev.tsv:{i + 2}", "label": label, "answer": answer, "correct": answer == label}
            for i, (label, answer) in enumerate(zip(labels, answers, strict=True))
        ]
        (directory / EXAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_finished_runs_become_tables_and_plots(tmp_path):
    protocol = protocols(tmp_path)["cpu"]
    runs = protocol.runs(["lora"])
    for index, run in enumerate(runs[:-1]):  # the last one has not finished
        _finished_run(tmp_path / "runs", run, accuracy=0.25 * (index % 3 + 1), base=index == 0)
    collected = protocol.collect(tmp_path / "runs")
    assert collected["base"] == {"accuracy": 0.1, "eval_loss": 3.0}
    assert len(collected["runs"]) == 5 and collected["runs"][0]["train_loss"] == [[1, 2.0], [2, 1.0], [3, 2.0 / 3]]
    lines = reporting.grid_tables(collected, protocol).splitlines()
    sgd = next(line for line in lines if line.startswith("| LoRA |"))
    assert sgd == "| LoRA | 0.250 | 0.500 | 0.750 | 0.500 | 0.250 | 0.500 |"  # per lr, mean, worst, spread
    adamw = [line for line in lines if line.startswith("| LoRA |")][2]
    assert adamw == "| LoRA | 0.250 | 0.500 | n/a | n/a | n/a | n/a |"
    written = reporting.grid_plots(collected, protocol, tmp_path)
    assert [p.name for p in written] == ["loss_vs_step.png", "accuracy_vs_lr.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    # the command line, as docs/results.md runs it, writes the same results and tables
    out, script = tmp_path / "results", "experiments/reproduce.py"
    argv = [sys.executable, script, "--collect", "--output", str(tmp_path / "runs"), "--results", str(out)]
    printed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads((out / "results.json").read_text()) == collected
    assert (out / "tables.md").read_text() == reporting.grid_tables(collected, protocol)
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_lr.png",
        "loss_vs_step.png",
        "results.json",
        "tables.md",
    ]
    assert printed.endswith(f"results, tables and plots in {out}/\n")


def _tiny_resolve(seeds=(0, 1, 2)):
    return Protocol("resolve", "", overrides={}, learning_rates={"sgd": (1e-2,)}, tasks={"sst2": {}}, seeds=seeds)


def test_finished_trials_become_intervals_verdicts_and_plots(tmp_path):
    resolve = _tiny_resolve()
    outcomes = {  # per method, per seed: 4 held-out examples
        "moe_lora": ["0000", "1000", "0000"],
        "moe_lora+riemann": ["1111", "1111", "1110"],
        "moe_lora+riemann+sqrt_gate": ["0000", "0000"],  # seed 2 not finished
    }
    for method, per_seed in outcomes.items():
        for seed, correct in enumerate(per_seed):
            trial = Run(method, "sgd", 1e-2, "sst2", seed)
            _finished_run(
                tmp_path, trial, correct.count("1") / 4, base=seed == 0 and method == "moe_lora", correct=correct
            )
    collected = resolve.collect(tmp_path)
    assert collected["base"] == {"sst2": {"accuracy": 0.1, "eval_loss": 3.0}}
    assert collected["examples"] == {"sst2": ["dev.tsv:2", "dev.tsv:3", "dev.tsv:4", "dev.tsv:5"]}
    cell = next(c for c in collected["cells"] if c["method"] == "moe_lora+riemann")
    assert (cell["seeds"], cell["accuracy"], cell["mean"]) == ([0, 1, 2], [1.0, 1.0, 0.75], 11 / 12)
    verdicts = {(c["a"], c["b"]): (c["seeds"], c["verdict"]) for c in collected["claims"]}
    assert verdicts == {
        ("moe_lora+riemann", "moe_lora"): ([0, 1, 2], "agrees"),  # right on 10 more of 12 (seed, example) pairs
        ("moe_lora+riemann+sqrt_gate", "moe_lora"): ([0, 1], "not resolved"),  # one of 8 pairs differs
        ("moe_lora+riemann+sqrt_gate", "moe_lora+riemann"): ([0, 1], "disagrees"),  # wrong on all 8 where B is right
    }
    lines = reporting.paired_tables(collected, resolve).splitlines()
    assert "### SST-2 (4 held-out examples)" in lines and "Base model: accuracy 0.100, held-out loss 3.000." in lines
    row = next(line for line in lines if line.startswith("| MoE-LoRA + riemann + sqrt-gate |"))
    assert row == "| MoE-LoRA + riemann + sqrt-gate | 0.000 [0.000, 0.000] (2 of 3 seeds) |"
    assert "| MoE-LoRA + riemann | 2 | 0.750, 0.250 |" in lines  # each seed's accuracy and held-out loss
    assert "- Sun et al. 2025, sqrt-gate adds to riemann, under sgd: disagrees on SST-2." in lines
    written = reporting.paired_plots(collected, resolve, tmp_path)
    assert [p.name for p in written] == ["accuracy.png", "claims.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)

    trial = Run("lora", "sgd", 1e-2, "sst2", 0)
    _finished_run(tmp_path, trial, 0.0, base=False, correct="000")  # scored on other examples
    with pytest.raises(UserError, match="other examples than the task's other runs"):
        resolve.collect(tmp_path)
    (tmp_path / trial.name / EXAMPLES_FILE).unlink()
    with pytest.raises(UserError, match=f"has no {EXAMPLES_FILE}"):
        resolve.collect(tmp_path)


def test_runs_that_give_one_answer_are_flagged(tmp_path):
    labels = ["negative", "positive"] * 4 + ["negative"] * 2  # 6 of 10 negative
    runs = {
        "moe_lora": ["negative"] * 10,  # 0.6 from the label bias alone
        "moe_lora+riemann": ["negative"] * 9 + ["positive"],  # 90%: still one answer
        "moe_lora+riemann+sqrt_gate": labels,  # right on all: its commonest answer has 60%
    }
    for method, answers in runs.items():
        accuracy = np.mean([a == label for a, label in zip(answers, labels, strict=True)])
        trial = Run(method, "sgd", 1e-2, "sst2", 0)
        _finished_run(tmp_path, trial, accuracy, base=False, answers=answers, labels=labels)
    resolve = _tiny_resolve(seeds=(0,))
    collected = resolve.collect(tmp_path)
    assert collected["majority"] == {"sst2": {"label": "negative", "accuracy": 0.6}}
    shares = {r["method"]: (r["top_answer"], r["top_answer_share"]) for r in collected["runs"]}
    assert shares == {
        "moe_lora": ("negative", 1.0),
        "moe_lora+riemann": ("negative", 0.9),
        "moe_lora+riemann+sqrt_gate": ("negative", 0.6),
    }
    flags = {(c["a"], c["b"]): c["one_answer"] for c in collected["claims"]}
    assert flags[("moe_lora+riemann", "moe_lora")] == ["A", "B"]
    assert flags[("moe_lora+riemann+sqrt_gate", "moe_lora+riemann")] == ["B"]
    lines = reporting.paired_tables(collected, resolve).splitlines()
    assert "Always answering the commonest label (negative) scores 0.600." in lines
    assert "| MoE-LoRA | 0 | 0.600, 0.400 ('negative' to 100%) |" in lines
    assert "| MoE-LoRA + riemann + sqrt-gate | 0 | 1.000, 0.000 |" in lines
    riemann, sqrt_gate = (
        next(x for x in lines if x.startswith(f"- {paper}, {claim},"))
        for paper, claim in [
            ("Zhang & Pilanci 2024", "riemann_precond helps"),
            ("Sun et al. 2025", "sqrt-gate adds to riemann"),
        ]
    )
    assert riemann.endswith("On SST-2 each method gives one answer in some seed: there it partly compares biases.")
    assert sqrt_gate == "- Sun et al. 2025, sqrt-gate adds to riemann, under sgd: agrees on SST-2."


def test_the_committed_resolve_results_are_regenerated_from_their_runs():
    # docs/results/resolve/: its statistics, results.json and tables from the records of its runs that it keeps
    path = RESULTS / "resolve" / "results.json"
    committed = json.loads(path.read_text())
    collected = {key: committed[key] for key in ("protocol", "machine", "base", "majority", "examples", "runs")}
    regenerated = collected | statistics(collected)
    assert json.dumps(regenerated, indent=1) == path.read_text()
    text = reporting.tables(regenerated, protocols(ROOT)["resolve"])
    assert text == (RESULTS / "resolve" / "tables.md").read_text()


def test_a_run_another_process_holds_is_left_to_it(tmp_path, monkeypatch, capsys):
    launched, run = [], Run("lora", "sgd", 1e-2)
    monkeypatch.setattr(experiments.runs, "train", lambda argv, log: launched.append(argv))
    with claimed(tmp_path / run.name) as mine, claimed(tmp_path / run.name) as other:
        assert mine and not other
        launch([run], tmp_path, {})
    assert launched == [] and "running in another process, skipped" in capsys.readouterr().out
    with claimed(tmp_path / run.name) as mine:  # released with the first holder
        assert mine


def test_ctrl_c_while_a_run_starts_stops_the_protocol(tmp_path, monkeypatch):
    """A SIGINT that kills a child before it installs its handler (exit -2, not 75) still stops the protocol, where
    it used to be counted a failed run and the next one started."""
    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):  # a child without train.py's handler, interrupted as the terminal's Ctrl-C would
        process = real_popen([sys.executable, "-c", "import time; time.sleep(30)"], **kwargs)
        started.append(process)
        threading.Timer(0.5, lambda: (process.send_signal(signal.SIGINT), os.kill(os.getpid(), signal.SIGINT))).start()
        return process

    monkeypatch.setattr(experiments.runs.subprocess, "Popen", popen)
    runs = [Run("lora", "sgd", 1e-2), Run("lora", "sgd", 3e-2)]
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's: a background job's ignores it
    try:
        with pytest.raises(SystemExit, match="stopped during lora-sgd-1e-02"):
            launch(runs, tmp_path, {})
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert len(started) == 1 and started[0].returncode == -signal.SIGINT


def test_a_resumed_protocol_skips_finished_runs_and_reproduces_the_tables(tiny_model_dir, tmp_path, monkeypatch):
    from train_cli import XLA_CACHE

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
    lines = ["sentence\tlabel", *(f"what colour is the sky {w} ?\t{i % 2}" for i, w in enumerate(["a", "b", "c"] * 2))]
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    resolve = Protocol(
        "resolve",
        "",
        overrides={
            "data.chat_template": False,
            "data.max_length": 64,
            "data.max_eval_examples": 4,  # of 6, drawn once: both seeds score the same 4 (collect_resolve checks)
            "data.eval_seed": 0,
            "adapter.num_experts": 4,
            "adapter.top_k": 2,
            "train.steps": 2,
            "train.batch_size": 2,
            "train.eval_batch_size": 4,
            "train.max_new_tokens": 3,
            "optim.warmup_steps": 0,
            "checkpoint.every": 1,
        },
        tasks={
            "sst2": {
                "data.task": "sst2",
                "data.train_path": tmp_path / "train.tsv",
                "data.eval_path": tmp_path / "dev.tsv",
            }
        },
        learning_rates={"adamw": (1e-2,)},
        seeds=(0, 1),
    )
    methods, root = ["moe_lora", "moe_lora+riemann"], tmp_path / "runs"
    names = [t.name for t in resolve.runs(methods)]
    launched, train = [], experiments.runs.train
    monkeypatch.setattr(
        experiments.runs,
        "train",
        lambda argv, log: launched.append(str(log.parent.relative_to(root))) or train(argv, log),
    )
    extra = {"model.path": str(tiny_model_dir)}

    resolve.launch(methods, root, extra)
    assert launched == names
    whole = resolve.collect(root)
    records = [json.loads(line) for line in (root / names[0] / EXAMPLES_FILE).read_text().splitlines()]
    sources = [r["source"] for r in records]
    assert len(sources) == 4 and set(sources) < {f"{tmp_path / 'dev.tsv'}:{n}" for n in range(2, 8)}
    assert whole["examples"] == {"sst2": sources}
    summary = json.loads((root / names[0] / "summary.json").read_text())
    assert np.mean([r["correct"] for r in records]) == summary["accuracy_after"]
    assert summary["accuracy_before"] is not None  # the first run also scores the base model

    # stopped in a second sitting: the third run during its final evaluation, the fourth before it began
    shutil.rmtree(root / names[3])
    for name in ("summary.json", EXAMPLES_FILE):
        (root / names[2] / name).unlink()
    finished = {n: (root / n / "summary.json").stat().st_mtime_ns for n in names[:2]}
    launched.clear()
    resolve.launch(methods, root, extra)
    assert launched == names[2:]
    assert {n: (root / n / "summary.json").stat().st_mtime_ns for n in names[:2]} == finished
    assert json.loads((root / names[2] / "summary.json").read_text())["resumed_from_step"] == 2
    resumed = resolve.collect(root)
    assert reporting.paired_tables(resumed, resolve) == reporting.paired_tables(whole, resolve)
    assert [r["correct"] for r in resumed["runs"]] == [r["correct"] for r in whole["runs"]]
    launched.clear()
    resolve.launch(methods, root, extra)
    assert launched == []
