"""The end-to-end fine-tuning job from a config: load, evaluate, train, evaluate, export, report.

``run(config)`` validates the whole config before loading anything heavy, joins a multi-process job if configured,
then: tokenizes the task, restores the latest checkpoint of ``output_dir`` if there is one (refusing one of another
configuration), loads the frozen model onto the mesh, evaluates by generation (fresh runs only), trains with
periodic evaluation and checkpoints (a progress bar; every record to ``metrics.jsonl`` and TensorBoard), stops
with a checkpoint on SIGTERM/SIGINT, evaluates, exports the adapters, plots the curves and prints a summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moelora_jax.adapters import AdapterConfig, MoleConfig
from moelora_jax.atomic import write_text_atomically
from moelora_jax.checkpoints import Checkpoints
from moelora_jax.data import Layout, batch_indices, encode_example
from moelora_jax.distributed import INITIALIZE_CHOICES, host_local_batch, initialize, is_primary, to_host
from moelora_jax.export import export_adapters, export_merged, export_peft
from moelora_jax.models.llama import ATTENTION_IMPLS, TARGETS, Llama, abstract_variables
from moelora_jax.mole import describe_lora, export_mole, stack_loras, with_loras
from moelora_jax.optim import OptimConfig, build_optimizer, lr_schedule
from moelora_jax.preemption import PreemptedError, PreemptionGuard
from moelora_jax.pretrained import load_config, load_params, load_tokenizer, resolve_model_dir
from moelora_jax.routing import RouterLosses
from moelora_jax.run_log import CURVES_FILE, RunLog, plot_curves
from moelora_jax.sharding import batch_sharding, make_mesh
from moelora_jax.tasks import TASKS, load_task
from moelora_jax.trainer import Trainer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the config decides, validated: built before any weights or data are read."""

    adapter: AdapterConfig | MoleConfig
    targets: tuple[str, ...]
    mole_sources: tuple[str, ...]
    optim: OptimConfig
    router_losses: RouterLosses
    dtype: Any
    param_dtype: Any


def plan(config: Any) -> Plan:
    """Check the config and turn it into typed settings; every problem is one ``ValueError`` line."""
    a = config.adapter
    if a.kind not in ("lora", "moe_lora", "mole"):
        raise ValueError(f"adapter.kind={a.kind!r} must be 'lora', 'moe_lora' or 'mole'.")
    sources: tuple[str, ...] = ()
    if a.kind == "mole":
        if "mole" not in config:
            raise ValueError("adapter.kind=mole needs the mole.* settings: use --config configs/mole.py.")
        adapter, targets, sources = _mole_plan(config.mole)
    else:
        adapter = AdapterConfig(
            num_experts=1 if a.kind == "lora" else a.num_experts,
            rank=a.rank,
            top_k=None if a.kind == "lora" else a.top_k,
            alpha=a.alpha,
            dropout=a.dropout,
            strategy=a.strategy,
            mixer=a.mixer,
        )
        targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
        if not targets or set(targets) - set(TARGETS):
            raise ValueError(f"adapter.targets={a.targets!r} must be a comma-separated subset of {', '.join(TARGETS)}.")
    optim = OptimConfig(**config.optim.to_dict())
    router_losses = RouterLosses(a.balance_loss, a.z_loss, config.mole.balance_loss if a.kind == "mole" else 0.0)
    if min(a.balance_loss, a.z_loss) < 0 or (router_losses.active and adapter.num_experts == 1):
        raise ValueError(
            f"adapter.balance_loss={a.balance_loss} and adapter.z_loss={a.z_loss} must be >= 0, and need a gate "
            "(adapter.kind=moe_lora) to be > 0."
        )
    for name in ("dtype", "param_dtype"):
        if config.model[name] not in DTYPES:
            raise ValueError(f"model.{name}={config.model[name]!r} must be one of {sorted(DTYPES)}.")
    d = config.data
    if d.task not in TASKS:
        raise ValueError(f"data.task={d.task!r} is not a task format: choose from {sorted(TASKS)}.")
    t = config.train
    if config.model.remat not in ("none", "full", "dots"):
        raise ValueError(f"model.remat={config.model.remat!r} must be 'none', 'full' or 'dots'.")
    if config.model.attention not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={config.model.attention!r} must be one of {ATTENTION_IMPLS}.")
    if d.length_bucket < 1:
        raise ValueError(f"data.length_bucket={d.length_bucket} must be >= 1.")
    if d.pack_length and d.pack_length < d.max_length:
        raise ValueError(
            f"data.pack_length={d.pack_length} must be 0 (rows as long as the window) or at least "
            f"data.max_length={d.max_length}, so that every example fits a row."
        )
    for name in ("steps", "batch_size", "micro_batches", "eval_batch_size", "max_new_tokens", "log_every"):
        if t[name] < 1:
            raise ValueError(f"train.{name}={t[name]} must be >= 1.")
    if t.batch_size % t.micro_batches:
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of train.micro_batches={t.micro_batches}."
        )
    c = config.checkpoint
    if c.every < 0 or c.keep < 1:
        raise ValueError(f"checkpoint.every={c.every} must be >= 0 and checkpoint.keep={c.keep} >= 1.")
    if str(c.resume) not in ("latest", "never") and not str(c.resume).isdigit():
        raise ValueError(f"checkpoint.resume={c.resume!r} must be 'latest', 'never' or a step number.")
    if config.distributed.initialize not in INITIALIZE_CHOICES:
        raise ValueError(
            f"distributed.initialize={config.distributed.initialize!r} must be one of {INITIALIZE_CHOICES}."
        )
    dtypes = DTYPES[config.model.dtype], DTYPES[config.model.param_dtype]
    return Plan(adapter, targets, sources, optim, router_losses, *dtypes)


def _mole_plan(mole: Any) -> tuple[MoleConfig, tuple[str, ...], tuple[str, ...]]:
    """The MoLE adapter, its targets (every projection a source LoRA adapts) and its source directories."""
    sources = tuple(s.strip() for s in mole.loras.split(",") if s.strip())
    if len(sources) < 2:
        raise ValueError(f"mole.loras={mole.loras!r} must list at least 2 LoRA directories, comma-separated.")
    try:
        described = [describe_lora(s) for s in sources]
    except FileNotFoundError as e:
        raise ValueError(f"mole.loras: {e}") from e
    targets = tuple(t for t in TARGETS if any(t in found for _, found in described))
    masked = str(mole.masked).replace(",", " ").split()
    if not all(m.isdigit() for m in masked):
        raise ValueError(f"mole.masked={mole.masked!r} must list LoRA indices, e.g. '1' or '0,2'.")
    if mole.balance_loss < 0:
        raise ValueError(f"mole.balance_loss={mole.balance_loss} must be >= 0.")
    rank = max((r for r, _ in described), default=1)
    config = MoleConfig(len(sources), rank, mole.gate, mole.tau, tuple(int(m) for m in masked))
    return config, targets, sources


def _subset(examples: list, limit: int, seed: int) -> list:
    if limit <= 0 or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def batch_layout(data: Any, encoded: list, rows_multiple: int) -> Layout:
    """The batch layout ``data.*`` asks for, its targets width fitted to ``encoded``."""
    pack_length = (data.pack_length or data.max_length) if data.packing else 0
    return Layout.fitted(
        encoded, data.max_length, pack_length=pack_length, length_bucket=data.length_bucket, rows_multiple=rows_multiple
    )


def _train_batch(layout: Layout, examples: list, pad: int, micro_batches: int, sharding: Any) -> dict:
    """One step's examples as a ``(micro_batches, rows, length)`` global batch; each process transfers its rows."""
    rows = layout(examples, pad)
    shape = (micro_batches, len(rows["tokens"]) // micro_batches)
    return host_local_batch(lambda positions: {k: v[positions] for k, v in rows.items()}, shape, sharding)


def _compilation_cache(setting: str) -> None:
    """Point JAX's persistent compilation cache at ``setting``: ``auto`` keeps ``$JAX_COMPILATION_CACHE_DIR`` if
    set, else uses ``$XDG_CACHE_HOME/moelora_jax/xla`` (default ``~/.cache``); ``""`` leaves the cache off."""
    if setting == "auto":
        if jax.config.jax_compilation_cache_dir:
            return
        setting = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelora_jax" / "xla")
    if setting:
        jax.config.update("jax_compilation_cache_dir", str(Path(setting).expanduser()))


def _writable(directory: Path) -> Path:
    """``directory``, created if missing, after checking a file can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"output_dir {directory} is not writable ({e.strerror or e}): choose another --config.output_dir."
        ) from e
    return directory


def _fingerprint(settings: Plan, model_config: Any, data_seed: int, batch_size: int, encoded: list) -> dict:
    """What a checkpoint must agree with to be resumed (see :mod:`moelora_jax.checkpoints`)."""
    digest = hashlib.sha256()
    for e in encoded:
        digest.update(e.tokens.tobytes() + e.loss_mask.tobytes())
    o = settings.optim
    adapter = dataclasses.asdict(settings.adapter)
    adapter.pop("masked", None)  # MoLE masking changes inference only: a masked run may resume an unmasked one
    return {
        "adapter": adapter | {"targets": ",".join(settings.targets), "sources": ",".join(settings.mole_sources)},
        "model": dataclasses.asdict(model_config),
        "optimizer": {"family": o.family, "riemann": o.riemann, "gauss_seidel": o.gauss_seidel, "frozen": o.frozen},
        "data": {
            "seed": data_seed,
            "batch_size": batch_size,
            "examples": len(encoded),
            "sha256": digest.hexdigest()[:16],
        },
    }


def _resume(checkpoints: Checkpoints, fresh: Any, resume: str) -> Any:
    """The state to start from under ``checkpoint.resume`` (``latest``, ``never`` or a step number)."""
    steps = checkpoints.steps()
    if resume == "latest":
        return checkpoints.restore(fresh) if steps else fresh
    if resume == "never":
        if steps:
            raise ValueError(
                f"{checkpoints.directory} already holds checkpoints (steps {steps}) and checkpoint.resume=never: "
                "resume them (checkpoint.resume=latest) or choose another output_dir."
            )
        return fresh
    return checkpoints.restore(fresh, step=int(resume))


def _export(
    config: Any,
    directory: Path,
    settings: Plan,
    state: Any,
    params: Any,
    model_config: Any,
    tokenizer: Any,
    source: Path,
) -> list[str]:
    """Write the exports ``config.export`` asks for (PEFT and merged only for plain LoRA; a MoLE's ``adapters``
    export is its gates, ``export/mole``); returns their paths."""
    plain = settings.adapter.num_experts == 1
    want_peft = plain and config.peft and not settings.adapter.mixer
    want_merged = plain and config.merged
    if not (config.adapters or want_peft or want_merged):
        return []
    adapters = to_host(state.adapters)  # collectives with several processes: every process gathers
    merged_params = to_host(params) if want_merged else None
    if not is_primary():
        return []
    written, kwargs = [], {"adapter": settings.adapter, "targets": settings.targets}
    if config.adapters and settings.mole_sources:
        written.append(
            export_mole(
                directory / "mole",
                adapters,
                mole=settings.adapter,
                sources=settings.mole_sources,
                targets=settings.targets,
                model_config=model_config,
            )
        )
    elif config.adapters:
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


def run(config: Any) -> dict[str, Any]:
    """Run the job, or continue it from its latest checkpoint; returns the summary it prints (also written to
    ``output_dir/summary.json``). Raises :class:`PreemptedError` after checkpointing when signalled to stop."""
    settings = plan(config)
    _compilation_cache(config.compilation_cache)
    dist = config.distributed
    initialize(dist.initialize, dist.coordinator_address, dist.num_processes, dist.process_id)
    start = time.perf_counter()
    output_dir = _writable(Path(config.output_dir))
    d, t = config.data, config.train

    directory = resolve_model_dir(config.model.path or None)
    model_config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    task, train_examples = load_task(d.task, d.train_path or None, d.train_split)
    _, eval_examples = load_task(d.task, d.eval_path or d.train_path or None, d.eval_split)
    train_examples = _subset(train_examples, d.max_train_examples, t.seed)
    eval_examples = _subset(eval_examples, d.max_eval_examples, t.seed + 1)
    encoded = [
        encode_example(tokenizer, e, d.max_length, use_chat_template=d.chat_template, index=i)
        for i, e in enumerate(train_examples)
    ]
    batch_indices(len(encoded), t.batch_size, seed=t.seed, step=0)  # an empty or too small set fails here
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.eos_token_ids[0]

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, size in (
        ("batch_size // micro_batches", t.batch_size // t.micro_batches),
        ("eval_batch_size", t.eval_batch_size),
    ):
        if size % shards:
            raise ValueError(f"train.{name}={size} must be a multiple of the mesh's data x fsdp = {shards} devices.")
    model = Llama(
        model_config,
        adapter=settings.adapter,
        adapter_targets=settings.targets,
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
        remat=config.model.remat,
        attention_impl=config.model.attention,
    )
    adapter_shapes = nn.unbox(abstract_variables(model))["adapters"]
    trainer = Trainer(
        model, build_optimizer(settings.optim, adapter_shapes), mesh, router_losses=settings.router_losses
    )
    checkpoints = Checkpoints(
        output_dir / "checkpoints",
        _fingerprint(settings, model_config, t.seed, t.batch_size, encoded),
        keep=config.checkpoint.keep,
    )
    state = _resume(checkpoints, trainer.init(jax.random.key(t.seed)), str(config.checkpoint.resume))
    first_step = int(state.step)
    params = load_params(
        directory, model_config, param_dtype=settings.param_dtype, shardings=trainer.shardings["params"]
    )
    if settings.mole_sources:
        stack = stack_loras(settings.mole_sources, model_config)
        params = jax.device_put(with_loras(params, stack), trainer.shardings["params"])
    schedule = lr_schedule(settings.optim.lr, settings.optim)

    eval_encoded = [
        encode_example(tokenizer, e, d.max_length, use_chat_template=d.chat_template) for e in eval_examples
    ]
    eval_layout = batch_layout(d, eval_encoded, rows_multiple=shards)
    chunks = [eval_encoded[i : i + t.eval_batch_size] for i in range(0, len(eval_encoded), t.eval_batch_size)]
    if not eval_layout.pack_length:  # one shape; repeats barely move the mean
        chunks = [c + [c[-1]] * (t.eval_batch_size - len(c)) for c in chunks]
    eval_batches = [eval_layout(c, pad) for c in chunks]

    def evaluate(step: int) -> dict[str, float]:
        score = trainer.evaluate(
            params,
            state.adapters,
            tokenizer,
            task,
            eval_examples,
            batch_size=t.eval_batch_size,
            prompt_length=d.max_length,
            max_new_tokens=t.max_new_tokens,
            use_chat_template=d.chat_template,
            length_bucket=d.length_bucket,
        )
        loss = trainer.eval_loss(params, state.adapters, eval_batches)
        return {"step": step, task.metric: score, "eval_loss": loss}

    log = RunLog(output_dir, resume_step=first_step, enabled=is_primary())
    if first_step == 0:
        before = evaluate(0) if t.eval_before else None
        if before:
            log.write({"event": "eval", **before})
    else:
        before = next((r for r in log.records if r["event"] == "eval" and r["step"] == 0), None)
    train_layout = batch_layout(d, encoded, rows_multiple=t.micro_batches * shards)
    sharding = batch_sharding(mesh, leading=1)
    every = config.checkpoint.every
    steps = range(first_step + 1, t.steps + 1)
    bar = tqdm(steps, "train", initial=first_step, total=t.steps, dynamic_ncols=True, disable=not is_primary())
    train_start, tokens_seen, eval_seconds, saved_step = time.perf_counter(), 0, 0.0, first_step
    with PreemptionGuard() as guard:
        for step in bar:
            examples = [encoded[i] for i in batch_indices(len(encoded), t.batch_size, seed=t.seed, step=step - 1)]
            batch = _train_batch(train_layout, examples, pad, t.micro_batches, sharding)
            tokens_seen += sum(len(e.tokens) for e in examples)
            state, metrics = trainer.train_step(state, params, batch)
            if step % t.log_every == 0 or step == t.steps:
                metrics = jax.device_get(metrics)
                rate = tokens_seen / (time.perf_counter() - train_start - eval_seconds)
                lr = float(schedule(step - 1))
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                record = {"event": "train", "step": step, "loss": float(metrics["loss"]), "lr": lr}
                record |= {"tokens_per_s": rate, "grad_norm": float(metrics["grad_norm"])}
                routing = ("balance_loss", "z_loss", "mole_balance_loss", "load_cv")
                record |= {k: float(metrics[k]) for k in routing if k in metrics}
                if "expert_load" in metrics:
                    record["expert_load"] = [round(float(x), 5) for x in metrics["expert_load"]]
                log.write(record | {"skipped": int(state.skipped)})
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                eval_start = time.perf_counter()
                log.write({"event": "eval", **evaluate(step)})
                eval_seconds += time.perf_counter() - eval_start
            if step == t.steps or (every and step % every == 0):
                checkpoints.save(state)
                saved_step = step
            if step != t.steps and guard.should_stop():
                if saved_step != step:
                    checkpoints.save(state)
                checkpoints.close()
                log.close()
                raise PreemptedError(step, guard.signal_name, str(checkpoints.directory))
    checkpoints.close()  # the last step saved above; a run resumed at its end has nothing new to save
    train_seconds = time.perf_counter() - train_start - eval_seconds
    after = evaluate(t.steps)
    log.write({"event": "eval", **after})
    log.close()
    exports = _export(config.export, output_dir / "export", settings, state, params, model_config, tokenizer, directory)
    if not is_primary():
        return {}
    curves = plot_curves(log.records, output_dir / CURVES_FILE, task.metric)
    trained_steps = t.steps - first_step
    summary = {
        "model": str(directory),
        "task": d.task,
        "adapter": dataclasses.asdict(settings.adapter) | {"targets": list(settings.targets)},
        "steps": t.steps,
        "resumed_from_step": first_step,
        "skipped_updates": int(state.skipped),
        f"{task.metric}_before": before[task.metric] if before else None,
        f"{task.metric}_after": after[task.metric],
        "eval_loss_before": before["eval_loss"] if before else None,
        "eval_loss_after": after["eval_loss"],
        "train_seconds": train_seconds,
        "train_tokens_per_s": tokens_seen / train_seconds if trained_steps else None,
        "total_seconds": time.perf_counter() - start,
        "output_dir": str(output_dir),
        "checkpoints": str(checkpoints.directory),
        "exports": exports,
        "curves": str(curves),
    }
    write_text_atomically(output_dir / "summary.json", json.dumps(summary, indent=2))
    _print_summary(summary, task.metric, len(eval_examples), t.batch_size, output_dir)
    return summary


def _print_summary(summary: dict[str, Any], metric: str, n_eval: int, batch_size: int, output_dir: Path) -> None:
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
        f"summary.json, checkpoints/" + (", export/" if summary["exports"] else "")
    )
