"""Whole-model benchmark on the real SmolLM2-135M-Instruct; all step timings interleaved in one run.

    python bench/model_bench.py                                 # CPU defaults (a few minutes on 2 cores)
    python bench/model_bench.py --batch 16 --length 512 --dtype bfloat16      # an accelerator

Reports: loading the weights (seconds, and the growth of peak host memory over the weights' size), compile time
of the forward and of the MoE-LoRA train step, forward tokens/s, and per-step time of
  - a frozen-model forward+backward (gradients to every layer's activations; the only weights differentiated are
    the attention-norm scales, which cost nothing),
  - LoRA r=4 and MoE-LoRA (E=20, r=4, top-k 10) on q, k, v, o: forward+backward into the adapters,
  - the MoE-LoRA train step: that plus ``adamw`` and the update, and the same with ``riemann_precond`` first,
as ratios to the frozen forward+backward of the same batch. The loss is token cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import add_run_arguments, interleaved_medians

from moelora_jax import AdapterConfig, riemann_precond
from moelora_jax.models.llama import Llama, init_variables
from moelora_jax.pretrained import load_config, load_params, resolve_model_dir

MOE = AdapterConfig(num_experts=20, rank=4, top_k=10, alpha=16.0)
LORA = AdapterConfig(num_experts=1, rank=4, alpha=16.0)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    add_run_arguments(parser, rounds=5)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    directory = resolve_model_dir(args.model)  # converts a GGUF once, into the cache
    config = load_config(directory)
    rss_before, start = _peak_rss_bytes(), time.perf_counter()
    params = load_params(directory, config, param_dtype=dtype)
    load_s = time.perf_counter() - start
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    load_rss = _peak_rss_bytes() - rss_before

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

    def frozen_loss(norm_scales, p, t):
        p = {**p, "layers": {**p["layers"], "attn_norm": {"scale": norm_scales}}}
        return cross_entropy(base.apply({"params": p}, t), t)

    frozen_grad = jax.jit(jax.grad(frozen_loss))

    def adapter_grad(name):
        def loss(ad, p, t):
            return cross_entropy(models[name].apply({"params": p, "adapters": ad}, t), t)

        return jax.jit(jax.grad(loss))

    lora_grad, moe_grad = adapter_grad("lora"), adapter_grad("moe_lora")

    def make_train_step(tx):
        @jax.jit
        def train_step(ad, opt_state, p, t):
            grads = jax.grad(lambda a: cross_entropy(models["moe_lora"].apply({"params": p, "adapters": a}, t), t))(ad)
            updates, opt_state = tx.update(grads, opt_state, ad)
            return optax.apply_updates(ad, updates), opt_state

        return train_step

    tx, plain_tx = optax.chain(riemann_precond(), optax.adamw(1e-4)), optax.adamw(1e-4)
    train_step, plain_train_step = make_train_step(tx), make_train_step(plain_tx)

    def compile_seconds(fn, *fn_args) -> float:
        start = time.perf_counter()
        fn.lower(*fn_args).compile()
        return time.perf_counter() - start

    scales = params["layers"]["attn_norm"]["scale"]
    opt_state, plain_opt_state = tx.init(adapters["moe_lora"]), plain_tx.init(adapters["moe_lora"])
    compile_s = {
        "forward": compile_seconds(forward, params, tokens),
        "moe_lora_train_step": compile_seconds(train_step, adapters["moe_lora"], opt_state, params, tokens),
    }
    medians = interleaved_medians(
        {
            "forward": lambda: forward(params, tokens),
            "frozen_fwd_bwd": lambda: frozen_grad(scales, params, tokens),
            "lora_fwd_bwd": lambda: lora_grad(adapters["lora"], params, tokens),
            "moe_lora_fwd_bwd": lambda: moe_grad(adapters["moe_lora"], params, tokens),
            "moe_lora_train_step_adamw": lambda: plain_train_step(
                adapters["moe_lora"], plain_opt_state, params, tokens
            ),
            "moe_lora_train_step": lambda: train_step(adapters["moe_lora"], opt_state, params, tokens),
        },
        args.rounds,
        args.warmup,
    )
    n_tokens = args.batch * args.length
    results = {
        "device": jax.devices()[0].device_kind,
        "model": str(directory),
        "batch": [args.batch, args.length],
        "dtype": args.dtype,
        "load_s": load_s,
        "load_peak_rss_over_weights": load_rss / weight_bytes,
        "weights_mb": weight_bytes / 2**20,
        "compile_s": compile_s,
        "forward_tokens_per_s": n_tokens / medians["forward"],
        "step_ms": {k: 1e3 * v for k, v in medians.items()},
        "ratio_to_frozen_fwd_bwd": {k: v / medians["frozen_fwd_bwd"] for k, v in medians.items()},
    }
    print(f"{results['device']}, {args.dtype}, batch {args.batch} x {args.length} tokens, {args.rounds} rounds")
    print(
        f"load {load_s:.1f} s; peak host memory growth {load_rss / 2**20:.0f} MiB for {weight_bytes / 2**20:.0f} MiB "
        f"of weights ({results['load_peak_rss_over_weights']:.2f}x)"
    )
    print("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    print(f"forward: {results['forward_tokens_per_s']:.0f} tokens/s")
    print(f"{'step':<28}{'ms':>10}{'/ frozen fwd+bwd':>18}")
    for name, ms in results["step_ms"].items():
        print(f"{name:<28}{ms:>10.1f}{results['ratio_to_frozen_fwd_bwd'][name]:>18.3f}")
    ratio = medians["moe_lora_train_step"] / medians["moe_lora_train_step_adamw"]
    print(f"riemann_precond + adamw over adamw alone, whole train step: {ratio:.3f}")
    results["riemann_over_adamw_train_step"] = ratio
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
