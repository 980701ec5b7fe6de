"""Adapter-core benchmark on Llama-3.2-3B attention shapes; every comparison is timed interleaved in one run.

    python bench/adapter_bench.py                                   # CPU defaults (a few minutes on 2 cores)
    python bench/adapter_bench.py --tokens 8192 --dtype bfloat16    # an accelerator

1. fwd+bwd through q, k, v, o (d=3072, kv=1024) of: the frozen projections alone (gradient to the input only), LoRA
   r=4, MoE-LoRA E=20 r=4 top-k 10 (standard and sqrt_gate), and a plain einsum MoE-LoRA differentiated by autodiff
   (the baseline the fused form replaces). Ratios are against LoRA r=4 and against the frozen projections.
2. One optimizer update for the adapters of a whole 28-layer model (q, k, v, o; E=20, r=4 plus gates):
   ``chain(riemann_precond, adamw)`` against ``adamw`` alone, in milliseconds and as a ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
from timing import add_run_arguments, interleaved_medians

from moelora_jax import AdaptedDense, AdapterConfig, riemann_precond, topk_softmax_gate

D_MODEL, LAYERS = 3072, 28
PROJECTIONS = {"q": 3072, "k": 1024, "v": 1024, "o": 3072}  # output features; all read d_model inputs


def _einsum_moe_delta(x, lora_a, lora_b, gate, *, top_k, scale):
    """The straightforward MoE-LoRA: gate, einsum into (tokens, E, r), weighted einsum out; plain autodiff."""
    g = topk_softmax_gate(x @ gate.astype(x.dtype), top_k).astype(x.dtype)
    h = jnp.einsum("td,edr->ter", x, lora_a.astype(x.dtype))
    return scale * jnp.einsum("ter,te,erk->tk", h, g, lora_b.astype(x.dtype))


def projection_step(adapter: AdapterConfig | None, dtype, tokens: int, einsum_baseline: bool = False):
    """A jitted fwd+bwd through the four attention projections; returns a zero-argument callable."""
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (tokens, D_MODEL), dtype)
    x_o = jax.random.normal(keys[1], (tokens, D_MODEL), dtype)
    modules = {
        name: AdaptedDense(d_out, adapter=adapter, dtype=dtype, param_dtype=dtype)
        for name, d_out in PROJECTIONS.items()
    }
    variables = {name: m.init(keys[2], x[:1]) for name, m in modules.items()}
    frozen = {name: v["params"] for name, v in variables.items()}
    # Non-zero B so that no gradient is trivially zero.
    trainable = {
        name: {k: (jnp.full_like(a, 0.01) if k == "lora_b" else a) for k, a in v["adapters"].items()}
        for name, v in variables.items()
    }

    def project(name, inputs, trainable):
        if not einsum_baseline:
            return modules[name].apply({"params": frozen[name], "adapters": trainable[name]}, inputs)
        t = trainable[name]
        base = inputs @ frozen[name]["kernel"]
        return base + _einsum_moe_delta(
            inputs, t["lora_a"], t["lora_b"], t["gate"], top_k=adapter.top_k, scale=adapter.scale
        )

    def loss(trainable, x, x_o):
        total = 0.0
        for name in PROJECTIONS:
            y = project(name, x_o if name == "o" else x, trainable)
            total = total + jnp.mean(jnp.square(y.astype(jnp.float32)))
        return total

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: grad_fn(trainable, x, x_o)


def projection_flops(adapter: AdapterConfig | None, tokens: int) -> float:
    """Matmul FLOPs of one fwd+bwd through q, k, v, o (2 per multiply-add; elementwise work not counted).

    Frozen: ``x @ W0`` and ``dx = dy @ W0^T``. An adapter adds, per projection, three matmuls over its
    ``c_in = E*r (+ E gate columns)`` and three over its ``c_out = E*r`` columns (forward, input and weight grads).
    """
    total = 0.0
    for d_out in PROJECTIONS.values():
        total += 2 * 2 * tokens * D_MODEL * d_out
        if adapter is not None:
            c_out = adapter.num_experts * adapter.rank
            c_in = c_out + (adapter.num_experts if adapter.num_experts > 1 else 0)
            total += 3 * 2 * tokens * (c_in * D_MODEL + c_out * d_out)
    return total


def bench_projections(tokens: int, dtype, rounds: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds and matmul FLOPs per variant."""
    moe = AdapterConfig(num_experts=20, rank=4, top_k=10, alpha=16.0)
    configs = {
        "frozen projections": (None, False),
        "LoRA r=4": (AdapterConfig(rank=4, alpha=16.0), False),
        "MoE-LoRA standard": (moe, False),
        "MoE-LoRA sqrt_gate": (dataclasses.replace(moe, strategy="sqrt_gate"), False),
        "MoE-LoRA einsum+autodiff": (moe, True),
    }
    variants = {name: projection_step(cfg, dtype, tokens, einsum) for name, (cfg, einsum) in configs.items()}
    flops = {name: projection_flops(cfg, tokens) for name, (cfg, _) in configs.items()}
    return interleaved_medians(variants, rounds, warmup), flops


def whole_model_adapters(num_experts: int = 20, rank: int = 4) -> dict:
    """Adapter params of a 28-layer model with stacked (layer, expert) axes, as a scanned model holds them."""
    keys = iter(jax.random.split(jax.random.key(1), 3 * len(PROJECTIONS)))
    tree = {}
    for name, d_out in PROJECTIONS.items():
        tree[name] = {
            "lora_a": 0.02 * jax.random.normal(next(keys), (LAYERS, num_experts, D_MODEL, rank)),
            "lora_b": 0.02 * jax.random.normal(next(keys), (LAYERS, num_experts, rank, d_out)),
            "gate": 0.02 * jax.random.normal(next(keys), (LAYERS, D_MODEL, num_experts)),
        }
    return tree


def optimizer_step(tx: optax.GradientTransformation, params: dict, grads: dict):
    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = {"params": params, "opt_state": tx.init(params)}

    def run():
        # Feeding the result back keeps a realistic dependency chain without donating shared inputs.
        state["params"], state["opt_state"] = step(state["params"], state["opt_state"], grads)
        return state["params"]

    return run


def bench_optimizer(rounds: int, warmup: int) -> dict[str, float]:
    params = whole_model_adapters()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    variants = {
        "adamw": optimizer_step(optax.adamw(1e-5), params, grads),
        "riemann_precond + adamw": optimizer_step(optax.chain(riemann_precond(1e-6), optax.adamw(1e-5)), params, grads),
    }
    return interleaved_medians(variants, rounds, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    add_run_arguments(parser, rounds=10)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"tokens={args.tokens} dtype={args.dtype} rounds={args.rounds} (medians, interleaved)\n")

    proj, flops = bench_projections(args.tokens, dtype, args.rounds, args.warmup)
    lora, frozen = proj["LoRA r=4"], proj["frozen projections"]
    print("fwd+bwd through q, k, v, o at d=3072, kv=1024 (GFLOP: matmuls only, 2 per multiply-add)")
    print(f"{'variant':<28}{'ms':>10}{'/ LoRA r=4':>12}{'/ frozen':>10}{'GFLOP':>9}{'TFLOP/s':>9}")
    for name, seconds in proj.items():
        ratios = f"{seconds / lora:>12.3f}{seconds / frozen:>10.3f}"
        print(f"{name:<28}{1e3 * seconds:>10.2f}{ratios}{flops[name] / 1e9:>9.1f}{flops[name] / seconds / 1e12:>9.2f}")

    opt = bench_optimizer(args.rounds, args.warmup)
    extra = opt["riemann_precond + adamw"] - opt["adamw"]
    print(f"\noptimizer update for {LAYERS} layers x (q, k, v, o) adapters, E=20, r=4 (+ gates)")
    print(f"{'variant':<28}{'ms':>10}{'/ adamw':>12}")
    for name, seconds in opt.items():
        print(f"{name:<28}{1e3 * seconds:>10.2f}{seconds / opt['adamw']:>12.3f}")
    print(f"riemann_precond adds {1e3 * extra:.2f} ms per update")

    if args.json:
        with open(args.json, "w") as f:
            record = {"device": device.device_kind, "backend": jax.default_backend(), **vars(args)}
            results = {"projection_seconds": proj, "projection_flops": flops, "optimizer_seconds": opt}
            json.dump({**record, **results}, f, indent=2)


if __name__ == "__main__":
    main()
