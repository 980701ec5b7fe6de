"""A quantized frozen base (``model.quantize``) against the float one, side by side in one run (CPU).

    python bench/quant_bench.py                       # every section on SmolLM2-135M-Instruct (command 1's model)
    python bench/quant_bench.py --section bytes       # just the byte ratios (also Llama-3.2-3B's shapes)

Sections:
  - ``bytes``: frozen projection-kernel bytes of int8, nf4 and nf4 + double quantization against bfloat16
    (computed from the formats' leaf shapes, :func:`moelora_jax.adapters.quantize.kernel_leaves`);
  - ``load``: peak host RSS of ``load_params`` for each mode, each in its own process;
  - ``agreement``: next-token argmax agreement and mean KL(float || quantized) over the real tokens of command 1's
    held-out BBC prompts;
  - ``step``: command 1's MoE-LoRA train step (E=20, r=4, top-k 10, AdamW + riemann_precond) on a float32 base
    against nf4 and int8 bases, steps alternating between the variants, medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bbc_batches import Command1

from moelora_jax.adapters.quantize import QuantConfig, kernel_leaves
from moelora_jax.data.encoding import encode_prompt, left_pad
from moelora_jax.data.tasks import load_task
from moelora_jax.models.llama import Llama, LlamaConfig
from moelora_jax.models.pretrained import load_config, load_params, resolve_model_dir
from moelora_jax.models.shapes import SHAPES

MODES = {
    "int8": QuantConfig("int8"),
    "nf4": QuantConfig("nf4"),
    "nf4_double": QuantConfig("nf4", double_quant=True),
}


def kernel_shapes(config: LlamaConfig) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every projection kernel of one layer."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def frozen_bytes(config: LlamaConfig, quant: QuantConfig | None) -> int:
    """Bytes of the projection kernels (bfloat16 when ``quant`` is None)."""
    per_layer = 0
    for d_in, d_out in kernel_shapes(config):
        if quant is None:
            per_layer += 2 * d_in * d_out
        else:
            leaves = kernel_leaves(quant, d_in, d_out).values()
            per_layer += sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype, _ in leaves)
    return per_layer * config.num_layers


def bytes_section(smollm: LlamaConfig) -> None:
    for name, config in (("SmolLM2-135M", smollm), ("Llama-3.2-3B shape", SHAPES["llama-3.2-3b"])):
        base = frozen_bytes(config, None)
        ratios = ", ".join(f"{m} {frozen_bytes(config, q) / base:.3f}x" for m, q in MODES.items())
        print(f"bytes  {name}: bfloat16 kernels {base / 2**20:.1f} MiB; {ratios}")


def _load_peak(mode: str) -> None:
    """(In a child process) load SmolLM2's params in ``mode`` and print the peak RSS growth in MiB."""
    directory = resolve_model_dir(None)
    config = load_config(directory)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = load_params(directory, config, param_dtype=jnp.bfloat16, quant=MODES.get(mode))
    jax.block_until_ready(params)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    held = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    print(json.dumps({"mode": mode, "peak_growth_mib": grown, "params_mib": held}))


def load_section() -> None:
    results = {}
    for mode in ("bfloat16", *MODES):
        out = subprocess.run(
            [sys.executable, __file__, "--child-load", mode], capture_output=True, text=True, check=True
        ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    base = results["bfloat16"]["peak_growth_mib"]
    for mode, r in results.items():
        print(
            f"load   {mode}: params {r['params_mib']:.0f} MiB, peak host growth {r['peak_growth_mib']:.0f} MiB "
            f"({r['peak_growth_mib'] / base:.2f}x bfloat16's)"
        )


def agreement_section(job: Command1, prompts: int) -> None:
    _, examples = load_task(job.config.data.task, None, job.config.data.eval_split)
    rows = [encode_prompt(job.tokenizer, e.prompt, job.config.data.max_length) for e in examples[:prompts]]
    tokens, mask = left_pad(rows, max(len(r) for r in rows), job.tokenizer.pad_token_id)

    def logits(quant: QuantConfig | None) -> np.ndarray:
        model = Llama(job.model_config, quant=quant)
        params = load_params(job.directory, job.model_config, quant=quant)
        return np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask), np.float64)

    reference = logits(None)
    real = mask.astype(bool)
    log_p = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    for mode, quant in MODES.items():
        ours = logits(quant)
        log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
        kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)[real]
        agree = (reference.argmax(-1) == ours.argmax(-1))[real]
        print(
            f"agree  {mode}: next-token argmax agreement {agree.mean():.4f}, mean KL {kl.mean():.5f} nats over "
            f"{real.sum()} tokens of {prompts} held-out prompts"
        )


def step_section(job: Command1, steps: int) -> None:
    variants = {"float32": None, "nf4": MODES["nf4"], "int8": MODES["int8"]}
    examples = job.step_examples(job.config.train.batch_size, steps)
    layout = job.layout()
    batches = [jax.tree.map(lambda x: x[None], layout(e, job.tokenizer.pad_token_id)) for e in examples]
    runners = {}
    for name, quant in variants.items():
        quantize = {} if quant is None else {"quantize": quant.mode, "double_quant": quant.double_quant}
        trainer = job.trainer(**quantize)
        params = load_params(job.directory, job.model_config, shardings=trainer.shardings["params"], quant=quant)
        state = trainer.init(jax.random.key(0))
        for batch in batches:  # compile every shape
            state, metrics = trainer.train_step(state, params, batch)
        jax.block_until_ready(metrics)
        runners[name] = [trainer, params, state, []]
    for batch in batches:
        for runner in runners.values():
            trainer, params, state, times = runner
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, params, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            runner[2] = state
    base = float(np.median(runners["float32"][3]))
    for name, (_, _, _, times) in runners.items():
        median = float(np.median(times))
        print(f"step   {name}: median {median * 1e3:.0f} ms over {steps} steps ({median / base:.2f}x float32's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("all", "bytes", "load", "agreement", "step"), default="all")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child-load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        return _load_peak(args.child_load)
    smollm = load_config(resolve_model_dir(None))
    if args.section in ("all", "bytes"):
        bytes_section(smollm)
    if args.section in ("all", "load"):
        load_section()
    if args.section in ("all", "agreement", "step"):
        job = Command1.load()
        if args.section in ("all", "agreement"):
            agreement_section(job, args.prompts)
        if args.section in ("all", "step"):
            step_section(job, args.steps)
    return None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
