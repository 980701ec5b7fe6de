"""The benchmark suite: every speed and memory comparison, each section timed side by side in its own process.

    python bench/suite.py                        # this CPU (about 15 minutes on 2 cores); JSON to bench/results/
    python bench/suite.py --only peft memory     # some sections

Sections (each a script here, runnable alone):
  - ``variants_smollm2``: ``variants_bench.py`` on SmolLM2-135M-Instruct: MoE-LoRA and LoRA train steps over a
    frozen fwd+bwd; with and without ``riemann_precond``; ``standard`` against ``sqrt_gate``; step time as E grows;
  - ``variants_3b_2layers``: the same on 2 layers of Llama-3.2-3B shapes (random weights);
  - ``packing``: ``packing_bench.py``: README command 1's training step on its real batches, by batch layout
    (today's padded rows and full head, the head at the targets, packed rows);
  - ``peft``: ``peft_bench.py``: our step against PyTorch PEFT's LoRA step (and its Riemannian optimizer) on the
    same real BBC News batches;
  - ``memory``: ``memory_bench.py``: memory of a train step against an eval forward of the same real batch;
  - ``gpu_3b`` (only when JAX sees a GPU): ``model_bench.py`` on all 28 layers of Llama-3.2-3B shapes in bfloat16,
    with tokens/s and model-FLOPs utilisation of the MoE-LoRA train step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
SECTIONS = {
    "variants_smollm2": ["variants_bench.py", "--rounds", "3"],
    "variants_3b_2layers": [
        "variants_bench.py",
        *("--shape", "llama-3.2-3b", "--layers", "2", "--batch", "2", "--length", "64", "--rounds", "3"),
    ],
    "packing": ["packing_bench.py"],
    "peft": ["peft_bench.py"],
    "memory": ["memory_bench.py"],
    "gpu_3b": [
        "model_bench.py",
        *("--shape", "llama-3.2-3b", "--batch", "8", "--length", "256", "--dtype", "bfloat16", "--rounds", "10"),
    ],
}


def _summary(results: dict[str, dict]) -> list[str]:
    """The headline ratios of whatever sections ran."""
    lines = []
    for name in ("variants_smollm2", "variants_3b_2layers"):
        if name in results:
            r, section = results[name]["ratio_to_frozen_fwd_bwd"], results[name]
            lines.append(
                f"{name}: step / frozen fwd+bwd: LoRA {r['lora']:.2f}, MoE-LoRA E=20 sqrt_gate+riemann "
                f"{r['moe20_sqrt_gate_riemann']:.2f}; sqrt_gate/standard {section['sqrt_gate_over_standard']:.3f}; "
                f"riemann/none (E=20) {section['riemann_over_plain']['moe20_sqrt_gate']:.3f}; "
                f"MoSLoRA/LoRA {section['moslora_over_lora']:.3f}; step / LoRA by E: "
                + ", ".join(f"{e}: {v:.2f}" for e, v in section["step_over_lora_by_experts"].items())
                + "; routing statistics / step by E: "
                + ", ".join(f"{e}: {v:.3f}" for e, v in section["routing_stats_over_step"].items())
            )
    if "peft" in results:
        lines.append(
            "peft: step / PEFT LoRA step: "
            + ", ".join(f"{k} {v:.2f}" for k, v in results["peft"]["ratio_to_peft_lora_adamw"].items())
        )
    if "packing" in results:
        lines.append(
            "packing: command 1 examples/s / before: "
            + ", ".join(f"{k} {v:.2f}" for k, v in results["packing"]["ratio_to_before"].items())
        )
    if "memory" in results:
        m = results["memory"]["mib"]
        lines.append(
            "memory (XLA, beyond the inputs): train step "
            + f"{m['train']['xla_bytes']:.0f} MiB, eval loss {m['eval_loss']['xla_bytes']:.0f} MiB, "
            + f"eval logits {m['eval_logits']['xla_bytes']:.0f} MiB"
        )
    if "gpu_3b" in results:
        g = results["gpu_3b"]
        mfu = f", model-FLOPs utilisation {g['mfu']:.1%} of {g['peak_flops'] / 1e12:.0f} TFLOP/s" if g["mfu"] else ""
        lines.append(f"gpu_3b: MoE-LoRA train step {g['train_tokens_per_s']:.0f} tokens/s{mfu}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run these sections only")
    parser.add_argument("--json", default=str(HERE / "results" / "suite.json"), help="where to write all results")
    args = parser.parse_args()
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    chosen = args.only or [s for s in SECTIONS if s != "gpu_3b" or has_gpu]
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            print(f"\n== {name}", flush=True)
            out = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, str(HERE / SECTIONS[name][0]), *SECTIONS[name][1:], "--json", str(out)], check=True
            )
            seconds[name] = time.perf_counter() - start
            results[name] = json.loads(out.read_text())
    print("\n== summary")
    for line in _summary(results):
        print(line)
    print("section seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"sections": results, "seconds": seconds}, indent=2))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
