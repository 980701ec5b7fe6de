"""Peak host memory of a train step against an eval forward of the same batch (CPU, where host memory is device
memory).

    python bench/memory_bench.py                 # SmolLM2-135M-Instruct, MoE-LoRA E=20 r=4 top-k 10, 4 x 128

Each measurement runs in its own process: load the weights, compile and run once; then three times: return freed
heap pages to the system (``malloc_trim``), reset the kernel's peak resident-set counter (``/proc/self/clear_refs``)
and run again. The figure is the largest of those runs' peak RSS above the RSS just before it: the memory the call
itself needs (activations, gradients, optimizer temporaries), with the weights already resident. The train step
is ``Trainer.train_step`` (``sqrt_gate``, AdamW + ``riemann_precond``); the eval forward is the same model's jitted
``apply`` returning float32 logits. Linux only.
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
import numpy as np
from trainer_step import trainer_step

from moelora_jax import AdapterConfig
from moelora_jax.models.llama import Llama, init_variables
from moelora_jax.optim import OptimConfig
from moelora_jax.pretrained import load_config, load_params, resolve_model_dir

REPEATS = 3
ADAPTER = AdapterConfig(num_experts=20, rank=4, top_k=10, alpha=16.0, strategy="sqrt_gate")


def _status_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe(kind: str, model: str | None, batch: int, length: int) -> int:
    """Peak RSS growth (bytes) of one ``kind`` call ("train" or "eval"), measured in this process."""
    directory = resolve_model_dir(model)
    config = load_config(directory)
    params = load_params(directory, config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, length)).astype(np.int32)
    if kind == "train":
        optim = OptimConfig(family="adamw", lr=1e-4, gate_lr=1e-4, riemann=True)
        call = trainer_step(config, params, ADAPTER, optim, tokens)[0]
    else:
        llama = Llama(config, adapter=ADAPTER)
        adapters = init_variables(llama, jax.random.key(0), ("adapters",))["adapters"]
        forward = jax.jit(lambda p, a, t: llama.apply({"params": p, "adapters": a}, t))

        def call():
            return forward(params, adapters, tokens)

    jax.block_until_ready(call())
    growth = []
    for _ in range(REPEATS):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the call must fault its own in
        before = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        jax.block_until_ready(call())
        growth.append(_status_bytes("VmHWM") - before)
    return max(growth)


def run(model: str | None, batch: int, length: int) -> dict[str, Any]:
    growth = {}
    for kind in ("eval", "train"):
        command = [sys.executable, __file__, "--probe", kind, "--batch", str(batch), "--length", str(length)]
        if model:
            command += ["--model", model]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        growth[kind] = json.loads(out.strip().splitlines()[-1])["peak_growth_bytes"]
    return {
        "device": jax.devices()[0].device_kind,
        "batch": [batch, length],
        "peak_growth_mib": {k: v / 2**20 for k, v in growth.items()},
        "train_over_eval": growth["train"] / growth["eval"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--probe", choices=["train", "eval"], help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps({"peak_growth_bytes": probe(args.probe, args.model, args.batch, args.length)}))
        return
    results = run(args.model, args.batch, args.length)
    mib = results["peak_growth_mib"]
    print(
        f"{results['device']}, batch {args.batch} x {args.length}: peak host memory of the call, above the loaded "
        f"model: eval forward {mib['eval']:.0f} MiB, train step {mib['train']:.0f} MiB "
        f"({results['train_over_eval']:.2f}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
