"""The ``tuned`` protocol (``experiments/tuned.py``): its runs are valid configs that tune on the validation split
and score the finals on the test examples; the choice is the lowest validation loss, extended past a grid's edge;
every arm of an optimizer has the same budget; a protocol resumed from its committed records alone, on a fresh
work tree, gives the results of an uninterrupted one; the damping sweep runs each ``reg`` at the arm's choice; and
the committed results are what the committed records give."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from moelora_jax.evaluation.scoring import EXAMPLES_FILE
from moelora_jax.training.config_file import load_config
from moelora_jax.training.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import experiments.runs  # noqa: E402
import experiments.tuned  # noqa: E402
from experiments import reporting  # noqa: E402
from experiments.protocols import GATE_LR_RATIO, protocols  # noqa: E402
from experiments.tuned import ADAMW_BETAS, DAMPING, RATE_LADDER, SST2_STEPS, Setting, tuned_protocol  # noqa: E402

BEST = {"lora": 1e-3, "lora+riemann": 3e-3, "moe_lora": 1e-3, "moe_lora+riemann": 3e-2}
"""The fake runs' best rate per method (the loss is lowest there); moe_lora+riemann's lies past the AdamW grid's
edge (its extension wins) and on the SGD grid's (its extension loses)."""


def _protocol(tmp_path, records="records"):
    return tuned_protocol(protocols(tmp_path)["resolve"], tmp_path / records, SST2_STEPS)


def _done(protocol, losses):
    """Records of tuning runs with the given validation ``losses`` per ``(task, method, optimizer, Setting)``."""
    out = {}
    for (task, method, optimizer, setting), loss in losses.items():
        run = protocol._run(task, method, optimizer, setting, protocol.tuning_seed, scored=False)
        out[run.name] = run.key | {"eval_loss": loss}
    return out


def test_every_run_is_a_valid_config_tuned_on_validation_and_scored_on_test(tmp_path):
    protocol = _protocol(tmp_path)
    grid = protocol.grid("adamw")
    losses = {("sst2", "lora", "adamw", s): 1.0 + s.lr for s in grid}  # best: the smallest rate, on the edge
    assert len(protocol.plan(["lora"], _done(protocol, losses))) == 2 * len(grid) + 1  # + the edge's extension
    losses[("sst2", "lora", "adamw", Setting(1e-4, ADAMW_BETAS[0]))] = 1.0 + 1e-4
    runs = protocol.plan(["lora"], _done(protocol, losses))
    tuning = [r for r in runs if r.seed == 0]
    assert len(tuning) == 2 * len(grid) + 1 and len(runs) == len(tuning) + len(protocol.seeds)
    for run in runs:
        config = load_config(ROOT / "configs" / "llama_moelora.py", run.preset)
        config.update_from_flattened_dict(run.overrides | {"output_dir": str(tmp_path / run.name)})
        settings = Settings.from_config(config)
        final = run.seed != 0
        assert settings.data.validation_examples == 200 and settings.data.eval_on == ("test" if final else "validation")
        assert settings.train.score == final and (settings.data.max_eval_examples == 0 or final)
        assert settings.optim.lr == run.lr and math.isclose(settings.optim.gate_lr, run.lr * GATE_LR_RATIO["adamw"])
        assert (settings.optim.b1, settings.optim.b2) == run.betas
    sst2 = [r for r in runs if r.task == "sst2"]
    assert {r.overrides["train.steps"] for r in sst2} == {SST2_STEPS}
    finals = [r for r in runs if r.seed != 0]
    assert {(r.lr, r.betas) for r in finals} == {(1e-4, ADAMW_BETAS[0])}  # the extension won: its loss is lower
    assert [r.overrides["train.eval_before"] for r in finals] == [True, False, False]


def test_the_choice_is_the_lowest_validation_loss_ties_to_the_smaller_rate(tmp_path):
    protocol = _protocol(tmp_path)
    grid = protocol.grid("adamw")
    losses = {s: (math.log10(s.lr) + 2.5) ** 2 + (0.5 if s.betas == ADAMW_BETAS[0] else 0.0) for s in grid}
    done = _done(protocol, {("bbc_news", "moe_lora", "adamw", s): v for s, v in losses.items()})
    assert protocol.choice("bbc_news", "moe_lora", "adamw", done) == (Setting(3e-3, ADAMW_BETAS[1]), len(grid))
    tie = {s: 1.0 for s in grid}  # every setting equal: the smaller rate, then the first beta pair
    done = _done(protocol, {("bbc_news", "moe_lora", "adamw", s): v for s, v in tie.items()})
    edge = Setting(3e-4, ADAMW_BETAS[0])
    assert protocol.choice("bbc_news", "moe_lora", "adamw", done) == (None, len(grid))  # on the edge: extend first
    extension = Setting(RATE_LADDER[RATE_LADDER.index(1e-4)], ADAMW_BETAS[0])
    done |= _done(protocol, {("bbc_news", "moe_lora", "adamw", extension): 1.0})
    assert protocol.choice("bbc_news", "moe_lora", "adamw", done) == (extension, len(grid) + 1)
    done |= _done(protocol, {("bbc_news", "moe_lora", "adamw", extension): 1.5})
    assert protocol.choice("bbc_news", "moe_lora", "adamw", done) == (edge, len(grid) + 1)
    partial = dict(list(_done(protocol, {("bbc_news", "moe_lora", "adamw", s): 1.0 for s in grid}).items())[:-1])
    assert protocol.choice("bbc_news", "moe_lora", "adamw", partial)[0] is None  # a grid unfinished: no choice yet


def test_every_arm_of_an_optimizer_has_the_same_tuning_budget(tmp_path):
    protocol = _protocol(tmp_path)
    runs = protocol.plan(protocol.default_methods, {})
    budget = {}
    for run in runs:
        budget.setdefault((run.task, run.optimizer), {}).setdefault(run.method, set()).add((run.lr, run.betas))
    for (_, optimizer), by_method in budget.items():
        settings = {(s.lr, s.betas) for s in protocol.grid(optimizer)}
        assert all(tried == settings for tried in by_method.values()), optimizer
    assert len(protocol.grid("adamw")) == 8 and len(protocol.grid("sgd")) == 3
    assert {m for m, o in protocol.arms if o == "sgd"} == {"moe_lora", "moe_lora+riemann"}
    assert "lora+riemann" in protocol.default_methods


def _fake_train(argv, log):
    """What ``train.py`` leaves: a validation loss lowest at the method's :data:`BEST` rate (higher with Adam's
    default betas, for a preconditioned method by ``0.2 / (1 + reg)``, on the test examples by 1), and for a scored
    run each test example's outcome, drawn from its method and seed (a preconditioned one damped with ``reg >= 1``:
    plain's)."""
    options = dict(a.removeprefix("--config.").split("=", 1) for a in argv[3:])
    method = next(m for m in sorted(BEST, key=len, reverse=True) if options["output_dir"].split("/")[-1].startswith(m))
    lr, seed, scored = float(options["optim.lr"]), int(options["train.seed"]), options["train.score"] == "True"
    reg = float(options.get("optim.riemann_reg", 1e-6)) if "riemann" in method else None
    directory = log.parent
    loss = (math.log10(lr) - math.log10(BEST[method])) ** 2 + (0.1 if options.get("optim.b1") == "0.9" else 0.0)
    loss += (0.0 if reg is None else 0.2 / (1 + reg)) + (1.0 if scored else 0.0)  # the test examples' loss is higher
    outcome = method.removesuffix("+riemann") if reg is not None and reg >= 1 else method
    correct = [(i * (seed + 2) + len(outcome)) % 3 != 0 for i in range(12)] if scored else []
    summary = {
        "accuracy_before": 0.2 if options["train.eval_before"] == "True" else None,
        "eval_loss_before": 2.0 if options["train.eval_before"] == "True" else None,
        "accuracy_after": sum(correct) / 12 if scored else None,
        "eval_loss_after": loss,
        "skipped_updates": 0,
        "train_seconds": 1.0,
        "total_seconds": 60.0,
        "train_examples": 1483,
        "eval_examples": 12 if scored else 200,
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": loss}) + "\n")
    if scored:
        lines = [
            {"index": i, "source": f"test:{i}", "label": "a", "answer": "a" if c else "b", "correct": c}
            for i, c in enumerate(correct)
        ]
        (directory / EXAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return 0


def test_a_protocol_resumed_from_its_committed_records_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(
        experiments.runs, "train", lambda argv, log: launched.append(log.parent) or _fake_train(argv, log)
    )
    methods = ["lora", "lora+riemann", "moe_lora", "moe_lora+riemann"]
    whole = _protocol(tmp_path, "whole")
    root = tmp_path / "runs"
    whole.launch(methods, root, {})
    expected = whole.collect(root)
    tasks = [directory.parent.name for directory in launched]  # a task at a time, its final seeds included
    assert tasks == sorted(tasks) and {tasks[0], tasks[-1]} == {"bbc_news", "sst2"}
    first_sst2 = tasks.index("sst2")
    assert [d.name.endswith("seed0") for d in launched[first_sst2 - 1 : first_sst2 + 1]] == [False, True]
    chosen = {(c["method"], c["optimizer"], c["lr"], c["tuning_runs"]) for c in expected["choices"]}
    assert chosen == {
        ("lora", "adamw", 1e-3, 8),
        ("lora+riemann", "adamw", 3e-3, 8),
        ("moe_lora", "adamw", 1e-3, 8),
        ("moe_lora", "sgd", 1e-3, 4),  # the edge's extension won
        ("moe_lora+riemann", "adamw", 3e-2, 9),  # the edge's extension won
        ("moe_lora+riemann", "sgd", 3e-2, 4),  # the edge's extension (1e-1) lost
    }
    assert all(c["betas"] in (None, [0.7, 0.8]) for c in expected["choices"])

    # a first sitting that committed only some records (the tuning runs of one task), then a fresh checkout
    shutil.rmtree(root)
    parted = _protocol(tmp_path, "parted")
    parted.records.mkdir(parents=True)
    shutil.copytree(whole.records / "bbc_news", parted.records / "bbc_news")
    for path in (parted.records / "bbc_news").glob("*.json"):
        if not path.stem.endswith("seed0"):  # the finals and the damping sweep
            path.unlink()
    missing = sorted(set(whole.recorded()) - set(parted.recorded()))
    assert 0 < len(missing) < len(whole.recorded())
    launched.clear()
    fake = _fake_train
    monkeypatch.setattr(
        experiments.runs,
        "train",
        lambda argv, log: launched.append(str(log.parent.relative_to(root))) or fake(argv, log),
    )
    parted.launch(methods, root, {})
    assert sorted(launched) == missing  # what was committed is not run again
    resumed = parted.collect(root)
    keep = ("choices", "tuning", "runs", "cells", "claims", "base", "majority", "examples", "train_examples", "damping")
    assert {k: resumed[k] for k in keep} == {k: expected[k] for k in keep}
    assert reporting.tuned_tables(resumed, parted) == reporting.tuned_tables(expected, whole)
    launched.clear()
    parted.launch(methods, root, {})
    assert launched == []
    reporting.write(resumed, parted, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"results.json", "tables.md", "tuning.png", "claims.png"}
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "riemann_precond helps LoRA" in text and "| LoRA + riemann | adamw | 8 | 3e-03 | (0.7, 0.8) |" in text
    runs = len(whole.recorded())
    assert f"The {runs} runs (the damping sweep's included) took {runs / 60:.1f} h of wall time" in text


def test_a_run_is_recorded_as_soon_as_it_finishes_even_if_the_protocol_then_stops(tmp_path, monkeypatch):
    calls = []

    def preempted_on_the_third(argv, log):
        calls.append(log)
        return 75 if len(calls) == 3 else _fake_train(argv, log)  # 75: train.py checkpointed and stopped

    monkeypatch.setattr(experiments.runs, "train", preempted_on_the_third)
    protocol = _protocol(tmp_path)
    with pytest.raises(SystemExit, match="stopped during"):
        protocol.launch(["lora"], tmp_path / "runs", {})
    assert sorted(protocol.recorded()) == sorted(str(log.parent.relative_to(tmp_path / "runs")) for log in calls[:2])


def test_the_damping_sweep_runs_the_preconditioned_arm_at_its_choice_with_each_reg(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments.runs, "train", _fake_train)
    protocol = _protocol(tmp_path)
    protocol.launch(["moe_lora", "moe_lora+riemann"], tmp_path / "runs", {})
    collected = protocol.collect(tmp_path / "runs")
    sweep = [r for r in protocol.recorded().values() if "split" in r]
    assert len(sweep) == 2 * (1 + len(DAMPING)) and {(r["task"], r["seed"], r["optimizer"]) for r in sweep} == {
        ("bbc_news", 0, "adamw")
    }
    chosen = {c["method"]: c for c in collected["choices"] if (c["task"], c["optimizer"]) == ("bbc_news", "adamw")}
    for r in sweep:  # each arm at its own choice, the preconditioned one damped by its reg
        assert (r["lr"], r["betas"]) == (chosen[r["method"]]["lr"], chosen[r["method"]]["betas"])
        assert ("reg" in r) == (r["method"] == "moe_lora+riemann")
        assert ("--config.optim.riemann_reg=" in r["command"]) == ("reg" in r)
        if "reg" in r:
            assert f"--config.optim.riemann_reg={r['reg']:.3g}" in r["command"].split()
        assert f"--config.data.eval_on={r['split']}" in r["command"].split()
        assert ("sources" in r) == (r["split"] == "test")
    done = protocol.recorded()
    marked = {n: r for n, r in done.items() if "split" not in r} | {
        n: r | {"eval_loss": 9.0} for n, r in done.items() if "split" in r
    }
    for method in chosen:  # the sweep's runs share the choice's setting but are no tuning runs
        assert 9.0 not in protocol._losses("bbc_news", method, "adamw", marked).values()
    finals = [r for r in collected["runs"] if r["task"] == "bbc_news"]
    assert all(r["sources"] == finals[0]["sources"] for r in sweep if "sources" in r)  # the finals' test examples

    rows = collected["damping"]
    assert [(row["method"], row["reg"]) for row in rows] == [
        ("moe_lora", None),
        *(("moe_lora+riemann", reg) for reg in DAMPING),
    ]
    default = next(row for row in rows if row["reg"] == 1e-6)  # the default reg: the tuning run at the choice again
    assert default["validation_loss"] == chosen["moe_lora+riemann"]["validation_loss"]
    differences = [row["validation_loss_difference"] for row in rows[1:]]
    assert differences == sorted(differences, reverse=True) and differences[-1] < 0.01 < differences[0]
    for row in rows[1:]:  # the fake's outcomes are plain's from reg 1 on: no difference, and an interval of 0
        vanished = row["reg"] >= 1
        assert (row["difference"] == row["difference_low"] == row["difference_high"] == 0) == vanished
    reporting.write(collected, protocol, tmp_path / "out")
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "riemann_precond's damping `reg`" in text and "| MoE-LoRA + riemann | 1e+02 |" in text
    assert (tmp_path / "out" / "damping.png").exists()


def test_the_committed_results_are_collected_from_the_committed_records(tmp_path, monkeypatch):
    # docs/results/tuned/: results.json and tables.md from its records alone (the run directories are long gone),
    # on the machine that ran them and wherever the data lies
    results = ROOT / "docs" / "results" / "tuned"
    committed = (results / "results.json").read_text()
    monkeypatch.setattr(experiments.tuned, "machine", lambda: json.loads(committed)["machine"])
    protocol = tuned_protocol(protocols(tmp_path)["resolve"], results / "runs", SST2_STEPS)
    collected = protocol.collect(tmp_path / "no runs")
    assert json.dumps(collected, indent=1) == committed
    assert reporting.tables(collected, protocol) == (results / "tables.md").read_text()
