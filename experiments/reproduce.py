"""Reproduce the papers' claims: four adapters x {SGD, AdamW} x three learning rates, then tables and plots.

    python experiments/reproduce.py                          # the CPU protocol: SmolLM2-135M, BBC News, ~75 min
    python experiments/reproduce.py --protocol resolve       # 2 tasks x 4 methods x 2 optimizers x 3 seeds: ~4 h
    python experiments/reproduce.py --protocol tuned         # each of 7 arms at its own rate (experiments/tuned.py)
    python experiments/reproduce.py --protocol paper         # CommonsenseQA, 2000 steps of 80 (a GPU or TPU)
    python experiments/reproduce.py --protocol paper --model /models/Llama-3.2-3B
    python experiments/reproduce.py --methods moslora,moslora+riemann,moe_moslora+riemann+sqrt_gate   # MoSLoRA rows
    python experiments/reproduce.py --collect                # only rebuild the tables and plots
    python experiments/reproduce.py --set train.steps=2 --output /tmp/runs --results /tmp/out   # a quick check

The methods are LoRA; MoE-LoRA; MoE-LoRA with the per-expert ``riemann_precond`` (Zhang & Pilanci 2024); and
MoE-LoRA with ``riemann_precond`` and ``sqrt_gate`` gradients (Sun et al. 2025); on request also MoSLoRA (Wu et al.
2024: an ``r x r`` mixer between the factors) with and without ``riemann_precond``, and MoE-LoRA with mixers.
Each run is one ``python train.py --config configs/llama_moelora.py[:preset] --config.KEY=VALUE ...`` into
``runs/reproduce/<protocol>/<method>-<optimizer>-<lr>/``; a run with a ``summary.json`` is skipped, an interrupted
run resumes from its checkpoint, and a run that another process is running (it holds the directory's ``.lock``) is
left to it, so running the command again, or in a second terminal, continues the grid. The collected results go to
``docs/results/<protocol>/``: ``results.json`` (each run's command, scores and training-loss curve), ``tables.md``,
``loss_vs_step.png`` and ``accuracy_vs_lr.png``.

The ``resolve`` protocol is built to tell methods apart: BBC News and GLUE SST-2 (``--data-dir``/glue_data/SST-2),
each optimizer at its best rate of the CPU grid, seeds 0, 1 and 2, every run of a task scored on the same held-out
examples (BBC News' 424 test articles, 500 of SST-2's 872 dev sentences) with each example's outcome kept
(``eval_examples.jsonl``). Its runs go to
``runs/reproduce/resolve/<task>/<method>-<optimizer>-<lr>-seed<seed>/``; its tables give each cell's accuracy with a
95% bootstrap interval over seeds and examples, and each paper claim's paired difference with its verdict
(``tables.md``, ``accuracy.png``, ``claims.png``).

The gate's learning rate keeps the reference code's ratio to the experts' (3e-8 : 1e-5 under AdamW, 3e-8 : 3e-5
under SGD). Every adapter starts as the base model (``B = 0``), so the base model is evaluated once (per task), in
the first run.

The code: ``runs.py`` (one run: its command, directory, launching and records), ``protocols.py`` (each protocol's
runs, launched and collected), ``stats.py`` (bootstrap intervals, the claims' verdicts) and ``reporting.py`` (tables,
plots, the reading); this file is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.protocols import METHODS, Protocol, protocols  # noqa: E402
from experiments.reporting import write  # noqa: E402
from experiments.tuned import SST2_STEPS, TunedProtocol, tuned_protocol  # noqa: E402
from moelora_jax.errors import UserError  # noqa: E402


def every_protocol(data_dir: Path, tuned_results: Path) -> dict[str, Protocol | TunedProtocol]:
    """Every protocol by name, the ``tuned`` one recording its runs under ``tuned_results / "runs"``."""
    grids = protocols(data_dir)
    return grids | {"tuned": tuned_protocol(grids["resolve"], tuned_results / "runs", SST2_STEPS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="cpu", choices=list(every_protocol(Path(), Path())))
    parser.add_argument(
        "--methods", help=f"comma-separated, of {', '.join(METHODS)} (default: the protocol's, e.g. the four core)"
    )
    parser.add_argument("--model", default="", help="a HF directory or .gguf file; default SmolLM2-135M-Instruct")
    parser.add_argument(
        "--data-dir", type=Path, default=ROOT.parent / "shared" / "data", help="the parent of commonsenseqa, glue_data"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run"
    )
    parser.add_argument("--output", type=Path, help="where the runs go (default runs/reproduce/<protocol>)")
    parser.add_argument("--results", type=Path, help="where the results go (default docs/results/<protocol>)")
    parser.add_argument("--collect", action="store_true", help="only collect finished runs into tables and plots")
    args = parser.parse_args()
    out = (args.results or ROOT / "docs" / "results" / args.protocol).resolve()
    protocol = every_protocol(args.data_dir.resolve(), out)[args.protocol]
    methods = [m.strip() for m in (args.methods or ",".join(protocol.default_methods)).split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}.")
    if bad := [item for item in args.set if "=" not in item]:
        parser.error(f"--set {bad[0]!r} must be KEY=VALUE, e.g. --set train.steps=2.")
    extra = dict(item.split("=", 1) for item in args.set) | ({"model.path": args.model} if args.model else {})
    root = (args.output or ROOT / "runs" / "reproduce" / args.protocol).resolve()
    try:
        if not args.collect:
            protocol.launch(methods, root, extra)
        collected = protocol.collect(root)
    except UserError as e:
        sys.exit(f"error: {e}")
    if not (collected["runs"] or collected.get("tuning")):
        where = protocol.records if isinstance(protocol, TunedProtocol) else root  # the tuned one reads its records
        sys.exit(f"no finished runs under {where}: run without --collect first.")
    text = write(collected, protocol, out)
    print(f"\n{text}\nresults, tables and plots in {out}/")


if __name__ == "__main__":
    main()
