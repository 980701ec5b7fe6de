"""Memory of a train step against an eval forward of the same batch (CPU, where host memory is device memory).

    python bench/memory_bench.py                  # command 1's first BBC batch, MoE-LoRA E=20 r=4 top-k 10
    python bench/memory_bench.py --remat full     # layers recomputed in the backward pass

Two measures, each call in its own process (load the weights, compile, run once):
  - XLA's: what the compiled program allocates beyond its inputs (``memory_analysis()``: temporaries, that is
    activations, the backward's residuals, gradients and optimizer temporaries, plus outputs not aliased to a
    donated input, such as an eval forward's logits);
  - the kernel's: three times, return freed heap pages (``malloc_trim``), reset the peak resident-set counter
    (``/proc/self/clear_refs``) and run again; the largest peak RSS above the RSS just before it.
Calls: ``train``, ``Trainer.train_step`` (command 1's job: ``sqrt_gate``, dropout, AdamW + ``riemann_precond``) on
the batch in our default layout (packed rows, head at the targets); ``eval_loss``, the eval forward our trainer
runs on it (the loss at the targets); ``eval_logits``, the model's plain forward returning float32 logits for
every position of the same rows. Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
from bbc_batches import Command1

from moelora_jax.models.llama import REMAT_CHOICES, init_variables
from moelora_jax.models.pretrained import load_params
from moelora_jax.training.trainer import batch_loss

REPEATS = 3
KINDS = ("eval_logits", "eval_loss", "train")


def _status_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe(kind: str, batch_size: int, remat: str) -> dict[str, int]:
    """XLA's temporary bytes and the peak RSS growth of one ``kind`` call, measured in this process."""
    job = Command1.load()
    trainer = job.trainer(remat=remat)
    model = trainer.model
    params = load_params(job.directory, job.model_config, shardings=trainer.shardings["params"])
    examples = job.step_examples(batch_size, 1)[0]
    batch = job.layout()(examples, job.tokenizer.pad_token_id)
    if kind == "train":
        holder = {"state": trainer.init(jax.random.key(0))}
        micro = trainer.put_batch(jax.tree.map(lambda x: x[None], batch), leading=1)
        compiled = trainer.compile_train_step(holder["state"], params, micro)

        def call() -> Any:
            holder["state"], metrics = trainer.train_step(holder["state"], params, micro)
            return metrics
    else:
        adapters = init_variables(model, jax.random.key(0), ("adapters",))["adapters"]
        if kind == "eval_loss":
            fn = jax.jit(lambda p, a, b: batch_loss(model, {"params": p, "adapters": a}, b)[:2])
            args = (params, adapters, trainer.put_batch(batch))
        else:
            fn = jax.jit(lambda p, a, t, m: model.apply({"params": p, "adapters": a}, t, m))
            args = (params, adapters, batch["tokens"], batch["attention_mask"])
        compiled = fn.lower(*args).compile()

        def call() -> Any:
            return fn(*args)

    jax.block_until_ready(call())
    growth = []
    for _ in range(REPEATS):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the call must fault its own in
        before = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        jax.block_until_ready(call())
        growth.append(_status_bytes("VmHWM") - before)
    stats = compiled.memory_analysis()
    allocated = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return {"xla_bytes": allocated, "peak_growth_bytes": max(growth)}


def run(batch_size: int, remat: str) -> dict[str, Any]:
    measured = {}
    for kind in KINDS:
        command = [sys.executable, __file__, "--probe", kind, "--batch-size", str(batch_size), "--remat", remat]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        measured[kind] = json.loads(out.strip().splitlines()[-1])
    mib = {k: {m: v / 2**20 for m, v in d.items()} for k, d in measured.items()}
    return {
        "device": jax.devices()[0].device_kind,
        "batch_size": batch_size,
        "remat": remat,
        "mib": mib,
        "train_over_eval": {
            f"{measure}/{eval_kind}": measured["train"][measure] / measured[eval_kind][measure]
            for measure in ("xla_bytes", "peak_growth_bytes")
            for eval_kind in ("eval_logits", "eval_loss")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--remat", choices=REMAT_CHOICES, default="none")
    parser.add_argument("--probe", choices=KINDS, help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.batch_size, args.remat)))
        return
    results = run(args.batch_size, args.remat)
    print(f"{results['device']}, command 1's first batch of {args.batch_size}, remat={args.remat}:")
    for kind, m in results["mib"].items():
        print(f"  {kind:<12} XLA {m['xla_bytes']:8.0f} MiB, peak RSS growth {m['peak_growth_bytes']:8.0f} MiB")
    print("  train / eval: " + ", ".join(f"{k} {v:.2f}x" for k, v in results["train_over_eval"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
