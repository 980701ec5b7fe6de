"""README command 1's training step under each batch layout, on its real batches, timed interleaved in one run.

    python bench/packing_bench.py                               # command 1: SmolLM2-135M, BBC News, 4 examples/step
    python bench/packing_bench.py --batch-size 16 --steps 6     # larger updates

The job is ``configs/llama_moelora.py`` as command 1 runs it (MoE-LoRA E=20 r=4 top-k 10, ``sqrt_gate``, dropout
0.05, AdamW + ``riemann_precond``), and every layout trains on the same examples: those of steps ``0..steps-1``
(``batch_indices``, seed 0). Layouts:
  - ``before``: one example per row left-padded to the 192-token window, the output head on every position;
  - ``gathered``: the same rows, the head only at the loss targets;
  - ``packed_<L>``: examples packed into rows of at most ``L`` tokens (lengths rounded up to 32), head at targets.
    ``packed_192`` holds one BBC example per row, so it is padding to the longest example of the step;
  - ``packed_<L>_remat_<policy>``: the first packing with the model's layers rematerialised (``--remat``), the
    memory-lean setting (``bench/memory_bench.py``).
Every layout first runs each of its step shapes once (compiling it; the first of these is step 0 at init, whose
loss must be the same in every layout); then each round runs step ``i`` of every layout in turn. Reported:
examples per second over the timed steps, the ratio to ``before``, positions per step (rows x length), the
distinct shapes compiled and the first-step loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from bbc_batches import Command1

from moelora_jax.data.encoding import Layout
from moelora_jax.models.pretrained import load_params


def layouts(encoded: list, max_length: int, pack_lengths: list[int], remat: str) -> dict[str, tuple[Layout, str]]:
    """Name -> (batch layout, the model's remat)."""
    table = {"before": (Layout(max_length), "none"), "gathered": (Layout.fitted(encoded, max_length), "none")}
    for length in pack_lengths:
        table[f"packed_{length}"] = (Layout.fitted(encoded, max_length, pack_length=length, length_bucket=32), "none")
    if remat != "none":
        table[f"packed_{pack_lengths[0]}_remat_{remat}"] = (table[f"packed_{pack_lengths[0]}"][0], remat)
    return table


def run(batch_size: int, steps: int, pack_lengths: list[int], remat: str) -> dict[str, Any]:
    job = Command1.load()
    trainers = {policy: job.trainer(remat=policy) for policy in ("none", remat)}
    params = load_params(job.directory, job.model_config, shardings=trainers["none"].shardings["params"])
    pad, max_length = job.tokenizer.pad_token_id, job.config.data.max_length

    step_examples = job.step_examples(batch_size, steps)
    batches, states, shapes, first_pass, first_loss, trainer_of = {}, {}, {}, {}, {}, {}
    for name, (layout, policy) in layouts(job.encoded, max_length, pack_lengths, remat).items():
        trainer = trainer_of[name] = trainers[policy]
        batches[name] = [trainer.put_batch(jax.tree.map(lambda x: x[None], layout(e, pad)), 1) for e in step_examples]
        states[name] = trainer.init(jax.random.key(0))
        start, seen = time.perf_counter(), set()
        for batch in batches[name]:  # compile each shape once, outside the timed rounds
            if batch["tokens"].shape not in seen:
                seen.add(batch["tokens"].shape)
                states[name], metrics = trainer.train_step(states[name], params, batch)
                first_loss.setdefault(name, float(metrics["loss"]))  # step 0 at init: the same in every layout
        first_pass[name] = time.perf_counter() - start
        shapes[name] = sorted(seen)

    seconds = {name: 0.0 for name in batches}
    losses = {name: [] for name in batches}
    for s in range(steps):
        for name in batches:
            start = time.perf_counter()
            states[name], metrics = trainer_of[name].train_step(states[name], params, batches[name][s])
            losses[name].append(float(metrics["loss"]))
            seconds[name] += time.perf_counter() - start
    rate = {name: batch_size * steps / t for name, t in seconds.items()}
    return {
        "device": f"{jax.devices()[0].device_kind} x {jax.device_count()}",
        "batch_size": batch_size,
        "steps": steps,
        "examples_per_s": rate,
        "ratio_to_before": {name: r / rate["before"] for name, r in rate.items()},
        "positions_per_step": {
            name: float(np.mean([np.prod(b["tokens"].shape) for b in bs])) for name, bs in batches.items()
        },
        "real_tokens_per_step": float(np.mean([sum(len(e.tokens) for e in ex) for ex in step_examples])),
        "shapes": {name: [list(s[1:]) for s in v] for name, v in shapes.items()},
        "first_pass_s": first_pass,
        "first_step_loss": first_loss,
        "mean_loss": {name: float(np.mean(v)) for name, v in losses.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pack-lengths", type=int, nargs="+", default=[192, 384, 576])
    parser.add_argument("--remat", choices=["none", "full", "dots"], default="full", help="also the first packing so")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = run(args.batch_size, args.steps, args.pack_lengths, args.remat)
    print(
        f"{results['device']}; {args.batch_size} examples/step, {args.steps} timed steps; "
        f"{results['real_tokens_per_step']:.0f} real tokens/step"
    )
    print(
        f"{'layout':<14}{'examples/s':>12}{'/ before':>10}{'positions':>11}{'shapes':>8}{'first pass s':>14}"
        f"{'first loss':>12}"
    )
    for name, rate in results["examples_per_s"].items():
        print(
            f"{name:<14}{rate:>12.3f}{results['ratio_to_before'][name]:>10.3f}"
            f"{results['positions_per_step'][name]:>11.0f}{len(results['shapes'][name]):>8}"
            f"{results['first_pass_s'][name]:>14.1f}{results['first_step_loss'][name]:>12.5f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
