"""The end-to-end fine-tuning job from a config: load, evaluate, train, evaluate, export, report.

``run(config)`` validates the whole config (:class:`~moelora_jax.settings.Settings`) before loading anything heavy,
joins a multi-process job if configured (refusing an ``output_dir`` its processes do not share), records the settings
(``config.json``) and the command line (``commands.jsonl``), then: tokenizes the task (an example longer than
the window is truncated, dropped or refused, by ``data.overflow``), restores the latest checkpoint of ``output_dir`` if
there is one (refusing one of another configuration), loads the frozen model onto the mesh, evaluates by generation
(fresh runs only), trains with periodic evaluation and checkpoints (a progress bar; every record to ``metrics.jsonl``
and TensorBoard), stops with a checkpoint on SIGTERM/SIGINT, evaluates, exports the adapters, plots the curves and
prints a summary.

``output_dir`` may be remote (``gs://bucket/run``): checkpoints are written to it directly, the other files through a
local staging copy pushed after the settings are recorded, after each checkpoint and at the end
(:class:`~moelora_jax.storage.OutputDirectory`). The model and data paths may be remote too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from moelora_jax.atomic import write_text_atomically
from moelora_jax.checkpoints import Checkpoints
from moelora_jax.data import Layout, batch_indices, encode_examples
from moelora_jax.distributed import check_shared_directory, host_local_batch, initialize, is_primary, to_host
from moelora_jax.errors import UserError
from moelora_jax.evaluation import EXAMPLES_FILE, task_score
from moelora_jax.export import export_adapters, export_merged, export_peft
from moelora_jax.models.llama import Llama, abstract_variables
from moelora_jax.mole import export_mole, stack_loras, with_loras
from moelora_jax.optim import build_optimizer, lr_schedule
from moelora_jax.preemption import PreemptedError, PreemptionGuard
from moelora_jax.pretrained import check_vocabulary, load_config, load_params, load_tokenizer, resolve_model_dir
from moelora_jax.quantize import dequantize_params
from moelora_jax.run_log import (
    COMMANDS_FILE,
    CURVES_FILE,
    RunLog,
    open_wandb,
    plot_curves,
    record_command,
    record_values,
)
from moelora_jax.settings import DataSettings, ExportSettings, Settings
from moelora_jax.sharding import batch_sharding, make_mesh
from moelora_jax.storage import OutputDirectory, is_remote, local_copy
from moelora_jax.tasks import load_task
from moelora_jax.trainer import Trainer
from moelora_jax.warm_start import source_digest, warm_adapters

SETTINGS_FILE = "config.json"
"""The run's resolved settings (:meth:`Settings.to_dict`), written into ``output_dir`` at start."""


def _subset(examples: list, limit: int, seed: int) -> list:
    if limit <= 0 or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def batch_layout(data: DataSettings, encoded: list, rows_multiple: int) -> Layout:
    """The batch layout ``data`` asks for, its targets width fitted to ``encoded``."""
    return Layout.fitted(
        encoded,
        data.max_length,
        pack_length=data.row_length,
        length_bucket=data.length_bucket,
        rows_multiple=rows_multiple,
    )


def _train_batch(layout: Layout, examples: list, pad: int, micro_batches: int, sharding: Any) -> dict:
    """One step's examples as a ``(micro_batches, rows, length)`` global batch; each process transfers its rows."""
    rows = layout(examples, pad)
    shape = (micro_batches, len(rows["tokens"]) // micro_batches)
    return host_local_batch(lambda positions: {k: v[positions] for k, v in rows.items()}, shape, sharding)


def _compilation_cache(setting: str, output: OutputDirectory) -> None:
    """Point JAX's persistent compilation cache at ``setting``: ``auto`` keeps ``$JAX_COMPILATION_CACHE_DIR`` if
    set, else uses ``$XDG_CACHE_HOME/moelora_jax/xla`` (default ``~/.cache``); ``output_dir`` uses
    ``<output_dir>/compilation_cache``; any other value is a directory, local or remote (``gs://...``); ``""`` leaves
    the cache off."""
    if setting == "auto":
        if jax.config.jax_compilation_cache_dir:
            return
        setting = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelora_jax" / "xla")
    elif setting == "output_dir":
        setting = os.fspath(output.root / "compilation_cache")
    if setting:
        jax.config.update(
            "jax_compilation_cache_dir", setting if is_remote(setting) else str(Path(setting).expanduser())
        )


def _fingerprint(settings: Settings, model_config: Any, encoded: list, init_from: Path | None) -> dict:
    """What a checkpoint must agree with to be resumed (see :mod:`moelora_jax.checkpoints`); a warm start's
    source digest among them."""
    digest = hashlib.sha256()
    for e in encoded:
        digest.update(e.tokens.tobytes() + e.loss_mask.tobytes())
    a, o = settings.adapter, settings.optim
    adapter = dataclasses.asdict(a.config)
    adapter.pop("masked", None)  # MoLE masking changes inference only: a masked run may resume an unmasked one
    if init_from is not None:
        adapter["init_from"] = source_digest(init_from)
    return {
        "adapter": adapter | {"targets": ",".join(a.targets), "sources": ",".join(a.sources)},
        "model": dataclasses.asdict(model_config),
        "optimizer": {"family": o.family, "riemann": o.riemann, "gauss_seidel": o.gauss_seidel, "frozen": o.frozen},
        "data": {
            "seed": settings.train.seed,
            "batch_size": settings.train.batch_size,
            "examples": len(encoded),
            "sha256": digest.hexdigest()[:16],
        },
    }


def _warm_start(directory: Path, fresh: Any, settings: Settings, model_config: Any) -> Any:
    """``fresh`` (the adapters on the devices) replaced by those of ``directory``, placed as ``fresh`` is."""
    a = settings.adapter
    host = warm_adapters(directory, to_host(fresh), adapter=a.config, targets=a.targets, model_config=model_config)
    if is_primary():
        print(f"adapters: initialised from {a.init_from}; the optimizer starts fresh at step 0.")
    return jax.tree.map(lambda h, x: jax.make_array_from_callback(x.shape, x.sharding, lambda i: h[i]), host, fresh)


def _resume(checkpoints: Checkpoints, fresh: Any, resume: str) -> Any:
    """The state to start from under ``checkpoint.resume`` (``latest``, ``never`` or a step number)."""
    steps = checkpoints.steps()
    if resume == "latest":
        return checkpoints.restore(fresh) if steps else fresh
    if resume == "never":
        if steps:
            raise UserError(
                f"{checkpoints.directory} already holds checkpoints (steps {steps}) and checkpoint.resume=never: "
                "resume them (checkpoint.resume=latest) or choose another output_dir."
            )
        return fresh
    return checkpoints.restore(fresh, step=int(resume))


def _encoded(tokenizer: Any, examples: list, data: DataSettings, which: str) -> tuple[list, list]:
    """The examples that fit ``data.max_length`` under ``data.overflow`` and their encodings; says how many were
    truncated or dropped."""
    encoded, counts = encode_examples(
        tokenizer, examples, data.max_length, use_chat_template=data.chat_template, overflow=data.overflow
    )
    if (counts.truncated or counts.dropped) and is_primary():
        print(
            f"data: of {len(examples)} {which} examples longer than data.max_length={data.max_length}, "
            f"{counts.truncated} had their prompt truncated and {counts.dropped} were dropped "
            f"(data.overflow={data.overflow})."
        )
    return [examples[i] for i in counts.kept], encoded


def _check_skipped(skipped: int, steps: int, planned: int, fraction: float) -> None:
    """Stop a run whose updates are (nearly) all non-finite rather than let it report success: ``skipped`` of the
    ``steps`` updates done so far (of ``planned``) may exceed ``fraction`` only before 10 (or all planned) are done."""
    if steps >= min(10, planned) and skipped > fraction * steps:
        raise UserError(
            f"{skipped} of this run's {steps} updates had a non-finite loss or gradient and were skipped "
            f"(more than train.max_skipped_fraction={fraction}): the adapters are not training. Lower optim.lr, use "
            "model.dtype=float32, or check the data and the model files."
        )


def _export(
    settings: ExportSettings,
    directory: Path,
    job: Settings,
    adapters: Any,
    params: Any,
    model_config: Any,
    tokenizer: Any,
    source: Path,
) -> list[str]:
    """Write the exports ``settings`` ask for (PEFT and merged only for plain LoRA; a MoLE's ``adapters`` export is
    its gates, ``export/mole``); returns their paths."""
    adapter = job.adapter
    plain = adapter.config.num_experts == 1
    want_peft = plain and settings.peft and not adapter.config.mixer
    want_merged = plain and settings.merged
    if not (settings.adapters or want_peft or want_merged):
        return []
    adapters = to_host(adapters)  # collectives with several processes: every process gathers
    # a quantized base merges as the float model it computes with (its kernels dequantized in param_dtype)
    merged_params = (
        to_host(dequantize_params(params, job.model.quant, job.model.weights_dtype)) if want_merged else None
    )
    if not is_primary():
        return []
    written, kwargs = [], {"adapter": adapter.config, "targets": adapter.targets}
    if settings.adapters and adapter.sources:
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
                directory / "merged", merged_params, adapters, model_config=model_config, tokenizer=tokenizer, **kwargs
            )
        )
    return [str(p) for p in written]


def _record_start(output: OutputDirectory, settings: Settings, argv: Sequence[str] | None) -> None:
    """Fill the staging copy of ``output`` from the remote one, write the settings and this attempt's command line
    into it, and push them (process 0 only); say that free space goes unchecked on an object store."""
    if not is_primary():
        return
    output.pull()
    write_text_atomically(output.local / SETTINGS_FILE, json.dumps(settings.to_dict(), indent=2))
    record_command(output.local, argv, processes=jax.process_count())
    output.push()
    if output.remote:
        print(f"checkpoints: {output.root} is an object store, so free space is not checked before each save.")


def run(config: Any, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job, or continue it from its latest checkpoint; returns the summary it prints (also written to
    ``output_dir/summary.json``). ``argv`` is the command line recorded in ``commands.jsonl`` (None when called
    from Python). Raises :class:`UserError` for bad input (before loading anything when the config is at fault)
    and :class:`PreemptedError` after checkpointing when signalled to stop."""
    settings = Settings.from_config(config)
    output = OutputDirectory(settings.output_dir)
    _compilation_cache(settings.compilation_cache, output)
    dist = settings.distributed
    initialize(dist.initialize, dist.coordinator_address, dist.num_processes, dist.process_id)
    start = time.perf_counter()
    output.prepare()
    check_shared_directory(output.root)
    _record_start(output, settings, argv)
    output_dir = output.local
    d, t = settings.data, settings.train

    directory = resolve_model_dir(settings.model.path or None)
    model_config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    check_vocabulary(tokenizer, model_config, directory)
    task, train_examples = load_task(d.task, d.train_path or None, d.train_split)
    _, eval_examples = load_task(d.task, d.eval_file or None, d.eval_split)
    train_examples, encoded = _encoded(tokenizer, _subset(train_examples, d.max_train_examples, t.seed), d, "training")
    eval_seed = t.seed + 1 if d.eval_seed < 0 else d.eval_seed
    eval_examples, eval_encoded = _encoded(tokenizer, _subset(eval_examples, d.max_eval_examples, eval_seed), d, "eval")
    batch_indices(len(encoded), t.batch_size, seed=t.seed, step=0)  # an empty or too small set fails here
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.eos_token_ids[0]

    mesh = make_mesh(settings.mesh.data, settings.mesh.fsdp, settings.mesh.tensor)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, size in (
        ("batch_size // micro_batches", t.batch_size // t.micro_batches),
        ("eval_batch_size", t.eval_batch_size),
    ):
        if size % shards:
            raise UserError(f"train.{name}={size} must be a multiple of the mesh's data x fsdp = {shards} devices.")
    m, a = settings.model, settings.adapter
    model = Llama(
        model_config,
        adapter=a.config,
        adapter_targets=a.targets,
        dtype=m.compute_dtype,
        param_dtype=m.weights_dtype,
        remat=m.remat,
        attention_impl=m.attention,
        quant=m.quant,
    )
    adapter_shapes = nn.unbox(abstract_variables(model))["adapters"]
    trainer = Trainer(model, build_optimizer(settings.optim, adapter_shapes), mesh, router_losses=a.router_losses)
    init_from = local_copy(a.init_from) if a.init_from else None
    fingerprint = _fingerprint(settings, model_config, encoded, init_from)
    checkpoints = Checkpoints(output.root / "checkpoints", fingerprint, keep=settings.checkpoint.keep)
    state = _resume(checkpoints, trainer.init(jax.random.key(t.seed)), settings.checkpoint.resume)
    first_step, first_skipped = int(state.step), int(state.skipped)
    if init_from is not None and first_step == 0:
        state = state._replace(adapters=_warm_start(init_from, state.adapters, settings, model_config))
    params = load_params(
        directory, model_config, param_dtype=m.weights_dtype, shardings=trainer.shardings["params"], quant=m.quant
    )
    if a.sources:
        stack = stack_loras(a.sources, model_config)
        params = jax.device_put(with_loras(params, stack), trainer.shardings["params"])
    schedule = lr_schedule(settings.optim.lr, settings.optim)

    eval_layout = batch_layout(d, eval_encoded, rows_multiple=shards)
    chunks = [eval_encoded[i : i + t.eval_batch_size] for i in range(0, len(eval_encoded), t.eval_batch_size)]
    if not eval_layout.pack_length:  # one shape; repeats barely move the mean
        chunks = [c + [c[-1]] * (t.eval_batch_size - len(c)) for c in chunks]
    eval_batches = [eval_layout(c, pad) for c in chunks]

    def evaluate(adapters: Any, step: int, examples_file: Path | None = None) -> dict[str, float]:
        score = task_score(
            trainer,
            params,
            adapters,
            tokenizer,
            task,
            eval_examples,
            batch_size=t.eval_batch_size,
            prompt_length=d.max_length,
            max_new_tokens=t.max_new_tokens,
            use_chat_template=d.chat_template,
            length_bucket=d.length_bucket,
            examples_file=examples_file,
        )
        loss = trainer.eval_loss(params, adapters, eval_batches)
        return {"step": step, task.metric: score, "eval_loss": loss}

    tracker = None
    if settings.log.wandb and is_primary():
        tracker = open_wandb(
            output_dir,
            project=settings.log.wandb_project,
            name=settings.log.wandb_run or output.root.name,
            config=settings.to_dict(),
            resume_step=first_step,
        )
    log = RunLog(output_dir, resume_step=first_step, enabled=is_primary(), wandb=tracker)
    if first_step == 0:
        before = evaluate(state.adapters, 0) if t.eval_before else None
        if before:
            log.write({"event": "eval", **before})
    else:
        before = next((r for r in log.records if r["event"] == "eval" and r["step"] == 0), None)
    train_layout = batch_layout(d, encoded, rows_multiple=t.micro_batches * shards)
    sharding = batch_sharding(mesh, leading=1)
    every = settings.checkpoint.every
    steps = range(first_step + 1, t.steps + 1)
    bar = tqdm(steps, "train", initial=first_step, total=t.steps, dynamic_ncols=True, disable=not is_primary())
    push = output.push if is_primary() else lambda: None
    train_start, tokens_seen, eval_seconds, saved_step = time.perf_counter(), 0, 0.0, first_step
    with PreemptionGuard() as guard:
        for step in bar:
            examples = [encoded[i] for i in batch_indices(len(encoded), t.batch_size, seed=t.seed, step=step - 1)]
            batch = _train_batch(train_layout, examples, pad, t.micro_batches, sharding)
            tokens_seen += sum(len(e.tokens) for e in examples)
            state, metrics = trainer.train_step(state, params, batch)
            if step % t.log_every == 0 or step == t.steps:
                values, skipped = record_values(jax.device_get(metrics)), int(state.skipped)
                _check_skipped(skipped - first_skipped, step - first_step, len(steps), t.max_skipped_fraction)
                rate = tokens_seen / (time.perf_counter() - train_start - eval_seconds)
                lr = float(schedule(step - 1))
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                record = {"event": "train", "step": step, **values, "lr": lr, "tokens_per_s": rate}
                log.write(record | {"skipped": skipped})
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                eval_start = time.perf_counter()
                log.write({"event": "eval", **evaluate(state.adapters, step)})
                eval_seconds += time.perf_counter() - eval_start
            if step == t.steps or (every and step % every == 0):
                checkpoints.save(state)
                saved_step = step
                push()
            if step != t.steps and guard.should_stop():
                if saved_step != step:
                    checkpoints.save(state)
                checkpoints.close()
                log.close()
                push()
                raise PreemptedError(step, guard.signal_name, str(checkpoints.directory))
    checkpoints.close()  # the last step saved above; a run resumed at its end has nothing new to save
    train_seconds = time.perf_counter() - train_start - eval_seconds
    after = evaluate(state.adapters, t.steps, output_dir / EXAMPLES_FILE if is_primary() else None)
    log.write({"event": "eval", **after})
    log.close()
    exports = _export(
        settings.export, output_dir / "export", settings, state.adapters, params, model_config, tokenizer, directory
    )
    if not is_primary():
        return {}
    curves = plot_curves(log.records, output_dir / CURVES_FILE, task.metric)
    trained_steps = t.steps - first_step
    summary = {
        "model": str(directory),
        "task": d.task,
        "adapter": dataclasses.asdict(a.config) | {"targets": list(a.targets)},
        "steps": t.steps,
        "resumed_from_step": first_step,
        "init_from": a.init_from or None,
        "skipped_updates": int(state.skipped),
        f"{task.metric}_before": before[task.metric] if before else None,
        f"{task.metric}_after": after[task.metric],
        "eval_loss_before": before["eval_loss"] if before else None,
        "eval_loss_after": after["eval_loss"],
        "train_examples": len(encoded),
        "eval_examples": len(eval_examples),
        "train_seconds": train_seconds,
        "train_tokens_per_s": tokens_seen / train_seconds if trained_steps else None,
        "total_seconds": time.perf_counter() - start,
        "output_dir": str(output),
        "checkpoints": str(checkpoints.directory),
        "exports": [output.remote_path(path) for path in exports],
        "curves": output.remote_path(curves),
    }
    write_text_atomically(output_dir / "summary.json", json.dumps(summary, indent=2))
    output.push()  # the exports, curves and summary
    _print_summary(summary, task.metric, len(eval_examples), t.batch_size, str(output))
    return summary


def _print_summary(summary: dict[str, Any], metric: str, n_eval: int, batch_size: int, output_dir: str) -> None:
    def change(name: str) -> str:
        before = summary[f"{name}_before"]
        return (f"{before:.3f} -> " if before is not None else "") + f"{summary[f'{name}_after']:.3f}"

    speed = summary["train_tokens_per_s"]
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""
    print(
        f"\n{summary['task']}: {metric} {change(metric)}, eval loss {change('eval_loss')} over {n_eval} held-out "
        f"examples\n{summary['steps']} steps x {batch_size} examples ({summary['skipped_updates']} skipped{resumed}), "
        f"{summary['train_seconds']:.0f} s training"
        + (f" at {speed:.0f} tokens/s" if speed else "")
        + f", {summary['total_seconds']:.0f} s total\nin {output_dir}: metrics.jsonl, tensorboard/, {CURVES_FILE}, "
        f"{SETTINGS_FILE}, {COMMANDS_FILE}, {EXAMPLES_FILE}, summary.json, checkpoints/"
        + (", export/" if summary["exports"] else "")
    )
