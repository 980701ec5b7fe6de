"""Whole-model benchmark on SmolLM2-135M-Instruct, or on random weights of a published shape; all step timings
interleaved in one run.

    python bench/model_bench.py                                 # CPU defaults (a few minutes on 2 cores)
    python bench/model_bench.py --batch 16 --length 512 --dtype bfloat16      # an accelerator
    python bench/model_bench.py --shape llama-3.2-1b --batch 8 --length 256 --dtype bfloat16

``--model`` (default: the offline SmolLM2-135M-Instruct) loads a checkpoint; ``--shape`` instead builds random
weights (one jitted initialisation, in ``--dtype``) of a published architecture, so that nothing has to be
downloaded or copied to the machine that runs it.

Reports: loading the weights (``--model`` only: seconds, and the growth of peak host memory over the weights' size),
compile time of each measured function, forward tokens/s, and per-step time of
  - a frozen-model forward+backward (gradients to every layer's activations; the only weights differentiated are
    the attention-norm scales, which cost nothing),
  - LoRA r=4 and MoE-LoRA (E=20, r=4, top-k 10) on q, k, v, o: forward+backward into the adapters,
  - the MoE-LoRA train step: that plus ``adamw`` and the update, and the same with ``riemann_precond`` first,
as ratios to the frozen forward+backward of the same batch. The loss is token cross-entropy.
Model FLOPs of the MoE-LoRA train step per token are counted as ``train_flops_per_token`` states; with bfloat16 on a
GPU of known peak, the utilisation is achieved model FLOP/s over that peak.
Memory: XLA's compiled memory analysis of each function (argument, output and temporary bytes; their sum, less
aliased bytes, is what the executable holds while it runs), its MoE-LoRA / LoRA and MoE-LoRA / frozen ratios, and
the device's peak bytes in use over the whole run where the backend reports it (None on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import add_run_arguments, interleaved_medians

from moelora_jax import AdapterConfig, riemann_precond
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.models.pretrained import load_config, load_params, resolve_model_dir
from moelora_jax.models.shapes import SHAPES

MOE = AdapterConfig(num_experts=20, rank=4, top_k=10, alpha=16.0)
LORA = AdapterConfig(num_experts=1, rank=4, alpha=16.0)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}
"""Dense bfloat16 tensor-core peaks (NVIDIA's datasheets, SXM parts), for model-FLOPs utilisation."""


def train_flops_per_token(config: LlamaConfig, length: int) -> float:
    """Model FLOPs per token of an adapter train step on a frozen base: the forward's matmuls, ``2 x`` every weight
    used per token (projections, MLP, LM head) plus attention's ``QK^T`` and ``AV`` (``4 T H D_h`` per layer, the
    full ``T x T`` as computed), doubled for the backward through the activations (frozen weights get no gradient,
    so not the usual 3x). The adapters' own FLOPs (about 1% at r=4) are not counted."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    weights = c.num_layers * per_layer + c.hidden_size * c.vocab_size
    attention = c.num_layers * 4 * length * q
    return 2 * (2 * weights + attention)


def frozen_fwd_bwd(config: LlamaConfig, dtype: Any) -> jax.stages.Wrapped:
    """``(attn_norm_scales, params, tokens) -> grads``: a frozen model's forward+backward, with gradients flowing
    through every layer's activations; the only weights differentiated are the norm scales, which cost nothing."""
    base = Llama(config, dtype=dtype, param_dtype=dtype)

    def loss(norm_scales, params, tokens):
        params = {**params, "layers": {**params["layers"], "attn_norm": {"scale": norm_scales}}}
        return cross_entropy(base.apply({"params": params}, tokens), tokens)

    return jax.jit(jax.grad(loss))


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """Bytes of XLA's memory analysis of ``compiled`` (None where the backend gives none); ``total`` is
    argument + output + temp - alias."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    sizes = {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
    }
    return {**sizes, "total": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this architecture instead")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    add_run_arguments(parser, rounds=5)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    load: dict[str, float] = {}
    if args.shape:
        config, model_name = SHAPES[args.shape], f"random {args.shape}"
        params = init_variables(Llama(config, param_dtype=dtype), jax.random.key(0), ("params",))["params"]
    else:
        directory = resolve_model_dir(args.model)  # converts a GGUF once, into the cache
        config, model_name = load_config(directory), str(directory)
        rss_before, start = _peak_rss_bytes(), time.perf_counter()
        params = load_params(directory, config, param_dtype=dtype)
        load["load_s"] = time.perf_counter() - start
        load["load_rss_bytes"] = _peak_rss_bytes() - rss_before
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.length)), jnp.int32)
    base = Llama(config, dtype=dtype, param_dtype=dtype)
    models = {"lora": Llama(config, adapter=LORA, dtype=dtype, param_dtype=dtype)}
    models["moe_lora"] = Llama(config, adapter=MOE, dtype=dtype, param_dtype=dtype)
    # Non-zero B so that no gradient is trivially zero.
    adapters = {
        name: jax.tree.map(lambda x: x + 1e-3, init_variables(m, jax.random.key(1), ("adapters",))["adapters"])
        for name, m in models.items()
    }

    forward = jax.jit(lambda p, t: base.apply({"params": p}, t))

    frozen_grad = frozen_fwd_bwd(config, dtype)

    def adapter_grad(name):
        def loss(ad, p, t):
            return cross_entropy(models[name].apply({"params": p, "adapters": ad}, t), t)

        return jax.jit(jax.grad(loss))

    def make_train_step(tx):
        @jax.jit
        def train_step(ad, opt_state, p, t):
            grads = jax.grad(lambda a: cross_entropy(models["moe_lora"].apply({"params": p, "adapters": a}, t), t))(ad)
            updates, opt_state = tx.update(grads, opt_state, ad)
            return optax.apply_updates(ad, updates), opt_state

        return train_step

    tx, plain_tx = optax.chain(riemann_precond(), optax.adamw(1e-4)), optax.adamw(1e-4)
    scales = params["layers"]["attn_norm"]["scale"]
    opt_state, plain_opt_state = tx.init(adapters["moe_lora"]), plain_tx.init(adapters["moe_lora"])
    measured: dict[str, tuple[jax.stages.Wrapped, tuple[Any, ...]]] = {
        "forward": (forward, (params, tokens)),
        "frozen_fwd_bwd": (frozen_grad, (scales, params, tokens)),
        "lora_fwd_bwd": (adapter_grad("lora"), (adapters["lora"], params, tokens)),
        "moe_lora_fwd_bwd": (adapter_grad("moe_lora"), (adapters["moe_lora"], params, tokens)),
        "moe_lora_train_step_adamw": (
            make_train_step(plain_tx),
            (adapters["moe_lora"], plain_opt_state, params, tokens),
        ),
        "moe_lora_train_step": (make_train_step(tx), (adapters["moe_lora"], opt_state, params, tokens)),
    }
    compiled: dict[str, jax.stages.Compiled] = {}
    compile_s: dict[str, float] = {}
    for name, (fn, fn_args) in measured.items():
        start = time.perf_counter()
        compiled[name] = fn.lower(*fn_args).compile()
        compile_s[name] = time.perf_counter() - start
    memory = {name: compiled_memory(c) for name, c in compiled.items()}
    medians = interleaved_medians(
        {name: (lambda c=c, a=measured[name][1]: c(*a)) for name, c in compiled.items()}, args.rounds, args.warmup
    )
    device_stats = jax.devices()[0].memory_stats()
    n_tokens = args.batch * args.length
    results: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "model": model_name,
        "batch": [args.batch, args.length],
        "dtype": args.dtype,
        "weights_mb": weight_bytes / 2**20,
        "compile_s": compile_s,
        "forward_tokens_per_s": n_tokens / medians["forward"],
        "step_ms": {k: 1e3 * v for k, v in medians.items()},
        "ratio_to_frozen_fwd_bwd": {k: v / medians["frozen_fwd_bwd"] for k, v in medians.items()},
        "riemann_over_adamw_train_step": medians["moe_lora_train_step"] / medians["moe_lora_train_step_adamw"],
        "train_tokens_per_s": n_tokens / medians["moe_lora_train_step"],
        "train_flops_per_token": train_flops_per_token(config, args.length),
        "peak_flops": PEAK_BF16_FLOPS.get(jax.devices()[0].device_kind) if args.dtype == "bfloat16" else None,
        "compiled_memory_bytes": memory,
        "device_peak_bytes_in_use": None if device_stats is None else device_stats.get("peak_bytes_in_use"),
    }
    print(f"{results['device']}, {args.dtype}, {model_name}, batch {args.batch} x {args.length}, {args.rounds} rounds")
    if load:
        results["load_s"] = load["load_s"]
        results["load_peak_rss_over_weights"] = load["load_rss_bytes"] / weight_bytes
        print(
            f"load {load['load_s']:.1f} s; peak host memory growth {load['load_rss_bytes'] / 2**20:.0f} MiB for "
            f"{weight_bytes / 2**20:.0f} MiB of weights ({results['load_peak_rss_over_weights']:.2f}x)"
        )
    else:
        print(f"{weight_bytes / 2**20:.0f} MiB of random weights")
    print("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    print(f"forward: {results['forward_tokens_per_s']:.0f} tokens/s")
    print(f"{'step':<28}{'ms':>10}{'/ frozen fwd+bwd':>18}{'total MiB':>12}{'temp MiB':>12}")
    for name, ms in results["step_ms"].items():
        mem = memory[name]
        mib = "" if mem is None else f"{mem['total'] / 2**20:>12.0f}{mem['temp'] / 2**20:>12.0f}"
        print(f"{name:<28}{ms:>10.1f}{results['ratio_to_frozen_fwd_bwd'][name]:>18.3f}{mib}")
    print(f"riemann_precond + adamw over adamw alone, whole train step: {results['riemann_over_adamw_train_step']:.3f}")
    achieved = results["train_tokens_per_s"] * results["train_flops_per_token"]
    results["mfu"] = achieved / results["peak_flops"] if results["peak_flops"] else None
    print(
        f"MoE-LoRA train step: {results['train_tokens_per_s']:.0f} tokens/s, {achieved / 1e12:.1f} model TFLOP/s"
        + (f", {results['mfu']:.1%} of the bf16 peak" if results["mfu"] else "")
    )
    moe = memory["moe_lora_fwd_bwd"]
    if moe is not None:  # the backend gives an analysis for every function or for none
        results["memory_ratios"] = {
            f"moe_lora_over_{other}_{kind}": moe[kind] / memory[f"{other}_fwd_bwd"][kind]
            for other in ("lora", "frozen")
            for kind in ("total", "temp")
        }
        print("compiled memory, fwd+bwd: " + ", ".join(f"{k} {v:.3f}" for k, v in results["memory_ratios"].items()))
    if results["device_peak_bytes_in_use"] is not None:
        print(f"device peak bytes in use over the run: {results['device_peak_bytes_in_use'] / 2**20:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
