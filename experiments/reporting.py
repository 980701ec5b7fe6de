"""The results of a protocol: ``results.json``, tables, plots, and a reading of the claims' verdicts."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path
from typing import Any

from experiments.protocols import METHODS, Protocol
from experiments.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CLAIMS, ONE_ANSWER_SHARE
from experiments.tuned import TunedProtocol
from moelora_jax.io.atomic import write_text_atomically

TASK_NAMES = {"bbc_news": "BBC News", "sst2": "SST-2"}


def write(collected: dict[str, Any], protocol: Protocol | TunedProtocol, directory: Path) -> str:
    """Write a protocol's ``collected`` results (its ``collect``) into ``directory``: ``results.json``, ``tables.md``
    and the plots; returns the tables."""
    text = tables(collected, protocol)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(directory / "results.json", json.dumps(collected, indent=1))
    write_text_atomically(directory / "tables.md", text)
    if collected["runs"]:
        (paired_plots if protocol.paired else grid_plots)(collected, protocol, directory)
    if isinstance(protocol, TunedProtocol):
        tuning_plot(collected, protocol, directory)
        if collected["damping"]:
            damping_plot(collected, protocol, directory)
    return text


def tables(collected: dict[str, Any], protocol: Protocol | TunedProtocol) -> str:
    """Markdown, ``tables.md``: a grid's tables, or a paired protocol's, after the tuning tables where it tunes."""
    if isinstance(protocol, TunedProtocol):
        return tuned_tables(collected, protocol) + paired_tables(collected, protocol)
    return paired_tables(collected, protocol) if protocol.paired else grid_tables(collected, protocol)


def grid_tables(collected: dict[str, Any], protocol: Protocol) -> str:
    """Markdown: per optimizer, accuracy and held-out loss per method and learning rate, with the spread."""
    by_key = {(r["method"], r["optimizer"], r["lr"]): r for r in collected["runs"]}
    out = []
    if collected["base"]:
        b = collected["base"]
        out.append(f"Base model (no adapter): accuracy {b['accuracy']:.3f}, held-out loss {b['eval_loss']:.3f}.\n")
    for optimizer, rates in protocol.learning_rates.items():
        for field, label, fmt in (("accuracy", "accuracy", ".3f"), ("eval_loss", "held-out loss", ".3f")):
            header = [f"{optimizer} {label}", *(f"lr {lr:.0e}" for lr in rates), "mean", "worst", "spread"]
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for method, (name, _) in METHODS.items():
                values = [by_key.get((method, optimizer, lr), {}).get(field) for lr in rates]
                if all(v is None for v in values):
                    continue
                done = [v for v in values if v is not None]
                worst = (min if field == "accuracy" else max)(done) if done else None
                cells = [format(v, fmt) if v is not None else "n/a" for v in values]
                if len(done) == len(values):
                    cells += [
                        format(sum(done) / len(done), fmt),
                        format(worst, fmt),
                        format(max(done) - min(done), fmt),
                    ]
                else:
                    cells += ["n/a"] * 3
                out.append("| " + " | ".join([name, *cells]) + " |")
            out.append("")
    return "\n".join(out)


def grid_plots(collected: dict[str, Any], protocol: Protocol, directory: Path) -> list[Path]:
    """``loss_vs_step.png`` (one panel per optimizer and learning rate) and ``accuracy_vs_lr.png``."""
    from matplotlib.figure import Figure

    by_key = {(r["method"], r["optimizer"], r["lr"]): r for r in collected["runs"]}
    optimizers = list(protocol.learning_rates)
    columns = max(len(r) for r in protocol.learning_rates.values())
    losses = Figure(figsize=(4 * columns, 3.2 * len(optimizers)), layout="constrained")
    axes = losses.subplots(len(optimizers), columns, squeeze=False, sharey=True)
    for row, optimizer in enumerate(optimizers):
        for column, lr in enumerate(protocol.learning_rates[optimizer]):
            ax = axes[row][column]
            for color, (method, (name, _)) in enumerate(METHODS.items()):
                run = by_key.get((method, optimizer, lr))
                if run:
                    steps, values = zip(*run["train_loss"], strict=True)
                    ax.plot(steps, values, color=f"C{color}", label=name, lw=1.2)
            ax.set(title=f"{optimizer}, lr {lr:.0e}", xlabel="step", yscale="log")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("training loss (batch)")
    axes[0][0].legend(fontsize=8)
    accuracy = Figure(figsize=(5 * len(optimizers), 3.6), layout="constrained")
    for ax, optimizer in zip(accuracy.subplots(1, len(optimizers), squeeze=False)[0], optimizers, strict=True):
        rates = protocol.learning_rates[optimizer]
        for color, (method, (name, _)) in enumerate(METHODS.items()):
            points = [
                (lr, by_key[(method, optimizer, lr)]["accuracy"]) for lr in rates if (method, optimizer, lr) in by_key
            ]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", color=f"C{color}", label=name)
        if collected["base"]:
            ax.axhline(collected["base"]["accuracy"], color="gray", ls=":", label="base model")
        ax.set(title=optimizer, xlabel="learning rate", ylabel="held-out accuracy", xscale="log", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    written = []
    for figure, name in ((losses, "loss_vs_step.png"), (accuracy, "accuracy_vs_lr.png")):
        figure.savefig(directory / name, dpi=100)
        written.append(directory / name)
    return written


def _interval(mean: float, lo: float, hi: float, sign: str = "") -> str:
    return f"{mean:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def _cell(cell: dict[str, Any] | None, seeds: int) -> str:
    """A cell's accuracy and interval, and how many of the protocol's ``seeds`` it has when not all."""
    if cell is None:
        return "n/a"
    done = len(cell["seeds"])
    return _interval(cell["mean"], cell["low"], cell["high"]) + (f" ({done} of {seeds} seeds)" if done < seeds else "")


def paired_tables(collected: dict[str, Any], protocol: Protocol) -> str:
    """Markdown: per task, accuracy with its 95% interval per method and optimizer, and each seed's accuracy and
    held-out loss (and its one answer, where it gives one to :data:`ONE_ANSWER_SHARE` of the examples); then each
    claim's paired difference and verdict, and a reading of the verdicts."""
    cells = {(c["task"], c["optimizer"], c["method"]): c for c in collected["cells"]}
    optimizers, columns = list(protocol.columns()), list(protocol.columns().values())
    out = [
        f"Accuracy over {len(protocol.seeds)} seeds and all held-out examples; in brackets its 95% percentile "
        f"bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples of seeds and examples, RNG seed {BOOTSTRAP_SEED}). "
        "It over-counts seed-by-example noise (wide where that dominates) and counts the seeds' own spread "
        f"{len(protocol.seeds) - 1}/{len(protocol.seeds)} times.\n"
    ]
    for task in protocol.tasks:
        if task not in collected["examples"]:
            continue
        out.append(f"### {TASK_NAMES.get(task, task)} ({len(collected['examples'][task])} held-out examples)\n")
        if task in collected["base"]:
            b = collected["base"][task]
            out.append(f"Base model: accuracy {b['accuracy']:.3f}, held-out loss {b['eval_loss']:.3f}.\n")
        m = collected["majority"][task]
        out.append(f"Always answering the commonest label ({m['label']}) scores {m['accuracy']:.3f}.\n")
        out += ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        seeds_table = ["| method | seed | " + " | ".join(f"{c}: accuracy, held-out loss" for c in columns) + " |"]
        seeds_table.append("|---|---|" + "---|" * len(columns))
        for method, (name, _) in METHODS.items():
            row = [cells.get((task, o, method)) for o in optimizers]
            if not any(row):
                continue
            out.append(f"| {name} | " + " | ".join(_cell(c, len(protocol.seeds)) for c in row) + " |")
            for seed in protocol.seeds:
                values = []
                for c in row:
                    i = c["seeds"].index(seed) if c and seed in c["seeds"] else None
                    values.append("n/a" if i is None else _seed_cell(c, i))
                seeds_table.append(f"| {name} | {seed} | " + " | ".join(values) + " |")
        out += ["", *seeds_table, ""]
    out += [
        "### The papers' claims: accuracy of A minus B on the same seeds and examples\n",
        "Each interval is a paired bootstrap of one comparison, not adjusted for the others: where there is no "
        "difference, about one interval in 20 still excludes 0.\n",
        f"The last column names the methods with a run that gives one answer to at least {ONE_ANSWER_SHARE:.0%} of "
        "the examples, a method that has not learned the task: where both are named, the verdict compares answer "
        "biases.\n",
        "| paper | claim (A against B) | task | optimizer | A - B [95%] | seeds | verdict | one answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in collected["claims"]:
        pair = f"{c['claim']} ({METHODS[c['a']][0]} against {METHODS[c['b']][0]})"
        out.append(
            f"| {c['paper']} | {pair} | {TASK_NAMES.get(c['task'], c['task'])} | {c['optimizer']} | "
            f"{_interval(c['difference'], c['low'], c['high'], '+')} | {len(c['seeds'])} | {c['verdict']} | "
            f"{', '.join(c['one_answer']) or '-'} |"
        )
    out += ["", "### Reading (generated from the verdicts)\n", *reading(collected["claims"]), ""]
    return "\n".join(out)


def _seed_cell(cell: dict[str, Any], i: int) -> str:
    """One seed's accuracy and held-out loss, and its one answer where it gives it to most examples."""
    text = f"{cell['accuracy'][i]:.3f}, {cell['eval_loss'][i]:.3f}"
    if (share := cell["top_answer_share"][i]) >= ONE_ANSWER_SHARE:
        answer = cell["top_answer"][i]
        text += f" ({'no readable answer' if answer is None else repr(answer)} to {share:.0%})"
    return text


def reading(claims: list[dict[str, Any]]) -> list[str]:
    """One line per claim and optimizer: where the data agree with the paper, where they disagree, where they do
    not resolve it, and where both methods give one answer (:data:`ONE_ANSWER_SHARE`) in some seed."""
    lines = []
    for paper, claim, _, _ in CLAIMS:
        for optimizer in dict.fromkeys(c["optimizer"] for c in claims):
            rows = [c for c in claims if (c["paper"], c["claim"], c["optimizer"]) == (paper, claim, optimizer)]
            if not rows:
                continue
            parts = []
            for verdict in ("agrees", "disagrees", "not resolved"):
                tasks = [TASK_NAMES.get(c["task"], c["task"]) for c in rows if c["verdict"] == verdict]
                if tasks:
                    parts.append(f"{verdict} on {', '.join(tasks)}")
            biased = [TASK_NAMES.get(c["task"], c["task"]) for c in rows if len(c["one_answer"]) == 2]
            caveat = (
                f" On {', '.join(biased)} each method gives one answer in some seed: there it partly compares biases."
                if biased
                else ""
            )
            lines.append(f"- {paper}, {claim}, under {optimizer}: {'; '.join(parts)}.{caveat}")
    return lines


def paired_plots(collected: dict[str, Any], protocol: Protocol, directory: Path) -> list[Path]:
    """``accuracy.png`` (per task: each method's accuracy per optimizer, the 95% interval as error bars, each seed
    as a dot; the base model's and the commonest label's accuracy as lines) and ``claims.png`` (each claim's
    paired difference with its interval, hollow where both methods give one answer in some seed)."""
    from matplotlib.figure import Figure

    cells = {(c["task"], c["optimizer"], c["method"]): c for c in collected["cells"]}
    tasks = [t for t in protocol.tasks if t in collected["examples"]]
    optimizers = list(protocol.columns())
    accuracy = Figure(figsize=(5 * len(tasks), 3.8), layout="constrained")
    for ax, task in zip(accuracy.subplots(1, len(tasks), squeeze=False)[0], tasks, strict=True):
        present = [m for m in METHODS if any((task, o, m) in cells for o in optimizers)]
        for j, method in enumerate(present):
            color, offset = f"C{list(METHODS).index(method)}", 0.6 * (j + 0.5) / len(present) - 0.3
            points = [(x, cells[(task, o, method)]) for x, o in enumerate(optimizers) if (task, o, method) in cells]
            for k, (x, c) in enumerate(points):
                yerr = [[c["mean"] - c["low"]], [c["high"] - c["mean"]]]
                label = METHODS[method][0] if k == 0 else None
                ax.errorbar(x + offset, c["mean"], yerr=yerr, fmt="o", color=color, capsize=3, label=label)
                seeds_x = [x + offset + 0.03] * len(c["accuracy"])
                ax.plot(seeds_x, c["accuracy"], ".", color=color, alpha=0.5, ms=4)
        if task in collected["base"]:
            ax.axhline(collected["base"][task]["accuracy"], color="gray", ls=":", label="base model")
        ax.axhline(collected["majority"][task]["accuracy"], color="gray", ls="--", lw=0.8, label="commonest label")
        ax.set_xticks(range(len(optimizers)), [textwrap.fill(label, 24) for label in protocol.columns().values()])
        ax.set(title=TASK_NAMES.get(task, task), ylabel="held-out accuracy", ylim=(-0.02, 1.02))
        ax.set_xlim(-0.5, len(optimizers) - 0.5)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    claims = collected["claims"]
    differences = Figure(figsize=(8, 0.35 * len(claims) + 1.2), layout="constrained")
    ax = differences.subplots()
    for y, c in enumerate(claims):
        color = {"agrees": "C2", "disagrees": "C3"}.get(c["verdict"], "gray")
        xerr = [[c["difference"] - c["low"]], [c["high"] - c["difference"]]]
        face = "white" if len(c["one_answer"]) == 2 else color  # hollow: both methods give one answer in some seed
        ax.errorbar(c["difference"], y, xerr=xerr, fmt="o", color=color, mfc=face, capsize=3)
    ax.set_yticks(
        range(len(claims)),
        [f"{c['paper']}: {c['claim']}, {TASK_NAMES.get(c['task'], c['task'])}, {c['optimizer']}" for c in claims],
        fontsize=7,
    )
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    differences.suptitle(
        "green: agrees, red: disagrees, gray: not resolved; hollow: both give one answer in some seed", fontsize=9
    )
    ax.set(xlabel="accuracy of A - B, with its 95% paired interval")
    ax.grid(alpha=0.3, axis="x")
    written = []
    for figure, name in ((accuracy, "accuracy.png"), (differences, "claims.png")):
        figure.savefig(directory / name, dpi=100)
        written.append(directory / name)
    return written


def _betas(betas: list[float] | None) -> str:
    return "-" if betas is None else f"({betas[0]:g}, {betas[1]:g})"


def tuned_tables(collected: dict[str, Any], protocol: TunedProtocol) -> str:
    """Markdown: how the validation split is made, each optimizer's grid, and per task each arm's tuning budget,
    chosen setting and its validation loss; the damping sweep; then every tuning run's validation loss."""
    v = collected["validation_examples"]
    out = [
        "## Each arm at its own tuned setting\n",
        f"Validation: {v} training examples per task, held out of training for every run "
        "(`moelora_jax/data/splits.py`: a fixed permutation, never a test example's or a repeated prompt), so "
        "training keeps "
        + ", ".join(f"{n:,} for {TASK_NAMES.get(t, t)}" for t, n in collected["train_examples"].items())
        + ". Each setting of an arm's grid trains once (seed "
        f"{protocol.tuning_seed}) and is judged by its validation loss (no generation); the lowest wins (ties: the "
        "smaller rate); a winner on the grid's edge adds the next rate that way. The winner then trains with seeds "
        f"{', '.join(map(str, protocol.seeds))}, scored on the test examples.\n",
        f"The {collected['wall_time']['runs']} runs (the damping sweep's included) took "
        f"{collected['wall_time']['hours']:.1f} h of wall time one after another on {collected['machine']['cpu']} "
        f"({collected['machine']['cores']} cores).\n",
    ]
    for optimizer, grid in collected["grids"].items():
        rates = sorted({s["lr"] for s in grid})
        betas = list(dict.fromkeys(_betas(s["betas"]) for s in grid))
        out.append(
            f"- {optimizer}: rates {', '.join(f'{r:.0e}' for r in rates)}"
            + (f" x betas {', '.join(betas)}" if betas != ["-"] else "")
            + f" ({len(grid)} runs per arm)"
        )
    out.append("")
    for task in protocol.tasks:
        rows = [c for c in collected["choices"] if c["task"] == task]
        if not rows:
            continue
        out += [
            f"### {TASK_NAMES.get(task, task)}: the chosen settings\n",
            "| method | optimizer | tuning runs | chosen rate | betas | validation loss |",
            "|---|---|---|---|---|---|",
        ]
        for c in rows:
            out.append(
                f"| {METHODS[c['method']][0]} | {c['optimizer']} | {c['tuning_runs']} | {c['lr']:.0e} | "
                f"{_betas(c['betas'])} | {c['validation_loss']:.4f} |"
            )
        out.append("")
    out += damping_table(collected, protocol)
    out += [
        "### Every tuning run's validation loss\n",
        "| task | method | optimizer | rate | betas | validation loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(collected["tuning"], key=lambda r: (r["task"], r["method"], r["optimizer"], r["lr"])):
        out.append(
            f"| {TASK_NAMES.get(r['task'], r['task'])} | {METHODS[r['method']][0]} | {r['optimizer']} | "
            f"{r['lr']:.0e} | {_betas(r.get('betas'))} | {r['eval_loss']:.4f} |"
        )
    return "\n".join(out) + "\n\n"


def damping_table(collected: dict[str, Any], protocol: TunedProtocol) -> list[str]:
    """Markdown lines: the damping sweep's rows (:func:`~experiments.stats.damping_stats`), none before it runs."""
    if not collected["damping"]:
        return []
    task = TASK_NAMES.get(protocol.damping_task, protocol.damping_task)
    out = [
        f"### {task}: riemann_precond's damping `reg`\n",
        "MoE-LoRA + riemann under AdamW at its chosen setting with each `reg`, against plain MoE-LoRA under AdamW at "
        f"its own; each trained once (seed {protocol.tuning_seed}) and evaluated on the validation split and on the "
        "test examples. Intervals: 95%, over the test examples (one seed); a difference's is paired.\n",
        "| method | reg | validation loss | vs plain | test accuracy | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for row in collected["damping"]:
        loss = f"{row['validation_loss']:.4f}" if "validation_loss" in row else "-"
        loss_difference = f"{row['validation_loss_difference']:+.4f}" if "validation_loss_difference" in row else "-"
        accuracy = _interval(row["accuracy"], row["low"], row["high"]) if "accuracy" in row else "-"
        difference = "-"
        if "difference" in row:
            difference = _interval(row["difference"], row["difference_low"], row["difference_high"], "+")
        reg = "-" if row["reg"] is None else f"{row['reg']:.0e}"
        out.append(f"| {METHODS[row['method']][0]} | {reg} | {loss} | {loss_difference} | {accuracy} | {difference} |")
    return [*out, ""]


def damping_plot(collected: dict[str, Any], protocol: TunedProtocol, directory: Path) -> Path:
    """``damping.png``: the damping sweep's validation loss and test accuracy (95% interval) against ``reg``, plain
    AdamW's as a horizontal line (its interval shaded)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    rows = collected["damping"]
    swept = [r for r in rows if r["reg"] is not None]
    for row in rows:
        if row["reg"] is not None:
            continue
        label = f"{METHODS[row['method']][0]} (no reg)"
        if "validation_loss" in row:
            loss_ax.axhline(row["validation_loss"], color="C1", label=label)
        if "accuracy" in row:
            accuracy_ax.axhline(row["accuracy"], color="C1", label=label)
            accuracy_ax.axhspan(row["low"], row["high"], color="C1", alpha=0.15)
    label = METHODS[swept[0]["method"]][0] if swept else ""
    points = [(r["reg"], r["validation_loss"]) for r in swept if "validation_loss" in r]
    if points:
        loss_ax.plot(*zip(*points, strict=True), "o-", color="C2", label=label)
    scored = [r for r in swept if "accuracy" in r]
    if scored:
        errors = [[r["accuracy"] - r["low"] for r in scored], [r["high"] - r["accuracy"] for r in scored]]
        accuracy_ax.errorbar(
            [r["reg"] for r in scored], [r["accuracy"] for r in scored], yerr=errors, fmt="o-", color="C2", label=label
        )
    task = TASK_NAMES.get(protocol.damping_task, protocol.damping_task)
    loss_ax.set(xscale="log", xlabel="reg", ylabel="validation loss", title=f"{task}, adamw: validation")
    accuracy_ax.set(xscale="log", xlabel="reg", ylabel="accuracy", title=f"{task}, adamw: test (95% interval)")
    for ax in (loss_ax, accuracy_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    figure.savefig(directory / "damping.png", dpi=100)
    return directory / "damping.png"


def tuning_plot(collected: dict[str, Any], protocol: TunedProtocol, directory: Path) -> Path:
    """``tuning.png``: per task and optimizer, each arm's validation loss against the rate (one line per beta pair),
    its chosen setting circled; tasks without a tuning run yet are left out."""
    from matplotlib.figure import Figure

    tasks = [t for t in protocol.tasks if any(r["task"] == t for r in collected["tuning"])]
    optimizers = list(protocol.columns())
    figure = Figure(figsize=(5 * len(optimizers), 3.6 * len(tasks)), layout="constrained")
    axes = figure.subplots(len(tasks), len(optimizers), squeeze=False)
    chosen = {(c["task"], c["method"], c["optimizer"]): c for c in collected["choices"]}
    for (i, task), (j, optimizer) in itertools.product(enumerate(tasks), enumerate(optimizers)):
        ax = axes[i][j]
        for method, arm_optimizer in protocol.arms:
            if arm_optimizer != optimizer:
                continue
            color = f"C{list(METHODS).index(method)}"
            runs = [
                r for r in collected["tuning"] if (r["task"], r["method"], r["optimizer"]) == (task, method, optimizer)
            ]
            for k, betas in enumerate(dict.fromkeys(_betas(r.get("betas")) for r in runs)):
                line = sorted((r["lr"], r["eval_loss"]) for r in runs if _betas(r.get("betas")) == betas)
                label = METHODS[method][0] + ("" if betas == "-" else f", betas {betas}")
                ax.plot(*zip(*line, strict=True), "o-" if k == 0 else "s--", color=color, label=label, ms=4)
            if (c := chosen.get((task, method, optimizer))) is not None:
                ax.plot(c["lr"], c["validation_loss"], "o", ms=11, mfc="none", color=color)
        title = f"{TASK_NAMES.get(task, task)}, {optimizer}"
        ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="validation loss", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    figure.savefig(directory / "tuning.png", dpi=100)
    return directory / "tuning.png"
