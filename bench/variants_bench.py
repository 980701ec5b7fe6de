"""The real train step across adapter variants, timed interleaved in one run, as ratios to a frozen fwd+bwd.

    python bench/variants_bench.py                                          # SmolLM2-135M-Instruct, 4 x 128, CPU
    python bench/variants_bench.py --shape llama-3.2-3b --layers 2 --batch 2 --length 64   # 3B shapes, random

Every step is ``Trainer.train_step`` (forward, token cross-entropy, backward into the adapters, AdamW lr 1e-4,
state donated) on q, k, v, o with r=4:
  - LoRA, with and without ``riemann_precond``;
  - MoE-LoRA E=20 top-k 10: ``standard`` and ``sqrt_gate`` gradients, without and with ``riemann_precond``;
  - MoSLoRA (an r x r mixer): LoRA with and without ``riemann_precond``, and MoE-LoRA E=20 with ``sqrt_gate`` and
    ``riemann_precond``;
  - MoE-LoRA as E grows (4, 8, 50; top-k E/2, like 10 of 20), ``sqrt_gate`` + ``riemann_precond``; with E=1 (LoRA
    + ``riemann_precond``) and E=20 from above, the fused design's cost in E.
The reference point is a frozen-model forward+backward of the same batch (gradients to every layer's activations,
as in ``model_bench.py``). Every MoE-LoRA step also computes the routing statistics it logs (expert load, balance
and z-losses); for E=20 and E=50 they are timed alone too, jitted on the gate decisions one forward sows, as an upper
bound on their share of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from model_bench import frozen_fwd_bwd
from timing import add_run_arguments, interleaved_medians
from trainer_step import trainer_step

from moelora_jax import AdapterConfig
from moelora_jax.adapters.layers import ROUTER_COLLECTION
from moelora_jax.adapters.routing import RouterLosses, router_stats, sown_routing
from moelora_jax.models.llama import Llama, LlamaConfig, init_variables
from moelora_jax.models.pretrained import load_config, load_params, resolve_model_dir
from moelora_jax.models.shapes import SHAPES
from moelora_jax.optim.optimizer import OptimConfig

RANK, ALPHA = 4, 16.0
TARGETS = ("q", "k", "v", "o")


def variants() -> dict[str, tuple[AdapterConfig, bool]]:
    """Name -> (adapter, riemann_precond on)."""
    table = {
        "lora": (AdapterConfig(1, RANK, None, ALPHA), False),
        "lora_riemann": (AdapterConfig(1, RANK, None, ALPHA), True),
        "moe20_standard": (AdapterConfig(20, RANK, 10, ALPHA, strategy="standard"), False),
        "moe20_sqrt_gate": (AdapterConfig(20, RANK, 10, ALPHA, strategy="sqrt_gate"), False),
        "moe20_standard_riemann": (AdapterConfig(20, RANK, 10, ALPHA, strategy="standard"), True),
        "moe20_sqrt_gate_riemann": (AdapterConfig(20, RANK, 10, ALPHA, strategy="sqrt_gate"), True),
        "moslora": (AdapterConfig(1, RANK, None, ALPHA, mixer=True), False),
        "moslora_riemann": (AdapterConfig(1, RANK, None, ALPHA, mixer=True), True),
        "moe20_moslora_sqrt_gate_riemann": (AdapterConfig(20, RANK, 10, ALPHA, strategy="sqrt_gate", mixer=True), True),
    }
    for experts in (4, 8, 50):
        table[f"moe{experts}_sqrt_gate_riemann"] = (
            AdapterConfig(experts, RANK, experts // 2, ALPHA, strategy="sqrt_gate"),
            True,
        )
    return table


def routing_stats(
    config: LlamaConfig, params: Any, adapter: AdapterConfig, tokens: np.ndarray, dtype: Any
) -> Callable[[], Any]:
    """The routing statistics and losses a train step logs, jitted alone on the gate decisions of one forward."""
    model = Llama(config, adapter=adapter, adapter_targets=TARGETS, dtype=dtype, param_dtype=dtype)
    adapters = init_variables(model, jax.random.key(0), ("adapters",))["adapters"]
    _, sown = model.apply({"params": params, "adapters": adapters}, tokens, mutable=[ROUTER_COLLECTION])
    weights = jnp.ones(tokens.shape, jnp.float32)
    stats = jax.jit(lambda sown, weights: RouterLosses()(router_stats(sown_routing(sown), weights)))
    return lambda: stats(sown, weights)


def run(
    model: str | None, shape: str | None, layers: int, batch: int, length: int, dtype: str, rounds: int, warmup: int
) -> dict[str, Any]:
    compute = jnp.dtype(dtype)
    if shape:
        config = dataclasses.replace(SHAPES[shape], num_layers=layers or SHAPES[shape].num_layers)
        name = f"random {shape}, {config.num_layers} layers"
        params = init_variables(Llama(config, param_dtype=compute), jax.random.key(0), ("params",))["params"]
    else:
        directory = resolve_model_dir(model)
        config, name = load_config(directory), str(directory)
        params = load_params(directory, config, param_dtype=compute)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, length)).astype(np.int32)
    frozen = frozen_fwd_bwd(config, compute)
    scales = params["layers"]["attn_norm"]["scale"]
    steps = {"frozen_fwd_bwd": lambda: frozen(scales, params, tokens)}
    table = variants()
    for variant, (adapter, riemann) in table.items():
        optim = OptimConfig(family="adamw", lr=1e-4, gate_lr=1e-4, riemann=riemann)
        steps[variant] = trainer_step(config, params, adapter, optim, tokens, TARGETS, dtype=compute)[0]
    routed = {e: f"moe{e}_sqrt_gate_riemann" for e in (20, 50)}
    for e, variant in routed.items():
        steps[f"routing_stats_e{e}"] = routing_stats(config, params, table[variant][0], tokens, compute)
    medians = interleaved_medians(steps, rounds, warmup)
    stats_ms = {e: medians.pop(f"routing_stats_e{e}") for e in routed}
    base = medians["frozen_fwd_bwd"]
    experts = {1: medians["lora_riemann"]} | {e: medians[f"moe{e}_sqrt_gate_riemann"] for e in (4, 8, 20, 50)}
    return {
        "device": jax.devices()[0].device_kind,
        "model": name,
        "batch": [batch, length],
        "dtype": dtype,
        "step_ms": {k: 1e3 * v for k, v in medians.items()},
        "ratio_to_frozen_fwd_bwd": {k: v / base for k, v in medians.items()},
        "step_over_lora_by_experts": {str(e): v / experts[1] for e, v in experts.items()},
        "riemann_over_plain": {
            "lora": medians["lora_riemann"] / medians["lora"],
            "moe20_sqrt_gate": medians["moe20_sqrt_gate_riemann"] / medians["moe20_sqrt_gate"],
            "moslora": medians["moslora_riemann"] / medians["moslora"],
        },
        "moslora_over_lora": medians["moslora"] / medians["lora"],
        "sqrt_gate_over_standard": medians["moe20_sqrt_gate"] / medians["moe20_standard"],
        "routing_stats_over_step": {str(e): stats_ms[e] / medians[v] for e, v in routed.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this architecture instead")
    parser.add_argument("--layers", type=int, default=0, help="with --shape: keep only this many layers (0: all)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    add_run_arguments(parser, rounds=5)
    args = parser.parse_args()
    results = run(args.model, args.shape, args.layers, args.batch, args.length, args.dtype, args.rounds, args.warmup)
    setting = f"batch {args.batch} x {args.length}, {args.rounds} rounds"
    print(f"{results['device']}, {args.dtype}, {results['model']}, {setting}")
    print(f"{'train step':<34}{'ms':>10}{'/ frozen fwd+bwd':>18}")
    for name, ms in results["step_ms"].items():
        print(f"{name:<34}{ms:>10.1f}{results['ratio_to_frozen_fwd_bwd'][name]:>18.3f}")
    print(
        "step / LoRA step as E grows: "
        + ", ".join(f"E={e} {v:.3f}" for e, v in results["step_over_lora_by_experts"].items())
    )
    print("riemann_precond over none: " + ", ".join(f"{k} {v:.3f}" for k, v in results["riemann_over_plain"].items()))
    print(f"sqrt_gate over standard (E=20): {results['sqrt_gate_over_standard']:.3f}")
    print(f"MoSLoRA (mixer) over LoRA: {results['moslora_over_lora']:.3f}")
    print(
        "routing statistics alone / their step: "
        + ", ".join(f"E={e} {v:.3f}" for e, v in results["routing_stats_over_step"].items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
