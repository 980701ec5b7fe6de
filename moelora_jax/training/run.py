"""The end-to-end fine-tuning job from a config: ``run(config)`` is :func:`~moelora_jax.training.job.setup`, then
:func:`~moelora_jax.training.loop.train_loop`, then :func:`finish`.

The setup validates the whole config (:class:`~moelora_jax.training.settings.Settings`) before loading anything heavy,
joins a multi-process job if configured (refusing an ``output_dir`` its processes do not share), loads the model and the
task (an example longer than the window is truncated, dropped or refused, by ``data.overflow``), restores the latest
checkpoint of ``output_dir`` if there is one (refusing one of another configuration), and only then records the
attempt (``config.json``, ``commands.jsonl``). The loop evaluates by generation (fresh runs only), trains with
periodic evaluation and checkpoints (a progress bar; every record to ``metrics.jsonl`` and TensorBoard), and stops
with a checkpoint on SIGTERM/SIGINT. :func:`finish` evaluates, exports the adapters, plots the curves and prints a
summary.

``output_dir`` may be remote (``gs://bucket/run``): checkpoints are written to it directly, the other files through a
local staging copy pushed after the settings are recorded, after each checkpoint and at the end
(:class:`~moelora_jax.io.storage.OutputDirectory`). The model and data paths may be remote too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moelora_jax.adapters.layers import AdapterKind
from moelora_jax.adapters.quantize import dequantize_params
from moelora_jax.evaluation.scoring import EXAMPLES_FILE
from moelora_jax.formats.merged import export_merged
from moelora_jax.formats.mole import export_mole
from moelora_jax.formats.native import export_adapters
from moelora_jax.formats.peft import export_peft
from moelora_jax.io.atomic import write_text_atomically
from moelora_jax.parallel.distributed import is_primary, to_host
from moelora_jax.training.job import SETTINGS_FILE, Job, setup
from moelora_jax.training.loop import Training, train_loop
from moelora_jax.training.run_log import COMMANDS_FILE, CURVES_FILE, plot_curves
from moelora_jax.training.settings import ExportSettings, Settings
from moelora_jax.training.trainer import TrainState


def run(config: Any, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job, or continue it from its latest checkpoint; returns the summary it prints (also written to
    ``output_dir/summary.json``). ``argv`` is the command line recorded in ``commands.jsonl`` (None when called
    from Python). Raises :class:`~moelora_jax.errors.UserError` for bad input (before loading anything when the
    config is at fault, and before recording anything when anything the setup checks is) and
    :class:`~moelora_jax.training.preemption.PreemptedError` after checkpointing when signalled to stop."""
    job = setup(Settings.from_config(config), argv)
    state, training = train_loop(job, job.state)
    return finish(job, state, training)


def finish(job: Job, state: TrainState, training: Training) -> dict[str, Any]:
    """After the loop: the final evaluation (each example's outcome to ``eval_examples.jsonl``), the exports, the
    curves and ``summary.json``; prints the summary and returns it (``{}`` on processes other than 0)."""
    settings, output, log = job.settings, job.output, job.log
    t, metric = settings.train, job.data.task.metric
    after = job.evaluate(state.adapters, t.steps, output.local / EXAMPLES_FILE if is_primary() else None)
    log.write({"event": "eval", **after})
    log.close()
    exports = _export(settings.export, output.local / "export", job, state.adapters)
    if not is_primary():
        return {}
    curves = plot_curves(log.records, output.local / CURVES_FILE, metric)
    before = next((r for r in log.records if r["event"] == "eval" and r["step"] == 0), None)
    a = settings.adapter
    summary = {
        "model": str(job.model_dir),
        "task": settings.data.task,
        "adapter": dataclasses.asdict(a.config) | {"targets": list(a.targets)},
        "steps": t.steps,
        "resumed_from_step": job.first_step,
        "init_from": a.init_from or None,
        "skipped_updates": int(state.skipped),
        f"{metric}_before": before.get(metric) if before else None,
        f"{metric}_after": after.get(metric),
        "eval_loss_before": before["eval_loss"] if before else None,
        "eval_loss_after": after["eval_loss"],
        "train_examples": len(job.data.train),
        "eval_examples": len(job.data.eval_examples),
        "train_seconds": training.seconds,
        "train_tokens_per_s": training.tokens / training.seconds if training.tokens else None,
        "total_seconds": time.perf_counter() - job.started,
        "output_dir": str(output),
        "checkpoints": str(job.checkpoints.directory),
        "exports": [output.remote_path(path) for path in exports],
        "curves": output.remote_path(curves),
    }
    write_text_atomically(output.local / "summary.json", json.dumps(summary, indent=2))
    output.push()  # the exports, curves and summary
    _print_summary(summary, metric, len(job.data.eval_examples), t.batch_size, str(output))
    return summary


def _export(settings: ExportSettings, directory: Path, job: Job, adapters: Any) -> list[str]:
    """Write the exports ``settings`` ask for (PEFT and merged only for plain LoRA; a MoLE's ``adapters`` export is
    its gates, ``export/mole``); returns their paths."""
    adapter, model = job.settings.adapter, job.settings.model
    merges = adapter.kind.merges
    want_peft = merges and settings.peft and not adapter.config.mixer
    want_merged = merges and settings.merged
    if not (settings.adapters or want_peft or want_merged):
        return []
    adapters = to_host(adapters)  # collectives with several processes: every process gathers
    # a quantized base merges as the float model it computes with (its kernels dequantized in param_dtype)
    merged_params = to_host(dequantize_params(job.params, model.quant, model.weights_dtype)) if want_merged else None
    if not is_primary():
        return []
    model_config, source = job.model_config, job.model_dir
    written, kwargs = [], {"adapter": adapter.config, "targets": adapter.targets}
    if settings.adapters and adapter.kind is AdapterKind.MOLE:
        written.append(
            export_mole(
                directory / "mole",
                adapters,
                mole=adapter.config,
                sources=adapter.sources,
                targets=adapter.targets,
                model_config=model_config,
            )
        )
    elif settings.adapters:
        written.append(
            export_adapters(
                directory / "adapters", adapters, model_config=model_config, base_model=str(source), **kwargs
            )
        )
    if want_peft:
        written.append(export_peft(directory / "peft", adapters, base_model=str(source), **kwargs))
    if want_merged:
        written.append(
            export_merged(
                directory / "merged",
                merged_params,
                adapters,
                model_config=model_config,
                tokenizer=job.tokenizer,
                **kwargs,
            )
        )
    return [str(p) for p in written]


def _print_summary(summary: dict[str, Any], metric: str, n_eval: int, batch_size: int, output_dir: str) -> None:
    def change(name: str) -> str:
        before, after = summary[f"{name}_before"], summary[f"{name}_after"]
        if after is None:
            return "not scored (train.score=False)"
        return (f"{before:.3f} -> " if before is not None else "") + f"{after:.3f}"

    speed = summary["train_tokens_per_s"]
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""
    examples = f"{EXAMPLES_FILE}, " if summary[f"{metric}_after"] is not None else ""  # written where scored
    print(
        f"\n{summary['task']}: {metric} {change(metric)}, eval loss {change('eval_loss')} over {n_eval} held-out "
        f"examples\n{summary['steps']} steps x {batch_size} examples ({summary['skipped_updates']} skipped{resumed}), "
        f"{summary['train_seconds']:.0f} s training"
        + (f" at {speed:.0f} tokens/s" if speed else "")
        + f", {summary['total_seconds']:.0f} s total\nin {output_dir}: metrics.jsonl, tensorboard/, {CURVES_FILE}, "
        f"{SETTINGS_FILE}, {COMMANDS_FILE}, {examples}summary.json, checkpoints/"
        + (", export/" if summary["exports"] else "")
    )
