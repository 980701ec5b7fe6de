"""The README's table of what fits where: ``python -m moelora_jax.compile`` for each row, no accelerator needed.

    python bench/compile_table.py --json bench/results/compile_table.json         # every row (CPU hours)
    python bench/compile_table.py --rows 0,3 --json bench/results/compile_table.json  # some rows, merged in

Every row is the ``:paper`` preset (MoE-LoRA E=20, r=4, top-k 10, bfloat16 weights and activations) on a published
shape, compiled for one slice in its own process (``--json``); ``find_batch`` rows also bisect the largest per-chip
batch per remat policy (one compile per probe). The table printed is the README's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moelora_jax.models.llama import REMAT_CHOICES
from moelora_jax.parallel.topologies import TOPOLOGIES

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
ALL_PROJECTIONS = "q,k,v,o,gate,up,down"


@dataclasses.dataclass(frozen=True)
class Row:
    """One compile check: ``per_chip`` examples of ``tokens`` tokens per chip in one micro-batch (``None``: the
    preset's batch of 80 in 10 micro-batches), the weights sharded over every chip (fsdp) unless ``fsdp`` says."""

    shape: str
    tokens: int
    topology: str
    remat: str = "full"
    per_chip: int | None = 1
    fsdp: int | None = None
    targets: str = "q,k,v,o"
    find_batch: tuple[str, ...] = ()  # the remat policies to find the largest per-chip batch for

    @property
    def chips(self) -> int:
        return TOPOLOGIES[self.topology].chips

    @property
    def mesh_fsdp(self) -> int:
        """How many chips the weights are sharded over: ``fsdp``, or every chip of the slice."""
        return self.fsdp or self.chips

    def flags(self) -> list[str]:
        flags = [
            f"--config={ROOT / 'configs' / 'llama_moelora.py'}:paper",
            f"--topology={self.topology}",
            f"--model_shape={self.shape}",
            f"--config.data.max_length={self.tokens}",
            f"--config.model.remat={self.remat}",
            f"--config.adapter.targets={self.targets}",
            f"--config.mesh.fsdp={self.mesh_fsdp}",
            f"--config.train.eval_batch_size={self.chips}",
            "--programs=train_step",
        ]
        if self.per_chip is not None:
            flags += [f"--config.train.batch_size={self.per_chip * self.chips}", "--config.train.micro_batches=1"]
        if self.find_batch:
            flags += ["--find_batch", *(f"--find_batch_remat={remat}" for remat in self.find_batch)]
        return flags


ROWS = (
    # the paper's job as the :paper preset runs it (256 tokens, 80 examples in 10 micro-batches)
    Row("llama-3.2-3b", 256, "v5e-8", remat="none", per_chip=None),
    Row("llama-3.2-3b", 256, "h100-8", remat="none", per_chip=None),
    # 2,048 tokens, one example per chip: every remat policy on the 3B, then the larger models
    *(Row("llama-3.2-3b", 2048, "v5e-8", remat=remat) for remat in REMAT_CHOICES),
    Row("llama-3.1-8b", 2048, "v5e-8"),
    Row("llama-3.1-8b", 2048, "v5e-8", targets=ALL_PROJECTIONS),
    Row("llama-3.1-8b", 2048, "v5p-8"),
    Row("llama-3.1-8b", 2048, "v6e-8"),
    Row("llama-3.1-8b", 2048, "h100-8"),
    Row("llama-3.1-70b", 2048, "v5e-8"),
    Row("llama-3.1-70b", 2048, "v5p-8"),
    Row("llama-3.1-70b", 2048, "v6e-8"),
    Row("llama-3.1-70b", 2048, "v5p-128"),
    Row("llama-3.1-70b", 2048, "h100-8"),
    # the paper's job data-parallel (the preset's mesh: weights replicated, only the adapters' gradients reduced)
    Row("llama-3.2-3b", 256, "v5e-8", remat="none", per_chip=None, fsdp=1, find_batch=("none", "full")),
    # the other families at the 8B row's settings
    Row("qwen2.5-7b", 2048, "v5e-8"),
    Row("qwen3-8b", 2048, "v5e-8"),
    Row("mistral-7b", 2048, "v5e-8"),
    Row("gemma-3-4b", 2048, "v5e-8"),
    Row("gemma-3-12b", 2048, "v5e-8"),
)


def check(row: Row) -> dict[str, Any]:
    """The compile check's report for ``row`` (``error``: its one line, where it exits 2), and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "moelora_jax.compile", *row.flags(), f"--json={report}"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if done.returncode not in (0, 2) or not report.exists():
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(report.read_text())
    if done.returncode == 2:
        result["error"] = done.stderr.strip().splitlines()[-1]
    return result | {"row": dataclasses.asdict(row), "wall_seconds": seconds}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | tokens | adapted | slice | mesh fsdp | batch / chip | remat | fits | HBM / chip (GiB) "
        "| FLOPs / model's | MFU bound | largest batch / chip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = Row(**r["row"])
        batch = "80 in 10 micro" if row.per_chip is None else str(row.per_chip)
        adapted = "all 7" if row.targets == ALL_PROJECTIONS else "q,k,v,o"
        largest = ", ".join(f"{k} {v}" for k, v in r.get("largest_per_chip_batch", {}).items()) or ""
        if "hbm_bytes_per_chip" in r:
            hbm = f"{r['hbm_bytes_per_chip'] / GiB:.1f} of {r['hbm_capacity_bytes'] / GiB:.0f}"
            ratio = "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.2f}"
            figures = f"{ratio} | {r['roofline_mfu']:.0%}"
        else:  # refused by the compiler for the chip's memory
            hbm, figures = f"> {r['hbm_capacity_bytes'] / GiB:.0f}", "- | -"
        lines.append(
            f"| {row.shape} | {row.tokens} | {adapted} | {row.topology} | {row.mesh_fsdp} | {batch} "
            f"| {row.remat} | {'yes' if r['fits'] else '**no**'} | {hbm} | {figures} | {largest} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="comma-separated row numbers (default: all; '': print the table only)")
    parser.add_argument("--json", help="write (merge) the results into this JSON file, keyed by row number")
    args = parser.parse_args()
    chosen = range(len(ROWS)) if args.rows is None else [int(i) for i in args.rows.split(",") if i]
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    for i in chosen:
        results[str(i)] = check(ROWS[i])
        print(f"row {i}: {ROWS[i]} done in {results[str(i)]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(table([results[k] for k in sorted(results, key=int)]))


if __name__ == "__main__":
    main()
