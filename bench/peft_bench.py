"""Our train step against PyTorch PEFT's on the same model, real batches and machine, timed interleaved in one run.

    python bench/peft_bench.py                          # SmolLM2-135M-Instruct, command 1's BBC News batches
    python bench/peft_bench.py --data random --batch 4 --length 128     # random tokens, every one a target

Both sides load the same model in float32, apply LoRA r=4, alpha 16, dropout 0.05 to q, k, v and o, and train
with AdamW (lr 1e-4), with or without the Riemannian preconditioner (PEFT's ``create_riemannian_optimizer``, our
``riemann_precond``; reg 1e-6). A step is forward, mean target-token cross-entropy, backward and the optimizer
update: ``Trainer.train_step`` on our side, ``loss.backward(); opt.step(); opt.zero_grad()`` on PEFT's. Our
MoE-LoRA step (E=20, r=4, top-k 10, ``sqrt_gate``) runs in the same rounds.

``--data bbc`` (default): the examples of command 1's first ``--steps`` steps (``--batch`` of them each, chat
template, loss on the answer). PEFT gets them as transformers users batch them: right-padded to the longest of the
batch (dynamic padding), ``labels`` -100 outside the answer, SDPA attention (transformers' default). We get them in
our default layout (packed rows, head at the targets). After one untimed pass over the batches, each round runs
batch ``i`` on every side; results are median step times, as ratios to PEFT's plain LoRA step. Before timing, the
first-step losses are compared: with B = 0 at init, both are the base model's loss on the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import jax
import numpy as np
from bbc_batches import Command1
from trainer_step import token_batch, trainer_step

from moelora_jax import AdapterConfig
from moelora_jax.data.encoding import Layout
from moelora_jax.models.pretrained import load_config, load_params, resolve_model_dir
from moelora_jax.optim.optimizer import OptimConfig

RANK, ALPHA, LR, REG, DROPOUT = 4, 16.0, 1e-4, 1e-6, 0.05
TARGETS = ("q", "k", "v", "o")


def _peft_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Each batch right-padded to its longest row, with ``labels`` -100 where no loss is taken."""
    import torch

    out = []
    for b in batches:
        lengths = b["attention_mask"].sum(axis=1)
        width = int(lengths.max())
        ids = np.zeros((len(lengths), width), np.int64)
        mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
        for row, n in enumerate(lengths):  # the rows come left-padded: move them to the left edge
            real = b["attention_mask"][row].astype(bool)
            ids[row, :n], mask[row, :n] = b["tokens"][row][real], 1
            labels[row, :n] = np.where(b["loss_mask"][row][real], b["tokens"][row][real], -100)
        out.append(
            {k: torch.from_numpy(v) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}
        )
    return out


def _peft(directory, riemann: bool, batches: list[dict[str, Any]]):
    import peft
    import torch
    import transformers
    from peft.optimizers import create_riemannian_optimizer

    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=[f"{t}_proj" for t in TARGETS]
    )
    model = peft.get_peft_model(model, config).train()
    if riemann:
        optimizer = create_riemannian_optimizer(model, torch.optim.AdamW, lr=LR, reg=REG, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    index = {"next": 0}

    def step():
        loss = model(**batches[index["next"] % len(batches)]).loss
        index["next"] += 1
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, step()


def run(data: str, batch: int, length: int, steps: int) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    if data == "bbc":
        job = Command1.load()
        directory, config = job.directory, job.model_config
        examples = job.step_examples(batch, steps)
        pad = job.tokenizer.pad_token_id
        dense = [Layout(job.config.data.max_length)(e, pad) for e in examples]  # PEFT's rows come from these
        ours = [job.layout()(e, pad) for e in examples]
    else:
        directory = resolve_model_dir(None)
        config = load_config(directory)
        rng = np.random.RandomState(0)
        dense = [token_batch(rng.randint(0, config.vocab_size, (batch, length)).astype(np.int32)) for _ in range(steps)]
        ours = dense
    params = load_params(directory, config)
    torch_batches = _peft_batches(dense)
    lora = AdapterConfig(num_experts=1, rank=RANK, alpha=ALPHA, dropout=DROPOUT)
    moe = AdapterConfig(20, RANK, 10, ALPHA, dropout=DROPOUT, strategy="sqrt_gate")

    def optim(riemann: bool) -> OptimConfig:
        return OptimConfig(family="adamw", lr=LR, gate_lr=LR, eps=1e-8, riemann=riemann, riemann_reg=REG)  # torch eps

    steps_fn, first_loss = {}, {}
    for name, make in {
        "peft_lora_adamw": lambda: _peft(directory, False, torch_batches),
        "peft_lora_riemann_adamw": lambda: _peft(directory, True, torch_batches),
        "ours_lora_adamw": lambda: trainer_step(config, params, lora, optim(False), ours, TARGETS),
        "ours_lora_riemann_adamw": lambda: trainer_step(config, params, lora, optim(True), ours, TARGETS),
        "ours_moe_lora_riemann_adamw": lambda: trainer_step(config, params, moe, optim(True), ours, TARGETS),
    }.items():
        steps_fn[name], first_loss[name] = make()
    for fn in steps_fn.values():  # one untimed pass over the batches: torch's allocator and caches warm up
        for _ in range(steps):
            jax.block_until_ready(fn())
    times = {name: [] for name in steps_fn}
    for _ in range(steps):
        for name, fn in steps_fn.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    base = seconds["peft_lora_adamw"]
    return {
        "device": f"{jax.devices()[0].device_kind}, torch {torch.__version__} on {torch.get_num_threads()} threads",
        "model": str(directory),
        "data": data,
        "batch": [batch, length] if data == "random" else batch,
        "positions_per_step": {
            "peft": float(np.mean([np.prod(b["input_ids"].shape) for b in torch_batches])),
            "ours": float(np.mean([np.prod(b["tokens"].shape) for b in ours])),
        },
        "first_step_loss": first_loss,
        "step_ms": {k: 1e3 * v for k, v in seconds.items()},
        "ratio_to_peft_lora_adamw": {k: v / base for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["bbc", "random"], default="bbc")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="tokens per row with --data random")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (distinct batches)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = run(args.data, args.batch, args.length, args.steps)
    positions = results["positions_per_step"]
    print(
        f"{results['device']}; {results['model']}; {args.data} batches of {args.batch}; {args.steps} rounds; "
        f"positions/step PEFT {positions['peft']:.0f}, ours {positions['ours']:.0f}"
    )
    print(f"{'train step':<30}{'ms':>10}{'/ PEFT LoRA':>14}{'first loss':>12}")
    for name, ms in results["step_ms"].items():
        ratio, loss = results["ratio_to_peft_lora_adamw"][name], results["first_step_loss"][name]
        print(f"{name:<30}{ms:>10.1f}{ratio:>14.3f}{loss:>12.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
