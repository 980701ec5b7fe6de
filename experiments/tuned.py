"""The ``tuned`` protocol: every arm (a method under an optimizer) at its own best setting, chosen on a validation
split carved from the training data, then scored on fresh seeds.

1. Tuning: each arm runs every setting of its optimizer's grid (AdamW: 4 rates x 2 beta pairs; SGD: 3 rates) once,
   seed :attr:`TunedProtocol.tuning_seed`, trained on the training examples less the validation ones
   (``data.validation_examples``, the same carve for every run) and evaluated by the validation loss only
   (``data.eval_on=validation``, ``train.score=False``: no generation).
2. Choice: the setting with the lowest validation loss (ties: the smaller rate, then the first beta pair); where it
   is the grid's smallest or largest rate, the next rate of :data:`RATE_LADDER` that way is run too (with the
   chosen betas) and the choice made again over all.
3. Final: each arm at its choice, seeds :attr:`TunedProtocol.seeds`, trained on the same examples and scored by
   generation on the task's test examples, each example's outcome kept, for the paired statistics of
   :mod:`experiments.stats`.
4. Damping: on one task, MoE-LoRA + riemann under AdamW at its choice with each ``reg`` of :data:`DAMPING`, and
   plain MoE-LoRA at its own choice, each trained once (the tuning seed) and evaluated twice: by the validation loss
   and by scoring the test examples (:func:`~experiments.stats.damping_stats`).

Each finished run's record (its key, scores, loss curve and, for a final run, its per-example outcomes) is written
as one small JSON file under :attr:`TunedProtocol.records` (``docs/results/tuned/runs/``, committed as it lands): a
run with a record is never run again, so the protocol resumes from the committed files on a fresh checkout, and the
results are collected from them alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from experiments.protocols import GATE_LR_RATIO, METHODS, Protocol
from experiments.runs import Run, base_record, launch, machine, run_record, scored_examples
from experiments.stats import commonest, damping_stats, statistics
from moelora_jax.errors import UserError
from moelora_jax.io.atomic import write_text_atomically

RATE_LADDER = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 3))
"""Learning rates in half-decade steps: the grids' rates and the steps beyond their edges."""
PROTOCOL_KEYS = frozenset({"train.seed", "data.validation_examples", "data.eval_on", "train.score"})
"""What the protocol sets per run, which ``--set`` may not undo."""
ADAMW_BETAS = ((0.9, 0.999), (0.7, 0.8))
"""Adam's default betas, and those of Zhang & Pilanci's scaled AdamW runs on GPT-2 (their Table 6)."""
SST2_STEPS = 240
"""SST-2's training steps (of 4 sentences): where MoE-LoRA + riemann + sqrt-gate stops giving one answer (measured
in ``docs/results/tuned/sst2_steps.md``; the ``resolve`` protocol's 60 left half its runs answering one label)."""
DAMPING = (1e-6, 1e-4, 1e-2, 1.0, 100.0)
"""riemann_precond's ``reg`` values the damping sweep runs: the default (1e-6) up to 100, the range Zhang & Pilanci
tune it over per task for Mistral-7B. As ``reg`` grows past the factors' Gram matrices, the preconditioned gradient
tends to ``G / reg``: plain AdamW's direction (Adam undoes the scale but for its epsilon)."""
DAMPING_ARMS = (("moe_lora", "adamw"), ("moe_lora+riemann", "adamw"))
"""The damping sweep's arms: plain AdamW, and the preconditioned arm, run with each ``reg``."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of an optimizer's grid: a learning rate and, for AdamW, its betas."""

    lr: float
    betas: tuple[float, float] | None = None


def _ladder_index(lr: float) -> int:
    for i, rung in enumerate(RATE_LADDER):
        if math.isclose(lr, rung, rel_tol=1e-9):
            return i
    raise ValueError(f"learning rate {lr} is not on RATE_LADDER")


@dataclasses.dataclass(frozen=True)
class TunedProtocol:
    """``overrides`` for every run; ``tasks`` (each with its overrides); ``arms``, ``(method, optimizer)`` pairs;
    each optimizer's ``rates`` (on :data:`RATE_LADDER`) and ``betas`` (None: the optimizer has none to tune);
    ``validation_examples`` held out of each task's training examples; ``records``, the directory of the finished
    runs' records; ``damping``, the ``reg`` values of the damping sweep on ``damping_task`` (None: none)."""

    name: str
    overrides: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    arms: tuple[tuple[str, str], ...]
    rates: dict[str, tuple[float, ...]]
    betas: dict[str, tuple[tuple[float, float] | None, ...]]
    validation_examples: int
    records: Path
    tuning_seed: int = 0
    seeds: tuple[int, ...] = (1, 2, 3)
    preset: str = ""
    damping: tuple[float, ...] = DAMPING
    damping_task: str | None = None

    paired = True

    @property
    def default_methods(self) -> tuple[str, ...]:
        """The methods of its arms."""
        return tuple(dict.fromkeys(method for method, _ in self.arms))

    def columns(self) -> dict[str, str]:
        """Its optimizers as the paired tables and plots head them."""
        optimizers = dict.fromkeys(optimizer for _, optimizer in self.arms)
        return {optimizer: f"{optimizer}, each arm at its tuned setting" for optimizer in optimizers}

    def grid(self, optimizer: str) -> list[Setting]:
        """The settings every arm of ``optimizer`` is tuned over: the same for each, so budgets are equal."""
        return [Setting(lr, betas) for betas, lr in itertools.product(self.betas[optimizer], self.rates[optimizer])]

    def _arms(self, methods: Iterable[str]) -> list[tuple[str, str]]:
        return [(method, optimizer) for method, optimizer in self.arms if method in set(methods)]

    def _run(
        self, task: str, method: str, optimizer: str, setting: Setting, seed: int, *, scored: bool, base: bool = False
    ) -> Run:
        """A run evaluated by the validation loss only (a tuning run) or ``scored`` on the test examples (a final
        one; ``base``: the first of its task, which also scores the base model)."""
        settings = {
            **self.overrides,
            **self.tasks[task],
            **METHODS[method][1],
            "train.seed": seed,
            "data.validation_examples": self.validation_examples,
            "data.eval_on": "test" if scored else "validation",
            "train.score": scored,
            "train.eval_before": base,
            "optim.family": optimizer,
            "optim.lr": setting.lr,
            "optim.gate_lr": setting.lr * GATE_LR_RATIO[optimizer],
            "export.peft": False,
            "export.merged": False,
        }
        if not scored:
            settings["data.max_eval_examples"] = 0  # every validation example
        if setting.betas is not None:
            settings |= {"optim.b1": setting.betas[0], "optim.b2": setting.betas[1]}
        return Run(method, optimizer, setting.lr, task, seed, self.preset, settings, setting.betas)

    def recorded(self) -> dict[str, dict[str, Any]]:
        """The finished runs' records by run name."""
        paths = sorted(self.records.glob("*/*.json")) if self.records.exists() else []
        return {f"{p.parent.name}/{p.stem}": json.loads(p.read_text()) for p in paths}

    def _losses(self, task: str, method: str, optimizer: str, done: dict[str, dict]) -> dict[Setting, float]:
        """The validation loss of each finished tuning run of an arm on ``task`` (the damping sweep's aside)."""
        out = {}
        for record in done.values():
            key = (record["task"], record["method"], record["optimizer"], record["seed"])
            if key == (task, method, optimizer, self.tuning_seed) and "split" not in record:
                betas = tuple(record["betas"]) if "betas" in record else None
                out[Setting(record["lr"], betas)] = record["eval_loss"]
        return out

    def _best(self, losses: dict[Setting, float], optimizer: str) -> Setting:
        """The lowest loss; ties go to the smaller rate, then to the earlier beta pair."""
        order = self.betas[optimizer]
        return min(losses, key=lambda s: (losses[s], s.lr, order.index(s.betas)))

    def _extension(self, losses: dict[Setting, float], optimizer: str) -> Setting | None:
        """The next rate beyond the grid's edge, with its betas, where the best of the grid (which ``losses``
        covers) sits on that edge; else None."""
        best = self._best({s: losses[s] for s in self.grid(optimizer)}, optimizer)
        rates = self.rates[optimizer]
        if best.lr not in (min(rates), max(rates)):
            return None
        step = -1 if best.lr == min(rates) else 1
        return Setting(RATE_LADDER[_ladder_index(best.lr) + step], best.betas)

    def choice(self, task: str, method: str, optimizer: str, done: dict[str, dict]) -> tuple[Setting | None, int]:
        """An arm's chosen setting on ``task`` (None while its tuning is unfinished) and how many tuning runs it
        took. The edge's extension, once run, joins the candidates (a second edge is not extended again)."""
        losses = self._losses(task, method, optimizer, done)
        grid = self.grid(optimizer)
        if any(s not in losses for s in grid):
            return None, len(losses)
        extension = self._extension(losses, optimizer)
        if extension is not None and extension not in losses:
            return None, len(losses)
        return self._best(losses, optimizer), len(losses)

    def plan(self, methods: Iterable[str], done: dict[str, dict]) -> list[Run]:
        """Every run the records so far call for, task by task: each arm's grid; the extension of a finished grid
        whose best rate sits on its edge; and the final seeds of each arm whose choice is made."""
        out, arms = [], self._arms(methods)
        for task in self.tasks:
            for method, optimizer in arms:
                for setting in self.grid(optimizer):
                    out.append(self._run(task, method, optimizer, setting, self.tuning_seed, scored=False))
                losses = self._losses(task, method, optimizer, done)
                finished = all(s in losses for s in self.grid(optimizer))
                if finished and (extension := self._extension(losses, optimizer)) is not None:
                    out.append(self._run(task, method, optimizer, extension, self.tuning_seed, scored=False))
            for seed, arm in itertools.product(self.seeds, arms):
                chosen, _ = self.choice(task, *arm, done)
                if chosen is not None:  # the first arm's first seed also scores the base model
                    base = (seed, arm) == (self.seeds[0], arms[0])
                    out.append(self._run(task, *arm, chosen, seed, scored=True, base=base))
            if task == self.damping_task:
                out += self._damping_runs(task, [arm for arm in DAMPING_ARMS if arm in arms], done)
        return out

    def _damping_runs(self, task: str, arms: list[tuple[str, str]], done: dict[str, dict]) -> list[Run]:
        """The damping sweep's runs of ``arms`` (of :data:`DAMPING_ARMS`) whose choice is made: each at its chosen
        setting, the preconditioned one with each ``reg`` of :attr:`damping`, seed :attr:`tuning_seed`, evaluated
        on the validation split and (the same training again) scored on the test examples."""
        out = []
        for split, (method, optimizer) in itertools.product(("validation", "test"), arms):
            chosen, _ = self.choice(task, method, optimizer, done)
            if chosen is None:
                continue
            run = self._run(task, method, optimizer, chosen, self.tuning_seed, scored=split == "test")
            for reg in self.damping if METHODS[method][1]["optim.riemann"] else (None,):
                overrides = run.overrides | ({} if reg is None else {"optim.riemann_reg": reg})
                out.append(dataclasses.replace(run, overrides=overrides, reg=reg, split=split))
        return out

    def launch(self, methods: list[str], root: Path, extra: dict[str, str]) -> None:
        """Run what :meth:`plan` calls for and has no record yet, into ``root`` (:func:`~experiments.runs.launch`:
        resumed from a checkpoint, or left to the process that holds it), recording each as soon as it finishes;
        again until the records call for nothing new. A task at a time (its grids, extensions, then final seeds), so
        one task's results are whole before the next task's tuning starts."""
        if fixed := sorted(PROTOCOL_KEYS & set(extra)):
            raise UserError(f"--set {fixed[0]} would undo the protocol: it sets each run's seed and its held-out data.")
        failed: set[str] = set()
        while True:
            done = self.recorded()
            todo = [run for run in self.plan(methods, done) if run.name not in done and run.name not in failed]
            if not todo:
                return
            todo = [run for run in todo if run.task == todo[0].task]
            launch(todo, root, extra, on_finish=self.record)  # each recorded as it finishes: commit as they land
            recorded = self.recorded()
            failed |= {run.name for run in todo if run.name not in recorded}  # its log says why; tried next time

    def record(self, run: Run, directory: Path) -> None:
        """Write a finished run's record: :attr:`Run.key`, :func:`~experiments.runs.run_record`, its training and
        held-out example counts, its wall time, the base model's scores where it measured them and, for a scored
        run, each held-out example's source, label and outcome with its commonest answer."""
        summary = json.loads((directory / "summary.json").read_text())
        record = run.key | run_record(directory)
        record |= {"train_examples": summary["train_examples"], "eval_examples": summary["eval_examples"]}
        record["total_seconds"] = summary["total_seconds"]  # training, evaluation and start-up: what the run cost
        if scores := base_record(directory):
            record["base"] = scores
        if run.overrides["train.score"]:
            examples = scored_examples(directory)
            answer, share = commonest(examples, "answer")
            record |= {
                "sources": [e["source"] for e in examples],
                "labels": [e["label"] for e in examples],
                "correct": "".join("1" if e["correct"] else "0" for e in examples),
                "top_answer": answer,
                "top_answer_share": share,
            }
        path = self.records / f"{run.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(record, indent=1) + "\n")

    def collect(self, root: Path) -> dict[str, Any]:
        """The results, from the records alone (``root``, the run directories, is not read): the tuning runs, each
        arm's choice and budget, and the final runs with the base model's scores, the held-out examples, the
        commonest label and the paired :func:`~experiments.stats.statistics`."""
        done = self.recorded()
        damping = [r for r in done.values() if "split" in r]
        tuning = [r for r in done.values() if r["seed"] == self.tuning_seed and "split" not in r]
        runs = [r for r in done.values() if r["seed"] != self.tuning_seed]
        choices = []
        for task, (method, optimizer) in itertools.product(self.tasks, self.arms):
            chosen, budget = self.choice(task, method, optimizer, done)
            if chosen is None:
                continue
            losses = self._losses(task, method, optimizer, done)
            choices.append(
                {"task": task, "method": method, "optimizer": optimizer, "lr": chosen.lr}
                | {"betas": None if chosen.betas is None else list(chosen.betas), "tuning_runs": budget}
                | {"validation_loss": losses[chosen]}
            )
        base, examples, majority, sizes = {}, {}, {}, {}
        for record in tuning + runs:
            sizes.setdefault(record["task"], record["train_examples"])
        for record in runs + [r for r in damping if "sources" in r]:
            task = record["task"]
            if examples.setdefault(task, record["sources"]) != record["sources"]:
                raise UserError(f"the {task} runs score different held-out examples: they must share the eval set.")
            labels = [{"label": label} for label in record["labels"]]
            label, accuracy = commonest(labels, "label")
            majority[task] = {"label": label, "accuracy": accuracy}
            if "base" in record:
                base[task] = record["base"]
        collected = {
            "protocol": self.name,
            "machine": machine(),
            "wall_time": {"runs": len(done), "hours": sum(r["total_seconds"] for r in done.values()) / 3600},
            "validation_examples": self.validation_examples,
            "train_examples": sizes,
            "grids": {o: [dataclasses.asdict(s) for s in self.grid(o)] for o in self.columns()},
            "tuning": tuning,
            "choices": choices,
            "base": base,
            "majority": majority,
            "examples": examples,
            "runs": runs,
            "damping": damping_stats(damping),
        }
        return collected | statistics(collected)


def tuned_protocol(resolve: Protocol, records: Path, sst2_steps: int) -> TunedProtocol:
    """The ``tuned`` protocol on the ``resolve`` protocol's tasks, schedules and held-out examples (SST-2 trained for
    ``sst2_steps``), its records in ``records``: LoRA, LoRA + riemann, MoE-LoRA, MoE-LoRA + riemann and MoE-LoRA +
    riemann + sqrt-gate under AdamW; MoE-LoRA with and without riemann under SGD (whose claim held at one rate); the
    damping sweep on BBC News."""
    sst2 = resolve.tasks["sst2"] | {
        "train.steps": sst2_steps,
        "optim.warmup_steps": sst2_steps // 10,
        "optim.decay_steps": sst2_steps * 11 // 10,
        "checkpoint.every": sst2_steps // 3,
    }
    adamw = ("lora", "lora+riemann", "moe_lora", "moe_lora+riemann", "moe_lora+riemann+sqrt_gate")
    return TunedProtocol(
        name="tuned",
        overrides=resolve.overrides,
        tasks={"bbc_news": resolve.tasks["bbc_news"], "sst2": sst2},
        arms=(*((m, "adamw") for m in adamw), ("moe_lora", "sgd"), ("moe_lora+riemann", "sgd")),
        rates={"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "sgd": (3e-3, 1e-2, 3e-2)},
        betas={"adamw": ADAMW_BETAS, "sgd": (None,)},
        validation_examples=200,
        records=records,
        damping_task="bbc_news",
    )
