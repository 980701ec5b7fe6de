"""The end-to-end fine-tuning job from a config: load, evaluate, train, evaluate, report.

``run(config)`` validates the whole config before loading anything heavy, then: loads the frozen model onto the
mesh, tokenizes the task, evaluates by generation, trains with periodic evaluation (a progress bar with loss,
learning rate and tokens/s; every record appended to ``metrics.jsonl``), and prints a one-screen summary.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moelora_jax.adapters import AdapterConfig
from moelora_jax.data import collate, encode_example, train_batches
from moelora_jax.models.llama import TARGETS, Llama, abstract_variables
from moelora_jax.optim import OptimConfig, build_optimizer, lr_schedule
from moelora_jax.pretrained import load_config, load_params, load_tokenizer, resolve_model_dir
from moelora_jax.sharding import make_mesh
from moelora_jax.tasks import TASKS, load_task
from moelora_jax.trainer import Trainer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the config decides, validated: built before any weights or data are read."""

    adapter: AdapterConfig
    targets: tuple[str, ...]
    optim: OptimConfig
    dtype: Any
    param_dtype: Any


def plan(config: Any) -> Plan:
    """Check the config and turn it into typed settings; every problem is one ``ValueError`` line."""
    a = config.adapter
    if a.kind not in ("lora", "moe_lora"):
        raise ValueError(f"adapter.kind={a.kind!r} must be 'lora' or 'moe_lora'.")
    experts = 1 if a.kind == "lora" else a.num_experts
    adapter = AdapterConfig(
        num_experts=experts,
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
    for name in ("dtype", "param_dtype"):
        if config.model[name] not in DTYPES:
            raise ValueError(f"model.{name}={config.model[name]!r} must be one of {sorted(DTYPES)}.")
    if config.data.task not in TASKS:
        raise ValueError(f"data.task={config.data.task!r} is not a task format: choose from {sorted(TASKS)}.")
    t = config.train
    if config.model.remat not in ("none", "full", "dots"):
        raise ValueError(f"model.remat={config.model.remat!r} must be 'none', 'full' or 'dots'.")
    for name in ("steps", "batch_size", "micro_batches", "eval_batch_size", "max_new_tokens", "log_every"):
        if t[name] < 1:
            raise ValueError(f"train.{name}={t[name]} must be >= 1.")
    if t.batch_size % t.micro_batches:
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of train.micro_batches={t.micro_batches}."
        )
    return Plan(adapter, targets, optim, DTYPES[config.model.dtype], DTYPES[config.model.param_dtype])


def _subset(examples: list, limit: int, seed: int) -> list:
    if limit <= 0 or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def run(config: Any) -> dict[str, Any]:
    """Run the job; returns the summary it prints (also written to ``output_dir/summary.json``)."""
    settings = plan(config)
    start = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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
    )
    adapter_shapes = nn.unbox(abstract_variables(model))["adapters"]
    trainer = Trainer(model, build_optimizer(settings.optim, adapter_shapes), mesh)
    params = load_params(
        directory, model_config, param_dtype=settings.param_dtype, shardings=trainer.shardings["params"]
    )
    state = trainer.init(jax.random.key(t.seed))
    schedule = lr_schedule(settings.optim.lr, settings.optim)

    eval_encoded = [
        encode_example(tokenizer, e, d.max_length, use_chat_template=d.chat_template) for e in eval_examples
    ]
    chunks = [eval_encoded[i : i + t.eval_batch_size] for i in range(0, len(eval_encoded), t.eval_batch_size)]
    chunks = [c + [c[-1]] * (t.eval_batch_size - len(c)) for c in chunks]  # one shape; repeats barely move the mean
    eval_batches = [collate(c, d.max_length, pad) for c in chunks]

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
        )
        loss = trainer.eval_loss(params, state.adapters, eval_batches)
        return {"step": step, task.metric: score, "eval_loss": loss}

    log = (output_dir / "metrics.jsonl").open("a")

    def record(entry: dict[str, Any]) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    before = evaluate(0)
    record({"event": "eval", **before})
    batches = train_batches(encoded, t.batch_size, d.max_length, pad, seed=t.seed)
    micro = t.batch_size // t.micro_batches
    bar = tqdm(range(1, t.steps + 1), desc="train", dynamic_ncols=True)
    train_start, tokens_seen, eval_seconds = time.perf_counter(), 0, 0.0
    for step in bar:
        batch = jax.tree.map(lambda x: x.reshape(t.micro_batches, micro, *x.shape[1:]), next(batches))
        tokens_seen += int(np.sum(batch["attention_mask"]))
        state, metrics = trainer.train_step(state, params, batch)
        if step % t.log_every == 0 or step == t.steps:
            metrics = jax.device_get(metrics)
            rate = tokens_seen / (time.perf_counter() - train_start - eval_seconds)
            lr = float(schedule(step - 1))
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            record(
                {
                    "event": "train",
                    "step": step,
                    "loss": float(metrics["loss"]),
                    "lr": lr,
                    "tokens_per_s": rate,
                    "grad_norm": float(metrics["grad_norm"]),
                    "skipped": int(state.skipped),
                }
            )
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            eval_start = time.perf_counter()
            record({"event": "eval", **evaluate(step)})
            eval_seconds += time.perf_counter() - eval_start
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - train_start - eval_seconds
    after = evaluate(t.steps)
    record({"event": "eval", **after})
    log.close()
    summary = {
        "model": str(directory),
        "task": d.task,
        "adapter": dataclasses.asdict(settings.adapter) | {"targets": list(settings.targets)},
        "steps": t.steps,
        "skipped_updates": int(state.skipped),
        f"{task.metric}_before": before[task.metric],
        f"{task.metric}_after": after[task.metric],
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "train_seconds": train_seconds,
        "train_tokens_per_s": tokens_seen / train_seconds,
        "total_seconds": time.perf_counter() - start,
        "output_dir": str(output_dir),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\n{d.task}: {task.metric} {before[task.metric]:.3f} -> {after[task.metric]:.3f}, eval loss "
        f"{before['eval_loss']:.3f} -> {after['eval_loss']:.3f} over {len(eval_examples)} held-out examples\n"
        f"{t.steps} steps x {t.batch_size} examples ({int(state.skipped)} skipped), {train_seconds:.0f} s training "
        f"at {summary['train_tokens_per_s']:.0f} tokens/s, "
        f"{summary['total_seconds']:.0f} s total\nmetrics: {output_dir / 'metrics.jsonl'}; summary: "
        f"{output_dir / 'summary.json'}"
    )
    return summary
