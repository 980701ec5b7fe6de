"""README command 1's train step under every ``model.remat`` policy, side by side in one process: XLA's memory for
the step and its time on this machine.

    python bench/remat_bench.py                      # 5 rounds on command 1's first batch
    python bench/remat_bench.py --rounds 9 --json bench/results/remat_cpu.json

Every policy's trainer (:class:`bbc_batches.Command1`, the real SmolLM2 weights) compiles its step for the same
batch; then each round runs one step of each policy in turn, so that a busy machine slows them all alike. Reported
per policy: XLA's temporaries plus its non-aliased outputs (what the step allocates beyond its inputs), the median
step time, and both against ``none``. The loss of the first step is printed too: every policy computes the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import jax
from bbc_batches import Command1

from moelora_jax.models.llama import REMAT_CHOICES
from moelora_jax.models.pretrained import load_params


def measure(rounds: int, batch_size: int) -> dict[str, Any]:
    job = Command1.load()
    examples = job.step_examples(batch_size, 1)[0]
    batch = job.layout()(examples, job.tokenizer.pad_token_id)
    runs = {}
    for remat in REMAT_CHOICES:
        trainer = job.trainer(remat=remat)
        params = load_params(job.directory, job.model_config, shardings=trainer.shardings["params"])
        micro = trainer.put_batch(jax.tree.map(lambda x: x[None], batch), leading=1)
        state = trainer.init(jax.random.key(0))
        memory = trainer.compile_train_step(state, params, micro).memory_analysis()
        state, metrics = trainer.train_step(state, params, micro)  # compiles
        runs[remat] = {
            "trainer": trainer,
            "params": params,
            "batch": micro,
            "state": state,
            "first_loss": float(metrics["loss"]),
            "xla_bytes": memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes,
            "seconds": [],
        }
    for _ in range(rounds):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["trainer"].train_step(run["state"], run["params"], run["batch"])
            jax.block_until_ready(metrics)
            run["seconds"].append(time.perf_counter() - start)
    plain = runs["none"]
    return {
        "device": jax.devices()[0].device_kind,
        "batch_shape": list(batch["tokens"].shape),
        "rounds": rounds,
        "policies": {
            remat: {
                "first_loss": run["first_loss"],
                "xla_mib": run["xla_bytes"] / 2**20,
                "memory_vs_none": run["xla_bytes"] / plain["xla_bytes"],
                "step_s": statistics.median(run["seconds"]),
                "time_vs_none": statistics.median(run["seconds"]) / statistics.median(plain["seconds"]),
            }
            for remat, run in runs.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    result = measure(args.rounds, args.batch_size)
    print(f"command 1's train step, batch {tuple(result['batch_shape'])}, {result['device']}, {args.rounds} rounds")
    print(f"{'model.remat':<18}{'XLA MiB':>9}{'/ none':>8}{'step s':>8}{'/ none':>8}{'first loss':>12}")
    for remat, p in result["policies"].items():
        print(
            f"{remat:<18}{p['xla_mib']:>9.0f}{p['memory_vs_none']:>8.2f}{p['step_s']:>8.2f}{p['time_vs_none']:>8.2f}"
            f"{p['first_loss']:>12.5f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
