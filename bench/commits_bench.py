"""README command 1's training step as two commits run it, side by side in one run: the whole change, measured.

    python bench/commits_bench.py --base HEAD~5          # that commit against the working tree
    python bench/commits_bench.py --base 9a01afc --steps 8

``--base`` is checked out into a temporary git worktree. One worker process per tree imports that tree's
``moelora_jax`` (``PYTHONPATH``), loads command 1's model and job (``configs/llama_moelora.py`` of its own tree;
through the tree's ``job.setup`` where it has one, else wired as that tree's run did), builds the batches of steps
``0..steps-1`` as that tree's trainer would (its default batch layout), and compiles every shape. Then the workers
take turns: each round, step ``i`` in the base tree, then in the new one. Reported:
examples per second of each, their ratio, and both first-step losses (equal: the same model at init on the same
examples). Workers reached through pipes; both on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(steps: int, batch_size: int) -> None:
    """Runs in a tree: prepares, prints ``ready <first loss>``, then times one step per ``step`` line on stdin."""
    import time

    import jax
    from tree_modules import tree_module

    import moelora_jax

    config = tree_module("training.config_file", "config_file").load_config(Path.cwd() / "configs" / "llama_moelora.py")
    config.train.batch_size = batch_size
    with tempfile.TemporaryDirectory() as output_dir:
        try:  # a tree whose job is built once by its setup
            job_module = tree_module("training.job", "job")
        except ImportError:
            trainer, params, batches = _by_hand(config, steps, batch_size)
        else:
            config.output_dir, config.compilation_cache = output_dir, ""
            job = job_module.setup(tree_module("training.settings", "settings").Settings.from_config(config))
            trainer, params = job.trainer, job.params
            batches = [job.batches(s + 1).arrays for s in range(steps)]
        state, first, seen = trainer.init(jax.random.key(0)), None, set()
        for batch in batches:  # compile every shape
            if batch["tokens"].shape not in seen:
                seen.add(batch["tokens"].shape)
                state, metrics = trainer.train_step(state, params, batch)
                first = float(metrics["loss"]) if first is None else first
        print(f"ready {first} {moelora_jax.__file__}", flush=True)
        for s in range(steps):
            sys.stdin.readline()
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, params, batches[s])
            jax.block_until_ready(metrics)
            print(time.perf_counter() - start, flush=True)


def _by_hand(config, steps: int, batch_size: int) -> tuple:
    """The trainer, weights and step batches of a tree from before the job setup (so with flat modules), wired as
    its run did."""
    import flax.linen as nn
    import jax
    from moelora_jax.pretrained import load_config, load_params, load_tokenizer, resolve_model_dir
    from moelora_jax.sharding import make_mesh
    from moelora_jax.tasks import load_task
    from moelora_jax.trainer import Trainer

    from moelora_jax import data
    from moelora_jax.models.llama import Llama, abstract_variables
    from moelora_jax.optim import build_optimizer

    try:  # a tree with validated settings sections
        from moelora_jax.settings import Settings

        settings = Settings.from_config(config)
        adapter, targets, data_settings = settings.adapter.config, settings.adapter.targets, settings.data
    except ImportError:
        from moelora_jax.run import plan

        settings = plan(config)
        adapter, targets, data_settings = settings.adapter, settings.targets, config.data
    directory = resolve_model_dir(None)
    model_config, tokenizer = load_config(directory), load_tokenizer(directory)
    _, examples = load_task(config.data.task, None, config.data.train_split)
    if hasattr(data, "encode_examples"):  # a tree with overflow policies
        encoded = data.encode_examples(tokenizer, examples, config.data.max_length)[0]
    else:
        encoded = [data.encode_example(tokenizer, e, config.data.max_length) for e in examples]
    model = Llama(model_config, adapter=adapter, adapter_targets=targets)
    trainer = Trainer(
        model, build_optimizer(settings.optim, nn.unbox(abstract_variables(model))["adapters"]), make_mesh()
    )
    params = load_params(directory, model_config, shardings=trainer.shardings["params"])
    try:  # a tree with batch layouts builds batches as its trainer does
        from moelora_jax.run import batch_layout

        layout = batch_layout(data_settings, encoded, 1)
    except ImportError:
        layout = lambda rows, pad: data.collate(rows, config.data.max_length, pad)  # noqa: E731
    batches = []
    for s in range(steps):
        rows = [encoded[i] for i in data.batch_indices(len(encoded), batch_size, seed=0, step=s)]
        batches.append(trainer.put_batch(jax.tree.map(lambda x: x[None], layout(rows, tokenizer.pad_token_id)), 1))
    return trainer, params, batches


def run(base: str, steps: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), base], check=True)
        try:
            workers = {}
            for name, cwd in (("base", tree), ("new", ROOT)):
                env = {**os.environ, "PYTHONPATH": str(cwd)}
                command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(steps)]
                command += ["--batch-size", str(batch_size)]
                workers[name] = subprocess.Popen(
                    command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            ready = {}
            for name, process in workers.items():  # one at a time: compiling does not overlap a timed step
                line = process.stdout.readline().split()
                if not line or line[0] != "ready":
                    raise RuntimeError(f"the {name} worker failed before it was ready")
                ready[name] = (float(line[1]), line[2])
            seconds = dict.fromkeys(workers, 0.0)
            for _ in range(steps):
                for name, process in workers.items():
                    process.stdin.write("step\n")
                    process.stdin.flush()
                    seconds[name] += float(process.stdout.readline())
            for process in workers.values():
                process.wait()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    rate = {name: batch_size * steps / t for name, t in seconds.items()}
    return {
        "base": base,
        "steps": steps,
        "batch_size": batch_size,
        "examples_per_s": rate,
        "new_over_base": rate["new"] / rate["base"],
        "first_step_loss": {name: r[0] for name, r in ready.items()},
        "package": {name: r[1] for name, r in ready.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare the working tree against")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch_size)
        return
    results = run(args.base, args.steps, args.batch_size)
    rate = results["examples_per_s"]
    print(
        f"command 1's step, {args.steps} rounds of {args.batch_size} examples: base {args.base} {rate['base']:.3f} "
        f"examples/s, working tree {rate['new']:.3f} ({results['new_over_base']:.2f}x); first-step losses "
        f"{results['first_step_loss']['base']:.5f} and {results['first_step_loss']['new']:.5f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
