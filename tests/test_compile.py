"""``python -m moelora_jax.compile``: the tiny model's programs compiled for a TPU slice without a TPU (libtpu, the
``tpu`` extra), figures checked against the shapes compiled; a job too large for the chip refused in one line."""

import json
import math
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import jax
import numpy as np
import pytest

from moelora_jax.compile import HEADROOM, compile_train_step, find_batch, largest_fitting, with_batch
from moelora_jax.parallel.topologies import TOPOLOGIES, compile_devices, topology
from moelora_jax.training.config_file import load_config
from moelora_jax.training.job import setup_shapes
from moelora_jax.training.settings import Settings

needs_libtpu = pytest.mark.skipif(find_spec("libtpu") is None, reason="needs libtpu: pip install 'moelora_jax[tpu]'")
needs_cuda_plugin = pytest.mark.skipif(
    find_spec("jax_cuda12_plugin") is None, reason="needs JAX's CUDA plugin: pip install 'moelora_jax[cuda]'"
)
ROOT = Path(__file__).resolve().parents[1]
# 32 tokens, not fewer: XLA 0.10.2's GPU compiler fails an internal check (Triton GEMM tiling) on 24
TINY = {"data.max_length": 32, "adapter.num_experts": 4, "adapter.top_k": 2}
TINY_JOB = [f"--config.{key}={value}" for key, value in TINY.items()]


def compile_check(model_dir: Path, *flags: str, topology: str = "v5e-4") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moelora_jax.compile", f"--config={ROOT}/configs/llama_moelora.py:smoke"]
    command += [f"--topology={topology}", f"--config.model.path={model_dir}", *TINY_JOB, *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def compiled_report(
    model_dir: Path, tmp_path: Path, *flags: str, topology: str = "v5e-4"
) -> tuple[subprocess.CompletedProcess, dict]:
    """A compile check that must succeed, and its ``--json`` report."""
    done = compile_check(model_dir, *flags, f"--json={tmp_path / 'report.json'}", topology=topology)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((tmp_path / "report.json").read_text())


def _tiny_settings(model_dir: Path, eval_batch_size: int | None = None) -> Settings:
    """The settings ``compile_check`` gives the command line (``TINY_JOB``), built in process."""
    config = load_config(ROOT / "configs" / "llama_moelora.py", "smoke")
    config.update_from_flattened_dict({"model.path": str(model_dir), **TINY})
    if eval_batch_size is not None:
        config.train.eval_batch_size = eval_batch_size
    return Settings.from_config(config)


def _per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ``jax.ShapeDtypeStruct``s."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)


@needs_libtpu
@pytest.mark.timeout(900)
def test_the_tiny_job_compiles_for_a_v5e_slice_and_its_figures_match_its_shapes(tiny_model_dir, tmp_path):
    done, report = compiled_report(tiny_model_dir, tmp_path, "--config.train.eval_batch_size=4")
    assert report["topology"] == "v5e-4" and report["chips"] == 4 and report["fits"] is True
    assert report["hbm_capacity_bytes"] == 16 * 2**30 and set(report["programs"]) == {
        "train_step",
        "eval_loss",
        "generate",
    }
    train = report["programs"]["train_step"]
    assert report["hbm_bytes_per_chip"] == train["total_bytes"] > 0

    # the same job's shapes, on CPU devices standing in for the 4 chips (the mesh and shardings are the same)
    shapes = setup_shapes(_tiny_settings(tiny_model_dir, eval_batch_size=4), devices=jax.devices("cpu")[:4])
    resident = _per_chip_bytes(shapes.params) + _per_chip_bytes(shapes.state) + _per_chip_bytes(shapes.train_batch)
    assert train["argument_bytes"] >= resident
    assert report["train_batch_shape"] == list(shapes.train_batch["tokens"].shape)
    # no remat, so the step computes about the model's FLOPs (plus the optimizer's, which weigh on a tiny model)
    assert 1.0 <= report["flops_ratio"] < 2.0 and 0 < report["roofline_mfu"] <= 1
    # data parallel over 4 chips: the adapters' gradients (float32, replicated) are all-reduced once per step
    adapter_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes.state.adapters))
    assert train["collectives"]["all-reduce"]["bytes"] >= adapter_bytes
    assert "v5e-4" in done.stdout and "train_step" in done.stdout


@needs_libtpu
@pytest.mark.timeout(900)
def test_a_job_too_large_for_the_chip_exits_2_with_one_line_naming_what_to_change(tiny_model_dir):
    done = compile_check(tiny_model_dir, "--config.train.batch_size=65536", "--config.data.max_length=256")
    assert done.returncode == 2, done.stderr[-3000:]
    # libtpu checks a program against the chip's HBM while compiling, and refuses this one outright
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: XLA refuses the train_step for v5e-4's chips: ") and "exceeds available HBM" in line
    assert "mesh.fsdp" in line and "model.remat=full" in line and "train.micro_batches" in line
    assert "Traceback" not in done.stderr


@needs_libtpu
@pytest.mark.timeout(900)
def test_splash_attention_compiles_to_mosaic_kernels_for_the_train_step_and_eval_loss_only(tiny_model_dir, tmp_path):
    done, report = compiled_report(tiny_model_dir, tmp_path, "--config.model.attention=splash")
    programs = report["programs"]
    # the kernels' FLOPs are not in the HLO: no ratio, and a bound from the model's FLOPs
    assert report["flops_ratio"] is None and 0 < report["roofline_mfu"] <= 1
    assert programs["train_step"]["kernel_calls"] > 0 and programs["eval_loss"]["kernel_calls"] > 0
    assert programs["generate"]["kernel_calls"] == 0  # decoding with a cache keeps XLA's attention
    assert "Pallas kernel call(s)" in done.stdout


@needs_cuda_plugin
@pytest.mark.timeout(900)
def test_the_tiny_job_compiles_for_an_h100_and_its_matmul_flops_are_counted(tiny_model_dir, tmp_path):
    _, report = compiled_report(tiny_model_dir, tmp_path, topology="h100-1")
    assert report["chip"] == "NVIDIA H100 SXM 80GB" and report["fits"] is True
    assert 1.0 <= report["flops_ratio"] < 2.0  # XLA's GPU cost analysis has no FLOPs: these are counted from the HLO


@needs_libtpu
@pytest.mark.timeout(900)
def test_find_batch_answers_a_batch_that_fits_and_whose_successor_does_not_for_the_policies_asked(tiny_model_dir):
    """In process, one policy, a capacity that 6 examples per chip fit within the headroom: every probe is a real
    compile for a v5e-4. (XLA's estimate for the tiny model is not monotone in the batch: 2 per chip needs more
    than 3, so only this is promised, not that no larger batch fits.)"""
    settings = _tiny_settings(tiny_model_dir)
    devices = compile_devices(topology("v5e-4"))

    def needs(per_chip: int) -> int:
        return compile_train_step(setup_shapes(with_batch(settings, per_chip, "full", 4), None, devices)).total_bytes

    capacity = math.ceil(needs(6) / (1 - HEADROOM))
    found = find_batch(settings, devices, None, capacity, ("full",))
    assert set(found) == {"full"}
    assert needs(found["full"]) <= (1 - HEADROOM) * capacity < needs(found["full"] + 1)


def test_every_topology_names_its_chips():
    for name, slice_ in TOPOLOGIES.items():
        generation, count = name.split("-")
        per_count = 2 if generation in ("v4", "v5p") else 1  # Cloud counts TensorCores for these, chips for the rest
        assert slice_.chips * per_count == int(count), name


@pytest.mark.parametrize("seed", range(200))
def test_the_batch_search_finds_the_largest_batch_that_fits_as_a_scan_of_every_batch_does(seed):
    """Against the answer of trying every batch, for growing memory curves the linear guess gets right or wrong:
    linear, with a jump, convex, flat, out of memory from some batch on."""
    rng = np.random.default_rng(seed)
    base, slope, limit = rng.uniform(0, 50), rng.uniform(0.01, 20), int(rng.integers(1, 300))
    jump_at, jump = int(rng.integers(1, 300)), rng.uniform(0, 500)
    curve = rng.choice(["linear", "convex", "flat", "oom"])

    def needs(b: int) -> float:
        grow = {"linear": slope * b, "convex": slope * b**1.5, "flat": 0.0, "oom": slope * b}[curve]
        if curve == "oom" and b >= jump_at:
            return math.inf
        return base + grow + (jump if b >= jump_at else 0.0)

    budget = rng.uniform(0, 1000)
    scan = max((b for b in range(1, limit + 1) if needs(b) <= budget), default=0)
    calls = []
    assert largest_fitting(lambda b: calls.append(b) or needs(b), budget, limit) == scan
    assert all(1 <= b <= limit for b in calls)
    if curve == "linear" and jump_at > limit:  # the guess is right: 1, 2, the guess and the one after it
        assert len(set(calls)) <= 4
