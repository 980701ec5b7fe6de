"""A run's records: ``metrics.jsonl``, TensorBoard event files beside it (and optionally a Weights & Biases run), a
PNG of the curves at the end, and ``commands.jsonl``, the command line of every attempt with the versions it ran.

Each record is a flat dict with ``event`` (``"train"`` or ``"eval"``), ``step`` and numbers. In TensorBoard a
number ``x`` of an ``event`` record appears as the scalar ``event/x`` at ``step``. On resume from step ``s`` the
records after ``s`` (from the interrupted attempt, to be redone) are dropped from the JSONL file and purged from
TensorBoard's view, so the curves of a resumed run read like those of an uninterrupted one.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelora_jax.errors import UserError
from moelora_jax.io.atomic import write_text_atomically

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
COMMANDS_FILE = "commands.jsonl"
WANDB_ID_FILE = "wandb_id"
"""The Weights & Biases run id of an output directory: every attempt of the run logs to that one W&B run."""
VERSIONED = ("moelora_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers")
"""The packages whose versions :func:`record_command` writes down."""


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_values(metrics: dict[str, Any]) -> dict[str, float | list[float]]:
    """Host metrics as a record's values: each scalar as a float, each vector as a list of floats (5 decimals)."""
    values: dict[str, float | list[float]] = {}
    for key, value in metrics.items():
        array = np.asarray(value, np.float64)
        values[key] = float(array) if array.ndim == 0 else [round(float(x), 5) for x in array.ravel()]
    return values


def check_wandb_login() -> None:
    """Refuse a W&B run that could not start, before anything is recorded: one that needs a login (W&B's offline
    and disabled modes need none) when there is no API key and no terminal to ask for one."""
    import wandb

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as e:
        raise UserError(
            f"log.wandb=True but W&B has no login ({e}): run `wandb login`, set WANDB_API_KEY, or set "
            "WANDB_MODE=offline to keep the run on disk"
        ) from e


def open_wandb(directory: str | os.PathLike, *, project: str, name: str, config: dict, resume_step: int) -> Any:
    """A Weights & Biases run for the output ``directory``, its files in ``directory/wandb``, with ``config`` (the
    resolved settings) attached. A resumed attempt (``resume_step > 0``) continues the W&B run of the directory's
    :data:`WANDB_ID_FILE`; a fresh one starts a new run. ``$WANDB_MODE=offline`` keeps it on disk."""
    import wandb

    id_file = Path(directory) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume_step and id_file.exists() else secrets.token_hex(4)
    write_text_atomically(id_file, run_id)
    return wandb.init(project=project, name=name, id=run_id, resume="allow", config=config, dir=str(directory))


class RunLog:
    """Appends records to ``directory/metrics.jsonl``, ``directory/tensorboard/`` and, if given, a W&B run.

    Args:
      directory: the run's output directory.
      resume_step: the step the run continues from; records after it are dropped, and with 0 (a fresh run)
        all earlier records are.
      enabled: False on every process but the primary one, which alone writes.
      wandb: a run of :func:`open_wandb` to log to as well (``event/key`` at ``step``); finished by :meth:`close`.
    """

    def __init__(
        self, directory: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True, wandb: Any = None
    ) -> None:
        self.path = Path(directory) / METRICS_FILE
        self.enabled = enabled
        self._wandb = wandb
        self._file = self._writer = None
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        kept = [r for r in read_records(self.path) if resume_step and r["step"] <= resume_step]
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self._file = self.path.open("a")
        events = Path(directory) / TENSORBOARD_DIR
        if not resume_step:
            shutil.rmtree(events, ignore_errors=True)  # an earlier attempt that left no checkpoint
        # purge_step: TensorBoard hides the events at or after it that an earlier attempt wrote.
        self._writer = SummaryWriter(str(events), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once, so a kill loses nothing written)."""
        if not self.enabled:
            return
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {
            f"{record['event']}/{key}": value
            for key, value in record.items()
            if key not in ("event", "step") and isinstance(value, int | float)
        }
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, record["step"])
        self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._writer.close()
            self._file = self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike, metric: str) -> Path:
    """A PNG with training and held-out loss against step, and the task ``metric`` against step."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, metric_ax = figure.subplots(1, 2)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (batch)", lw=1)
    loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    loss_ax.set(xlabel="step", ylabel="response-token cross-entropy", title="loss")
    loss_ax.legend()
    scored = [r for r in evals if metric in r]  # none when the run only measured the loss (train.score=False)
    metric_ax.plot([r["step"] for r in scored], [r[metric] for r in scored], "o-", color="C2")
    metric_ax.set(xlabel="step", ylabel=metric, title=f"held-out {metric} (greedy generation)")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def _source_commit() -> str | None:
    """``<git commit>[+dirty]`` of the checkout this package runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.strip() + ("+dirty" if dirty.stdout.strip() else "")


def record_command(directory: str | os.PathLike, argv: Sequence[str] | None, processes: int = 1) -> dict[str, Any]:
    """Append this attempt to ``directory/commands.jsonl`` and return its record: the exact command line ``argv``
    (``sys.orig_argv`` for ``train.py``; None when the job was started from Python), as one shell-quoted string
    too, the working directory, the start time, the process count and the versions of :data:`VERSIONED`."""
    record = {
        "argv": list(argv) if argv is not None else None,
        "command": shlex.join(argv) if argv is not None else None,
        "cwd": os.getcwd(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "processes": processes,
        "python": platform.python_version(),
        "versions": {name: importlib.metadata.version(name) for name in VERSIONED},
        "moelora_jax_commit": _source_commit(),
    }
    path = Path(directory) / COMMANDS_FILE
    earlier = path.read_text() if path.exists() else ""
    write_text_atomically(path, earlier + json.dumps(record) + "\n")
    return record
