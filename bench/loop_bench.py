"""What the training loop costs beyond its steps: a run's wall time per step over the compiled step's own time, for
the loop before this work and after it, side by side in one run.

    python bench/loop_bench.py                                  # command 1's job and the tiny test model (~30 min)
    python bench/loop_bench.py --jobs tiny --base HEAD~3 --rounds 3

``--base`` (default d58b42c, the last commit before the loop ran ahead of the host) is checked out into a temporary
git worktree. For each job, each round runs one worker process per tree (base, then this working tree): the worker
imports that tree's ``moelora_jax`` (``PYTHONPATH``) and runs the whole job through its ``run``
(``moelora_jax.training.run``, or ``moelora_jax.run`` in an older tree), with ``Trainer.train_step`` wrapped to note
when each step is dispatched and to keep its batch (global arrays already on the devices). Then it times the compiled
step alone on those same batches, every shape compiled: each batch
``--repeats`` times back to back (the state carried along), waiting once at the end. Reported per tree:

- ``steady``: the loop's time per step in the steady state, the time from one dispatch to the next summed over the
  steps that neither compile (their shape and the previous step's ran before) nor evaluate, checkpoint or end
  around them, over the compiled step's own time on the same steps;
- ``run``: the run's training time (``summary.json``'s ``train_seconds``: compiles and checkpoint saves included,
  evaluations not) over the compiled step's own time summed over all its steps.

With ``--trace``, one more run per tree profiles a window of steady steps with ``jax.profiler`` (a Perfetto trace) and
reports how long the devices sat idle between consecutive train steps (each step's span: its HLO module's first op
to its last).

Jobs: ``command1`` is README command 1 (``configs/llama_moelora.py``: SmolLM2-135M, MoE-LoRA, BBC News, 50 steps of 4,
checkpoints at 25 and 50), without the step-0 evaluation and with 8 held-out examples (neither is part of the
training time); ``tiny`` is the tests' tiny random model (2 layers, width 32), 60 steps of 4 packed examples with
checkpoints every 20, where a step takes milliseconds and host work weighs most. Both without a persistent
compilation cache, so every compile is paid.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE = "d58b42c"
JOBS = {"command1": {"repeats": 1, "traced": (30, 40)}, "tiny": {"repeats": 5, "traced": (25, 35)}}
"""Per job: how often the compiled step is repeated to time it alone, and the steps (from, to) a traced run profiles,
between its checkpoints."""


def _config(job: str, directory: Path) -> Any:
    """The job's config, its outputs (and, for ``tiny``, its model and data) under ``directory``."""
    from tree_modules import tree_module

    load_config = tree_module("training.config_file", "config_file").load_config
    if job == "command1":
        config = load_config(Path.cwd() / "configs" / "llama_moelora.py")
        config.train.eval_before, config.data.max_eval_examples, config.train.eval_batch_size = False, 8, 8
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models
        from train_cli import apply_overrides, tiny_job, write_records

        model = tiny_models.save_tiny_llama(directory / "model", tiny_models.word_tokenizer())
        rows = [
            {"prompt": "what colour is the sky ? " * (i % 4 + 1), "response": "the answer is blue ."} for i in range(40)
        ]
        config = apply_overrides(
            load_config(Path.cwd() / "configs" / "llama_moelora.py", "smoke"),
            tiny_job(model, write_records(directory, rows)),
        )
        config.train.steps, config.checkpoint.every, config.train.eval_before = 60, 20, False
        config.data.pack_length = 48
    config.output_dir, config.compilation_cache = str(directory / "run"), ""
    return config


def _device_gaps(trace_dir: Path) -> dict[str, Any]:
    """From a ``jax.profiler`` trace: each train step's span on the devices (its HLO module's first op to its last)
    and the idle gaps between consecutive steps."""
    (path,) = trace_dir.glob("**/perfetto_trace.json.gz")
    trace = json.loads(gzip.decompress(path.read_bytes()))
    spans: dict[str, list[float]] = {}
    for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
        args = event.get("args") or {}
        if event.get("ph") == "X" and "train_step" in str(args.get("hlo_module", "")):
            start, end = event["ts"], event["ts"] + event.get("dur", 0)
            span = spans.setdefault(args["run_id"], [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    ordered = sorted(spans.values())
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(ordered)]
    return {
        "steps": len(ordered),
        "gap_ms_median": statistics.median(gaps) / 1e3,
        "gap_ms_max": max(gaps) / 1e3,
        "idle_fraction": sum(gaps) / (ordered[-1][1] - ordered[0][0]),
    }


def worker(job: str, repeats: int, traced: tuple[int, int] | None = None) -> dict[str, Any]:
    """Runs in a tree: the job through its ``run``, then the compiled step alone on the same batches. With
    ``traced``, only a ``jax.profiler`` trace of those steps, and the devices' idle gaps in it."""
    import jax
    from tree_modules import tree_module

    trainer_module = tree_module("training.trainer", "trainer")
    run = tree_module("training.run", "run").run

    calls: list[tuple[float, Any, Any, dict]] = []
    original = trainer_module.Trainer.train_step

    def noted(self, state, params, batch):
        calls.append((time.perf_counter(), self, params, batch))
        if traced and len(calls) == traced[0]:
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        if traced and len(calls) == traced[1]:
            jax.profiler.stop_trace()
        return original(self, state, params, batch)

    with tempfile.TemporaryDirectory() as directory:
        config = _config(job, Path(directory))
        trace_dir = Path(directory) / "trace"
        trainer_module.Trainer.train_step = noted
        try:
            summary = run(config)
        finally:
            trainer_module.Trainer.train_step = original
        if traced:
            return {"traced_steps": list(traced), **_device_gaps(trace_dir)}
        t = config.train
        trainer, params = calls[0][1], calls[0][2]
        state = trainer.init(jax.random.key(0))
        compiled = []
        for _, _, _, batch in calls:  # every shape ran in the job, so none compiles here
            jax.block_until_ready(state)
            start = time.perf_counter()
            for _ in range(repeats):
                state, metrics = trainer.train_step(state, params, batch)
            jax.block_until_ready(metrics)
            compiled.append((time.perf_counter() - start) / repeats)

    shapes = [call[3]["tokens"].shape for call in calls]
    every = config.checkpoint.every
    interrupted = {s for s in range(1, t.steps + 1) if s == t.steps or (every and s % every == 0)}
    interrupted |= {s for s in range(1, t.steps + 1) if t.eval_every and s % t.eval_every == 0}
    steady = [
        i  # 0-based: the interval from dispatch i to dispatch i + 1 (steps i + 1 and i + 2)
        for i in range(1, len(calls) - 1)
        if shapes[i] in shapes[:i] and shapes[i - 1] in shapes[: i - 1] and not ({i, i + 1} & interrupted)
    ]
    loop_time = sum(calls[i + 1][0] - calls[i][0] for i in steady)
    return {
        "steps": t.steps,
        "shapes": len(set(shapes)),
        "steady_steps": len(steady),
        "steady": loop_time / sum(compiled[i] for i in steady) if steady else None,
        "run": summary["train_seconds"] / sum(compiled),
        "compiled_step_ms": 1e3 * statistics.mean(compiled),
        "steady_loop_step_ms": 1e3 * loop_time / len(steady) if steady else None,
        "train_seconds": summary["train_seconds"],
    }


def compare(jobs: list[str], base: str, rounds: int, trace: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), base], check=True)
        try:
            results: dict[str, Any] = {job: {"base": [], "new": []} for job in jobs}
            traces: dict[str, Any] = {job: {} for job in jobs if trace}
            for job in jobs:
                for kind in ["timed"] * rounds + ["traced"] * trace:
                    for name, cwd in (("base", tree), ("new", ROOT)):
                        command = [sys.executable, str(Path(__file__).resolve()), "--worker", job]
                        command += ["--traced"] if kind == "traced" else []
                        env = {**os.environ, "PYTHONPATH": str(cwd)}
                        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
                        if done.returncode:
                            raise RuntimeError(f"the {name} worker of {job} failed:\n{done.stderr[-3000:]}")
                        result = json.loads(done.stdout.strip().splitlines()[-1])
                        if kind == "traced":
                            traces[job][name] = result
                        else:
                            results[job][name].append(result)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return {"base": base, "rounds": rounds, "jobs": results, "traces": traces}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=list(JOBS))
    parser.add_argument("--base", default=BASE, help="the commit to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="also profile a window of steps of each tree")
    parser.add_argument("--worker", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.worker:
        job = JOBS[args.worker]
        print(json.dumps(worker(args.worker, job["repeats"], job["traced"] if args.traced else None)))
        return
    results = compare(args.jobs, args.base, args.rounds, args.trace)
    print(f"loop time / compiled step time (base {args.base} against the working tree, {args.rounds} round(s))")
    print(
        f"{'job':<10}{'tree':<6}{'steady':>8}{'run':>8}{'steady steps':>14}{'step ms':>10}{'loop ms':>10}{'train s':>9}"
    )
    for job, trees in results["jobs"].items():
        for name, rounds in trees.items():
            for r in rounds:
                steady = f"{r['steady']:.3f}" if r["steady"] else "-"
                loop_ms = f"{r['steady_loop_step_ms']:.1f}" if r["steady_loop_step_ms"] else "-"
                print(
                    f"{job:<10}{name:<6}{steady:>8}{r['run']:>8.3f}{r['steady_steps']:>14}"
                    f"{r['compiled_step_ms']:>10.1f}{loop_ms:>10}{r['train_seconds']:>9.1f}"
                )
    for job, trees in results["traces"].items():
        for name, g in trees.items():
            print(
                f"{job} {name}: jax.profiler trace of steps {g['traced_steps'][0]}-{g['traced_steps'][1]}: the devices "
                f"idle {g['gap_ms_median']:.2f} ms between steps (median; max {g['gap_ms_max']:.2f}), "
                f"{g['idle_fraction']:.1%} of the window"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
