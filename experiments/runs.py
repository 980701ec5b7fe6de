"""One ``train.py`` run of a protocol: what it is, its command and directory, launching the unfinished ones (resumed,
or left to the process that holds them), and reading a finished one's records."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moelora_jax.errors import UserError
from moelora_jax.evaluation.scoring import EXAMPLES_FILE
from moelora_jax.training.preemption import EXIT_PREEMPTED
from moelora_jax.training.run_log import METRICS_FILE, read_records

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "llama_moelora.py"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: a method under an optimizer at a learning rate (and Adam's ``betas``, riemann_precond's damping
    ``reg`` and the ``split`` it is evaluated on, where the protocol varies them), on a task and a seed where the
    protocol sets them (None: the config's), as ``train.py`` on a ``preset`` of :data:`CONFIG` ("": none) with
    ``overrides`` (dotted keys of the config). Runs are equal when all but the preset and overrides are."""

    method: str
    optimizer: str
    lr: float
    task: str | None = None
    seed: int | None = None
    preset: str = dataclasses.field(default="", compare=False)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    betas: tuple[float, float] | None = None
    reg: float | None = None
    split: str | None = None

    @property
    def name(self) -> str:
        """Its directory under the protocol's:
        ``[<task>/]<method>-<optimizer>-<lr>[-b<b1>-<b2>][-reg<reg>][-seed<seed>][-<split>]``."""
        name = f"{self.method}-{self.optimizer}-{self.lr:.0e}"
        name = name if self.betas is None else f"{name}-b{self.betas[0]:g}-{self.betas[1]:g}"
        name = name if self.reg is None else f"{name}-reg{self.reg:.0e}"
        name = name if self.seed is None else f"{name}-seed{self.seed}"
        name = name if self.split is None else f"{name}-{self.split}"
        return name if self.task is None else f"{self.task}/{name}"

    @property
    def key(self) -> dict[str, Any]:
        """What names it in the results: its task, method, optimizer, learning rate, seed, betas, damping and
        split, those set."""
        fields = {
            "task": self.task,
            "method": self.method,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "seed": self.seed,
            "betas": None if self.betas is None else list(self.betas),
            "reg": self.reg,
            "split": self.split,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def command(self, output_dir: Path | str, extra: dict[str, str]) -> list[str]:
        """Its ``train.py`` command line into ``output_dir``, with ``extra`` overrides (the user's) last."""
        config = f"{CONFIG.relative_to(ROOT)}" + (f":{self.preset}" if self.preset else "")
        overrides = {**self.overrides, "output_dir": str(output_dir), **extra}
        values = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in overrides.items()}
        return ["python", "train.py", f"--config={config}", *(f"--config.{k}={v}" for k, v in values.items())]


def train(argv: list[str], log_path: Path) -> int:
    """Run one ``train.py`` with its output in ``log_path`` and return its exit code; Ctrl-C lets it checkpoint, and
    stops the protocol (:data:`EXIT_PREEMPTED`) unless the run had just finished."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "runs" / "reproduce" / ".xla_cache"))
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, *argv[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:  # the terminal's SIGINT reached the child too: it saves and exits 75, or, still
            code = process.wait()  # starting (no handler yet), dies of it; either way the protocol stops here
            return 0 if code == 0 else EXIT_PREEMPTED


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def claimed(directory: Path) -> Iterator[bool]:
    """Whether this process holds the lock of a run's ``directory`` (an ``flock`` on ``.lock``, which the system
    releases when the process ends, even killed): protocols started in one tree at once share out the runs."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True


def launch(
    runs: list[Run], root: Path, extra: dict[str, str], on_finish: Callable[[Run, Path], None] | None = None
) -> None:
    """Run each of ``runs`` not finished (``summary.json``) nor running in another process, into ``root / run.name``
    with the ``extra`` overrides, calling ``on_finish(run, directory)`` for each that is finished, as soon as it is;
    stops at a bad config or data (exit 2: every run would fail alike)."""
    for index, run in enumerate(runs):
        directory = root / run.name
        if (directory / "summary.json").exists():
            if on_finish is not None:
                on_finish(run, directory)
            continue
        with claimed(directory) as mine:
            if not mine:
                print(f"[{index + 1}/{len(runs)}] {run.name}: running in another process, skipped", flush=True)
                continue
            if (directory / "summary.json").exists():  # another process finished it since the check above
                continue
            argv = run.command(directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory, extra)
            (directory / "command.txt").write_text(" ".join(argv) + "\n")
            start = time.perf_counter()
            code = train(argv, directory / "train.log")
            seconds = time.perf_counter() - start
        if code == EXIT_PREEMPTED:
            sys.exit(f"stopped during {run.name}; run the same command again to continue.")
        if code == 2:
            sys.exit(f"{run.name}: {last_line(directory / 'train.log')}")
        if code:
            print(f"[{index + 1}/{len(runs)}] {run.name}: FAILED (exit {code}): {last_line(directory / 'train.log')}")
            continue
        if on_finish is not None:
            on_finish(run, directory)
        summary = json.loads((directory / "summary.json").read_text())
        accuracy = summary["accuracy_after"]  # None: a run scored by its loss only (train.score=False)
        print(
            f"[{index + 1}/{len(runs)}] {run.name}: "
            + ("" if accuracy is None else f"accuracy {accuracy:.3f}, ")
            + f"held-out loss {summary['eval_loss_after']:.3f}, {summary['skipped_updates']} skipped, {seconds:.0f} s",
            flush=True,
        )


def finished(runs: list[Run], root: Path) -> Iterator[tuple[Run, Path]]:
    """Each of ``runs`` that has finished under ``root`` (its ``summary.json``), with its directory."""
    for run in runs:
        if (root / run.name / "summary.json").exists():
            yield run, root / run.name


def machine() -> dict[str, Any]:
    """The CPU, core count and library versions the results were produced with."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = models[0] if models else cpu
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def run_record(directory: Path) -> dict[str, Any]:
    """A finished run's command, final scores, skipped updates, training time and training-loss curve."""
    summary = json.loads((directory / "summary.json").read_text())
    records = read_records(directory / METRICS_FILE)
    return {
        "command": (directory / "command.txt").read_text().strip(),
        "accuracy": summary["accuracy_after"],
        "eval_loss": summary["eval_loss_after"],
        "skipped_updates": summary["skipped_updates"],
        "train_seconds": summary["train_seconds"],
        "train_loss": [[r["step"], r["loss"]] for r in records if r["event"] == "train"],
    }


def base_record(directory: Path) -> dict[str, float] | None:
    """The base model's scores, if this run evaluated it before training (``train.eval_before``)."""
    summary = json.loads((directory / "summary.json").read_text())
    if summary["accuracy_before"] is None:
        return None
    return {"accuracy": summary["accuracy_before"], "eval_loss": summary["eval_loss_before"]}


def scored_examples(directory: Path) -> list[dict[str, Any]]:
    """A finished run's outcome per held-out example
    (:func:`~moelora_jax.evaluation.scoring.example_records`: its source, label, answer and whether it is right)."""
    path = directory / EXAMPLES_FILE
    if not path.exists():
        raise UserError(f"{directory} has no {EXAMPLES_FILE} (it ran before runs recorded it): delete it to rerun.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
