"""What checkpointing costs a run: a real-size MoE-LoRA train state saved and restored through ``Checkpoints``.

    python bench/checkpoint_bench.py --shape llama-3.2-3b          # the paper's setting (a minute on 2 CPU cores)

The state is what the trainer saves: adapters (E=20, r=4, top-k 10 on q, k, v, o by default) plus AdamW moments
and the riemann_precond-wrapped optimizer's counters, of ``configs/llama_moelora.py``'s job set up on the shapes of a
published architecture (``setup_shapes``: no base weights are needed, only the adapters are initialised) and filled
with random values, as after training.
Reports the state's size and its size on disk, the time a save blocks the training loop (copying off the
devices) against the time until it is complete on disk, their ratio, and the restore time; medians over
``--rounds`` saves, each of a new step. Also what verification costs: hashing a checkpoint's files
(``file_digests``, which a complete save includes, in the background) against the save's time, and checking them
(``damaged_files``, which a restore does first) against the restore's.

    python bench/checkpoint_bench.py --shape smollm2-135m   # command 1's checkpoints
    python bench/checkpoint_bench.py --shape llama-3.1-8b   # a published 8B shape's adapter state (about 1 GiB)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from bbc_batches import CONFIG

from moelora_jax.models.shapes import SHAPES
from moelora_jax.training.checkpoints import Checkpoints, damaged_files, file_digests
from moelora_jax.training.config_file import load_config
from moelora_jax.training.job import setup_shapes
from moelora_jax.training.settings import Settings
from moelora_jax.training.trainer import TrainState


def _as_if_trained(state: TrainState) -> TrainState:
    """Random values in every float leaf: a fresh state (B and the moments zero) would compress to almost nothing."""
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-3b")
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="q,k,v,o")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    config = load_config(CONFIG)
    config.adapter.num_experts, config.adapter.rank = args.experts, args.rank
    config.adapter.top_k, config.adapter.targets = min(10, args.experts), args.targets
    shapes = setup_shapes(Settings.from_config(config), args.shape)  # the job's trainer on published shapes
    state = _as_if_trained(shapes.trainer.init(jax.random.key(0)))
    jax.block_until_ready(state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        checkpoints = Checkpoints(directory, {"bench": args.shape}, keep=args.rounds + 1)
        blocking, complete, restore, digest, verify = [], [], [], [], []
        for step in range(1, args.rounds + 1):
            start = time.perf_counter()
            checkpoints.save(state, step=step)
            blocking.append(time.perf_counter() - start)
            checkpoints.wait()
            complete.append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(checkpoints.restore(state, step=step))
            restore.append(time.perf_counter() - start)
            start = time.perf_counter()
            file_digests(checkpoints.directory / str(step))
            digest.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert damaged_files(checkpoints.directory / str(step)) == []
            verify.append(time.perf_counter() - start)
        disk_bytes = _directory_bytes(Path(directory) / str(args.rounds))
        checkpoints.close()

    block, done = statistics.median(blocking), statistics.median(complete)
    results = {
        "device": jax.devices()[0].device_kind,
        "shape": args.shape,
        "adapter": {"experts": args.experts, "rank": args.rank, "targets": args.targets},
        "state_mib": state_bytes / 2**20,
        "disk_mib": disk_bytes / 2**20,
        "save_blocking_s": block,
        "save_complete_s": done,
        "blocking_over_complete": block / done,
        "write_mib_per_s": state_bytes / 2**20 / done,
        "restore_s": statistics.median(restore),
        "digest_s": statistics.median(digest),
        "verify_s": statistics.median(verify),
    }
    print(
        f"{results['device']}: {args.shape}, E={args.experts} r={args.rank} on {args.targets}, {args.rounds} rounds\n"
        f"train state {results['state_mib']:.0f} MiB, {results['disk_mib']:.0f} MiB on disk\n"
        f"save blocks the loop {block:.2f} s of {done:.2f} s to complete ({block / done:.2f}), "
        f"{results['write_mib_per_s']:.0f} MiB/s; restore {results['restore_s']:.2f} s\n"
        f"digest at save {results['digest_s']:.3f} s ({results['digest_s'] / done:.1%} of the complete save), "
        f"verification at restore {results['verify_s']:.3f} s ({results['verify_s'] / results['restore_s']:.1%} of "
        "the restore)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
