"""Our train step against PyTorch PEFT's on the same model, batch and machine, timed interleaved in one run.

    python bench/peft_bench.py                          # SmolLM2-135M-Instruct, 4 x 128 tokens, 2 CPU cores

Both sides load the same Hugging Face directory in float32. Both apply LoRA r=4, alpha 16, no dropout, to q, k, v
and o, and train with AdamW (lr 1e-4), with or without the Riemannian preconditioner (PEFT's
``create_riemannian_optimizer``, our ``riemann_precond``; reg 1e-6). A step is forward, mean token cross-entropy,
backward and the optimizer update: ``Trainer.train_step`` on our side, ``loss.backward(); opt.step();
opt.zero_grad()`` on PEFT's. Our MoE-LoRA step (E=20, r=4, top-k 10) runs in the same rounds. Results are ratios
to PEFT's plain LoRA step. Before timing, the first-step losses of both sides are compared: with B = 0 at init,
both are the base model's loss on the batch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from timing import interleaved_medians
from trainer_step import trainer_step

from moelora_jax import AdapterConfig
from moelora_jax.optim import OptimConfig
from moelora_jax.pretrained import load_config, load_params, resolve_model_dir

RANK, ALPHA, LR, REG = 4, 16.0, 1e-4, 1e-6
TARGETS = ("q", "k", "v", "o")


def _peft(directory: Path, riemann: bool, tokens: np.ndarray):
    import peft
    import torch
    import transformers
    from peft.optimizers import create_riemannian_optimizer

    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[f"{t}_proj" for t in TARGETS])
    model = peft.get_peft_model(model, config).train()
    if riemann:
        optimizer = create_riemannian_optimizer(model, torch.optim.AdamW, lr=LR, reg=REG, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    inputs = torch.from_numpy(tokens).long()

    def step():
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, step()


def run(model: str | None, batch: int, length: int, rounds: int, warmup: int) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    directory = resolve_model_dir(model)
    config = load_config(directory)
    params = load_params(directory, config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, length)).astype(np.int32)
    lora, moe = AdapterConfig(num_experts=1, rank=RANK, alpha=ALPHA), AdapterConfig(20, RANK, 10, ALPHA)

    def optim(riemann: bool) -> OptimConfig:
        return OptimConfig(family="adamw", lr=LR, gate_lr=LR, eps=1e-8, riemann=riemann, riemann_reg=REG)  # torch eps

    steps, first_loss = {}, {}
    for name, make in {
        "peft_lora_adamw": lambda: _peft(directory, False, tokens),
        "peft_lora_riemann_adamw": lambda: _peft(directory, True, tokens),
        "ours_lora_adamw": lambda: trainer_step(config, params, lora, optim(False), tokens, TARGETS),
        "ours_lora_riemann_adamw": lambda: trainer_step(config, params, lora, optim(True), tokens, TARGETS),
        "ours_moe_lora_riemann_adamw": lambda: trainer_step(config, params, moe, optim(True), tokens, TARGETS),
    }.items():
        steps[name], first_loss[name] = make()
    medians = interleaved_medians(steps, rounds, warmup)
    base = medians["peft_lora_adamw"]
    return {
        "device": f"{jax.devices()[0].device_kind}, torch {torch.__version__} on {torch.get_num_threads()} threads",
        "model": str(directory),
        "batch": [batch, length],
        "first_step_loss": first_loss,
        "step_ms": {k: 1e3 * v for k, v in medians.items()},
        "ratio_to_peft_lora_adamw": {k: v / base for k, v in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = run(args.model, args.batch, args.length, args.rounds, args.warmup)
    print(f"{results['device']}; {results['model']}; batch {args.batch} x {args.length}; {args.rounds} rounds")
    print(f"{'train step':<30}{'ms':>10}{'/ PEFT LoRA':>14}{'first loss':>12}")
    for name, ms in results["step_ms"].items():
        ratio, loss = results["ratio_to_peft_lora_adamw"][name], results["first_step_loss"][name]
        print(f"{name:<30}{ms:>10.1f}{ratio:>14.3f}{loss:>12.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
